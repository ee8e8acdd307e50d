"""Build RML split configs: an RML folder -> data_rml/ or data_rml_by_user/.

    python3 -m prepare.read_rml --root=/path/to/RML                  # by clip: data_rml/
    python3 -m prepare.read_rml --root=/path/to/RML --split_by=user  # subjects held out
    python3 -m prepare.read_rml                         # the twin of prepare/synth_rml.py

The clips are every AVI under root (``.avi`` in any case), whose first folder is
the subject (``s1`` .. ``s8``, language subfolders allowed) and whose name starts
with the emotion code (ha, sa, an, fe, su, di: datasets.RML_CODES); a clip whose
frame rate is not 30 fps is dropped with the reason, as a damaged one. Writes, for split in
train / val / test (the same files as read_cremad.py):

    {split}_videos.pkl  list of AVI paths 'root/SUBJECT/NAME.avi' (root as given)
    {split}_labels.pkl  list of emotion indices (datasets.RML_EMOTIONS order)
    {split}_stats.txt   class counts of emotion and user
and train_image_var.pkl / train_audio_var.pkl (variances of the training clips'
centre face crops in [0, 1] and log-mels, with the RML preprocessing) and split.json.

split_by='clip': shuffled clips cut in the proportions of split_sizes (seeded).
split_by='user': the subjects in val_subjects and test_subjects are held out (a
constant: the split does not depend on the seed); the others train.
Every clip is decoded once before anything is written (into the decode-once cache
training reuses): a clip that cannot be read stops the build, naming it.
"""
import os
from pathlib import Path

import numpy as np

import datasets
from cmvq.cache import DEFAULT_WORKERS, describe_bad
from cmvq.configurator import configure
from cmvq.errors import BadValueError, ExistsError, MissingError, run_script
from cmvq.splits import (SPLITS, check_usable, format_counts, print_record, split_counts,
                         validate_splits, write_split_folder)

# ----------------------------------------------------------------------------- config
root = 'synth_rml/RML'          # RML folder (s1/ .. s8/ of AVI clips); default: the twin
data_path = None                # output folder; None: data_rml (clip) / data_rml_by_user (user)
seed = 0                        # split seed (split_by='clip')
split_by = 'clip'               # 'clip' (random by clip) or 'user' (subjects held out)
split_sizes = (0.8, 0.1, 0.1)   # train, val, test proportions of the clips (split_by='clip')
val_subjects = ('s7',)          # split_by='user': validation subjects
test_subjects = ('s8',)         # split_by='user': test subjects
overwrite = False               # True: replace the files of an existing data_path
workers = DEFAULT_WORKERS       # processes decoding clips
cache = True                    # decode through the decode-once cache (reused by training)
cache_dir = 'cache'             # where that cache lives
frame_jitter = datasets.RML_JITTER  # training frame window of the cache: centre +- jitter
backend = 'pyav'                # AVI reader: 'pyav' or 'moviepy'
progress = True                 # progress bars
# -----------------------------------------------------------------------------
CHOICES = {'split_by': ('clip', 'user'), 'backend': ('pyav', 'moviepy')}
DEFAULT_DATA_PATHS = {'clip': 'data_rml', 'user': 'data_rml_by_user'}


def list_clips(root):
    """{clip name 'SUBJECT/.../NAME' (no extension): its file} of every AVI under root
    (.avi in any case: ha1.AVI, sa2.Avi), sorted by name; BadValueError naming a clip
    outside the RML naming (emotion code, subject folder s1..s8) or listed twice."""
    root = Path(root)
    if not root.is_dir():
        raise MissingError(f'root={str(root)!r} is not a folder (give an RML copy: '
                                's1/ .. s8/ of AVI clips)')
    clips = {}
    for path in sorted(p for p in root.rglob('*') if p.suffix.lower() == '.avi'):
        name = str(path.relative_to(root).with_suffix(''))
        if name in clips:
            raise BadValueError(f'{clips[name]} and {path} are the same clip twice: keep one')
        datasets.rml_emotion(name), datasets.rml_subject(path)
        clips[name] = str(path)
    if not clips:
        raise MissingError(f'root={str(root)!r} holds no .avi clips')
    return dict(sorted(clips.items()))


def subject_of(name):
    return f's{datasets.rml_subject(name + ".avi") + 1}'


def plan_rml_splits(names, *, seed=0, split_by='clip', sizes=(0.8, 0.1, 0.1),
                    val_subjects=('s7',), test_subjects=('s8',)):
    """{split: names}: a pure function of its arguments (see the module docstring)."""
    names = sorted(set(names))
    if split_by == 'clip':
        order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
        bounds = np.cumsum(split_counts(len(order), sizes))
        return {s: list(part) for s, part in
                zip(SPLITS, np.split(np.array(order, dtype=object), bounds[:-1]), strict=True)}
    if split_by != 'user':
        raise BadValueError(f"split_by={split_by!r} is not 'clip' or 'user'")
    present = sorted({subject_of(n) for n in names}, key=lambda s: int(s[1:]))
    held = {'val': tuple(val_subjects), 'test': tuple(test_subjects)}
    for split, subjects in held.items():
        missing = [s for s in subjects if s not in present]
        if not subjects or missing:
            raise BadValueError(f'{split}_subjects={subjects!r}: subject(s) '
                             f'{", ".join(missing) or "(none)"} not in root; present: '
                             f'{", ".join(present)}')
    shared = sorted(set(held['val']) & set(held['test']))
    if shared:
        raise BadValueError(f'val_subjects and test_subjects share {", ".join(shared)}')
    owner = {s: k for k, subjects in held.items() for s in subjects}
    splits = {s: [n for n in names if owner.get(subject_of(n), 'train') == s] for s in SPLITS}
    if not splits['train']:
        raise BadValueError('split_by=user leaves no training subject')
    return splits


def format_rml_stats(names, split):
    """Class counts of emotion and user, in {split}_stats.txt format."""
    paths = [f'{n}.avi' for n in names]
    labels = {'emo': [datasets.rml_emotion(p) for p in paths],
              'user': [datasets.rml_subject(p) for p in paths]}
    classes = {'emo': datasets.RML_EMOTIONS,
               'user': [f's{k + 1}' for k in range(max(labels['user'], default=-1) + 1)]}
    return format_counts(labels, classes, split)


def build_splits(root, data_path=None, *, seed=0, split_by='clip', sizes=(0.8, 0.1, 0.1),
                 val_subjects=('s7',), test_subjects=('s8',), overwrite=False,
                 workers=DEFAULT_WORKERS, cache=True, cache_dir='cache',
                 frame_jitter=datasets.RML_JITTER, backend='pyav', progress=True):
    """Write the split configs of the RML folder ``root``; returns the split.json record."""
    data_path = Path(data_path or DEFAULT_DATA_PATHS[split_by])
    if data_path.exists() and any(data_path.iterdir()) and not overwrite:
        raise ExistsError(f'data_path={str(data_path)!r} already exists and is not empty; pass '
                          '--overwrite=True to replace its files, or choose another --data_path')
    root = os.path.normpath(root)
    clips = list_clips(root)
    names = list(clips)
    splits = plan_rml_splits(names, seed=seed, split_by=split_by, sizes=sizes,
                             val_subjects=val_subjects, test_subjects=test_subjects)
    paths = {s: [clips[n] for n in splits[s]] for s in SPLITS}
    # every clip of every split decoded once (into the caches training reuses)
    paths, bad, variances = validate_splits(
        paths, cache=cache, cache_dir=cache_dir, frame_jitter=frame_jitter, backend=backend,
        workers=workers, progress=progress, decoder=datasets.RMLDecoder())
    empty = [s for s in SPLITS if not paths[s]]
    if empty:
        raise MissingError(f'no usable clips for split(s) {", ".join(empty)} under {root} '
                           f'({len(names)} AVI clips)'
                           + (f': {describe_bad(bad, len(names))}' if bad else ''))
    check_usable(root, paths, variances, len(names), 0, len(bad))
    splits = {s: [str(Path(p).relative_to(root).with_suffix('')) for p in paths[s]]
              for s in SPLITS}
    record = {'dataset': 'RML', 'seed': seed, 'split_by': split_by,
              'requested_sizes': list(sizes), 'sizes': {s: len(paths[s]) for s in SPLITS},
              'subjects': {s: sorted({subject_of(n) for n in splits[s]}) for s in SPLITS},
              'root': root, 'root_abs': os.path.abspath(root), 'listed': len(names),
              'dropped': {'bad': {os.path.relpath(p, root): r for p, r in sorted(bad.items())}},
              'image_var': variances[0], 'audio_var': variances[1]}
    labels = {s: [datasets.rml_emotion(p) for p in paths[s]] for s in SPLITS}
    write_split_folder(
        data_path, {s: (paths[s], labels[s], format_rml_stats(splits[s], s)) for s in SPLITS},
        variances, record, overwrite=overwrite)
    return record


def main(argv=None):
    cfg = configure(globals(), argv, choices=CHOICES)
    out = cfg['data_path'] or DEFAULT_DATA_PATHS[cfg['split_by']]
    record = build_splits(
        cfg['root'], out, seed=cfg['seed'], split_by=cfg['split_by'],
        sizes=tuple(cfg['split_sizes']), val_subjects=tuple(cfg['val_subjects']),
        test_subjects=tuple(cfg['test_subjects']), overwrite=cfg['overwrite'],
        workers=cfg['workers'], cache=cfg['cache'], cache_dir=cfg['cache_dir'],
        frame_jitter=cfg['frame_jitter'], backend=cfg['backend'], progress=cfg['progress'])
    print_record(record, out, extra=['subjects: ' + '; '.join(
        f'{s} {", ".join(v)}' for s, v in record['subjects'].items())])
    return record


if __name__ == '__main__':
    run_script(main)
