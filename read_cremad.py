"""Build CREMA-D split configs: a CREMA-D tree -> data_path/.

    python read_cremad.py [--root=DIR] [--data_path=DIR] [--seed=0] [--split_by=actor] ...

Writes, for split in train / val / test:
    {split}_videos.pkl  list of FLV paths, 'root/VideoFlash/NAME.flv' with root as
                        given: a relative root gives paths relative to the current
                        directory (like the original; run from the repo dir), an
                        absolute root gives absolute paths. CREMADDataset(root=...)
                        remaps them onto another checkout.
    {split}_labels.pkl  the 8 label lists of datasets.LABEL_NAMES, aligned with the paths
    {split}_stats.txt   class counts per label
and train_image_var.pkl / train_audio_var.pkl (floats: variance of the training
clips' evaluation face crops in [0, 1] and of their log-mels) and split.json
(seed, split_by, sizes, root, dropped clips).

The clip list is the tree's SentenceFilenames.csv. Clips are split first (so the
published sizes 5954 / 744 / 744 of all 7,442 names hold for any seed) and then
faulty clips and clips with no FLV are dropped from both paths and labels.
"""
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import atomic
import datasets
from errors import BadValueError, ExistsError, MissingError, run_script
import media

# ----------------------------------------------------------------------------- config
root = 'synth_cremad/CREMA-D'   # CREMA-D checkout (VideoFlash/, CSVs); default: the twin
data_path = 'data_cremad'       # output folder of the split configs
seed = 0                        # split seed
split_by = 'clip'               # 'clip' (the paper: actors overlap) or 'actor' (disjoint actors)
split_sizes = (5954, 744, 744)  # train, val, test of 7,442 clips; scaled for other counts
faulty = ('1064_TIE_SAD_XX', '1064_IEO_DIS_MD', '1076_MTI_NEU_XX', '1076_MTI_SAD_XX')
overwrite = False               # True: replace an existing data_path (swapped as a whole)
workers = datasets.DEFAULT_WORKERS  # processes decoding clips for the variances
cache = True                    # compute the variances through the decode-once cache
cache_dir = 'cache'             # where that cache lives (reused by training)
frame_jitter = 15               # training frame window of the cache: centre +- jitter
backend = 'pyav'                # FLV reader: 'pyav' or 'moviepy' (the original's)
progress = True                 # progress bars
# -----------------------------------------------------------------------------
CHOICES = {'split_by': ('clip', 'actor'), 'backend': ('pyav', 'moviepy')}
SPLITS = ('train', 'val', 'test')


# ----------------------------------------------------------------------------- metadata

def read_names(root):
    """Clip names listed in root/SentenceFilenames.csv, in file order."""
    return list(_read_csv(Path(root) / 'SentenceFilenames.csv', 'Filename')['Filename'])


def read_demographics(path):
    """VideoDemographics.csv (or the folder holding it) -> {actor ID: row dict}."""
    path = Path(path)
    if path.is_dir():
        path = path / 'VideoDemographics.csv'
    table = _read_csv(path, 'ActorID', 'Age', 'Sex', 'Race', 'Ethnicity')
    return {int(row['ActorID']): row for row in table.to_dict('records')}


def _read_csv(path, *columns):
    """A CREMA-D CSV as a DataFrame; a missing file or column is a UserError naming it."""
    if not path.is_file():
        where = path.parent
        hint = ('it does not exist' if not where.exists() else
                'it is empty' if where.is_dir() and not any(where.iterdir()) else
                f'it holds no {path.name}')
        raise MissingError(f'{path} is missing: root={str(where)!r} must be a CREMA-D checkout '
                           f'({hint}); give --root=DIR or make a twin with synth_cremad.py')
    table = pd.read_csv(path)
    lacking = [c for c in columns if c not in table.columns]
    if lacking:
        raise BadValueError(f'{path} has no column {", ".join(map(repr, lacking))}; '
                            f'expected the CREMA-D columns {", ".join(map(repr, columns))}')
    return table


def clip_labels(name, demographics):
    """The 8 int labels of datasets.LABEL_NAMES for clip ``name``."""
    actor, sentence, emotion, level = datasets.parse_name(name)
    person = demographics.get(actor + datasets.FIRST_ACTOR)
    if person is None:
        raise BadValueError(f'actor of {name} is not in VideoDemographics.csv')
    age = min(max(int(person['Age']) // 10 - 2, 0), len(datasets.AGES) - 1)
    return [actor, sentence, emotion, level, age, datasets.GENDERS.index(person['Sex']),
            datasets.RACES.index(person['Race']), datasets.ETHNICITIES.index(person['Ethnicity'])]


def encode_labels(names, demographics):
    """Names -> the 8 aligned label lists."""
    rows = [clip_labels(n, demographics) for n in names]
    return [[row[k] for row in rows] for k in range(len(datasets.LABEL_NAMES))]


# ----------------------------------------------------------------------------- planning

def split_counts(n, sizes=(5954, 744, 744)):
    """Split n items in the proportions of sizes: (train, val, test), val/test >= 1 if n >= 3."""
    total = sum(sizes)
    val, test = (round(n * s / total) for s in sizes[1:])
    if n >= 3:
        val, test = max(val, 1), max(test, 1)
    return n - val - test, val, test


def plan_splits(names, demographics, *, seed=0, split_by='clip', sizes=(5954, 744, 744),
                drop=()):
    """Assign clip names to splits; a pure function of its arguments.

    Returns ({split: names in random order}, dropped), dropped = the names of
    ``drop`` that were listed, removed after splitting. split_by='clip' splits
    the shuffled names in the proportions of ``sizes``; 'actor' splits the
    shuffled actors in those proportions (each split at least one actor), so
    no actor is in two splits and the clip counts are approximate.
    """
    names = sorted(set(names))
    unknown = sorted({n.split('_')[0] for n in names} - {str(a) for a in demographics})
    if unknown:
        raise BadValueError(f'actors {", ".join(unknown)} are not in VideoDemographics.csv')
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    if split_by == 'clip':
        bounds = np.cumsum(split_counts(len(order), sizes))
        parts = np.split(np.array(order, dtype=object), bounds[:-1])
    elif split_by == 'actor':
        actors = sorted({n.split('_')[0] for n in names})
        if len(actors) < 3:
            raise BadValueError(f"split_by='actor' needs >= 3 actors, got {len(actors)}; "
                                "use split_by='clip'")
        actors = [actors[i] for i in rng.permutation(len(actors))]
        bounds = np.cumsum(split_counts(len(actors), sizes))
        owner = {a: k for k, group in enumerate(np.split(np.array(actors), bounds[:-1]))
                 for a in group}
        parts = [[n for n in order if owner[n.split('_')[0]] == k] for k in range(3)]
    else:
        raise BadValueError(f"split_by={split_by!r} is not 'clip' or 'actor'")
    drop = set(drop)
    splits = {s: [n for n in part if n not in drop] for s, part in zip(SPLITS, parts, strict=True)}
    return splits, sorted(drop.intersection(names))


# ----------------------------------------------------------------------------- outputs

def format_stats(labels, split):
    """Class counts per label, in the published {split}_stats.txt format."""
    classes = {'actor': None, 'sentence': datasets.SENTENCES, 'emo': datasets.EMOTIONS,
               'level': datasets.LEVELS, 'age': datasets.AGES, 'gender': datasets.GENDERS,
               'race': datasets.RACES, 'ethnic': datasets.ETHNICITIES}
    return format_counts(dict(zip(datasets.LABEL_NAMES, labels, strict=True)), classes, split)


def format_counts(labels, classes, split):
    """{label name: int list} -> class counts per label ({split}_stats.txt format);
    classes: {label name: class names, or None for numbered classes 01, 02, ...}."""
    lines = ['']
    for name, values in labels.items():
        counts, total = Counter(values), len(values)
        names = classes[name] or [f'{k + 1:02d}' for k in range(max(values, default=-1) + 1)]
        lines.append(f'* {name}')
        for k, cls in enumerate(names):
            share = 100 * counts[k] / total if total else 0.0
            lines.append(f'- Class {cls}: {counts[k]} samples, {share:.2f} %')
        lines.append(f'Total {name} {split} samples: {total}')
    return '\n'.join(lines) + '\n'


class RunningVariance:
    """Variance of all values fed in chunks, in constant memory (Chan et al. merge)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values):
        values = np.asarray(values, dtype=np.float64).ravel()
        n = values.size
        if n == 0:
            return
        mean = values.mean()
        m2 = ((values - mean) ** 2).sum()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def variance(self):
        return self.m2 / self.count if self.count else float('nan')


def compute_variances(paths, *, cache=True, cache_dir='cache', frame_jitter=15, backend='pyav',
                      workers=datasets.DEFAULT_WORKERS, progress=True, decoder=None):
    """(image_var, audio_var): variance over all pixels in [0, 1] of the evaluation
    (centre) face crops and over all log-mel values of the clips at ``paths``.
    A clip that fails (MediaError) stops it; validate_splits drops such clips."""
    kept, bad, variances = validate_splits(
        {'train': paths}, cache=cache, cache_dir=cache_dir, frame_jitter=frame_jitter,
        backend=backend, workers=workers, progress=progress, decoder=decoder)
    if bad:
        raise media.MediaError(datasets.describe_bad(bad, len(paths)))
    return variances


def validate_splits(paths, *, cache=True, cache_dir='cache', frame_jitter=15, backend='pyav',
                    workers=datasets.DEFAULT_WORKERS, progress=True, decoder=None):
    """Decode every clip of every split once and measure the training variances.

    paths: {split: clip paths}. Returns ({split: kept paths}, {path: reason} of the
    clips that are missing, undecodable or fail media.check_clip, (image_var,
    audio_var) of the kept 'train' clips). cache: through the decode-once caches
    that training reuses; else only the centre frames are decoded. decoder: None
    (CREMA-D's datasets.decode_clip) or another dataset's, e.g. datasets.RMLDecoder().
    """
    if cache:
        kept, bad = {}, {}
        for split, split_paths in paths.items():
            kept[split], dropped, folder = datasets.build_cache_dropping(
                split_paths, cache_dir, frame_jitter=frame_jitter, backend=backend,
                workers=workers, progress=progress, decoder=decoder)
            bad.update(dropped)
            if split == 'train':
                variances = _cache_variances(folder, frame_jitter, progress)
        return kept, bad, variances
    image, audio, bad = RunningVariance(), RunningVariance(), {}
    jobs = [(s, p) for s, split_paths in paths.items() for p in split_paths]
    items = _decode_centres([p for _, p in jobs], backend, workers, decoder)
    for (split, path), item in tqdm(zip(jobs, items, strict=True), total=len(jobs),
                                    desc='decode centres', unit='clip', disable=not progress):
        if isinstance(item, str):
            bad[path] = item
        elif split == 'train':
            image.update(item[0] / 255)
            audio.update(item[1])
    kept = {s: [p for p in split_paths if p not in bad] for s, split_paths in paths.items()}
    return kept, bad, (float(image.variance), float(audio.variance))


def _cache_variances(folder, frame_jitter, progress, chunk=64):
    frames = np.load(folder / 'frames.npy', mmap_mode='r')  # (N, W, 128, 128, 3)
    specs = np.load(folder / 'specs.npy', mmap_mode='r')    # (N, 256, 256)
    image, audio = RunningVariance(), RunningVariance()
    for start in tqdm(range(0, len(frames), chunk), desc='variances', disable=not progress):
        image.update(frames[start:start + chunk, frame_jitter] / 255)
        audio.update(specs[start:start + chunk])
    return float(image.variance), float(audio.variance)


def _decode_centres(paths, backend, workers, decoder=None):
    """Yield (centre face crop (128, 128, 3) uint8, log-mel (256, 256)) per clip, in
    order, or the reason (a str) it cannot be used."""
    jobs = [(p, backend, decoder) for p in paths]
    if workers <= 1:
        yield from map(_decode_centre, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_decode_centre, jobs, chunksize=4)


def _decode_centre(job):
    path, backend, decoder = job
    try:
        faces, spec = (decoder or datasets.decode_clip)(path, 0, backend)
    except media.MediaError as e:
        return e.reason
    return faces[0], spec


# ----------------------------------------------------------------------------- main

def build_splits(root, data_path, *, seed=0, split_by='clip', sizes=(5954, 744, 744),
                 faulty=faulty, overwrite=False, workers=datasets.DEFAULT_WORKERS, cache=True,
                 cache_dir='cache', frame_jitter=15, backend='pyav', progress=True):
    """Write the split configs of the CREMA-D tree ``root`` into ``data_path``.

    Refuses (ExistsError, a FileExistsError) to write into a non-empty data_path
    unless overwrite, and (MissingError) a root without the CSVs or without any
    listed FLV. Returns the split.json record.
    """
    out = Path(data_path)
    atomic.remove_stale_temps(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise ExistsError(f'data_path={str(out)!r} is a file; choose a folder for --data_path')
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExistsError(f'data_path={str(out)!r} already exists and is not empty; pass '
                          '--overwrite=True to replace its files, or choose another --data_path')
    root = os.path.normpath(root)
    names = read_names(root)
    missing = sorted(n for n in set(names) if not _flv(root, n).is_file())
    if names and len(missing) == len(set(names)):
        raise MissingError(f'none of the {len(set(names))} clips listed in {root}/'
                           f'SentenceFilenames.csv has an FLV in {root}/VideoFlash; fetch the '
                           'media (git lfs pull) or give the right --root')
    demographics = read_demographics(root)
    splits, dropped = plan_splits(names, demographics, seed=seed, split_by=split_by,
                                  sizes=sizes, drop=set(faulty) | set(missing))
    paths = {s: [str(_flv(root, n)) for n in splits[s]] for s in SPLITS}
    check_usable(root, paths, None, len(set(names)), len(missing), 0)
    paths, bad, (image_var, audio_var) = validate_splits(
        paths, cache=cache, cache_dir=cache_dir, frame_jitter=frame_jitter,
        backend=backend, workers=workers, progress=progress)
    bad = {Path(p).stem: reason for p, reason in bad.items()}
    splits = {s: [n for n in splits[s] if n not in bad] for s in SPLITS}
    check_usable(root, paths, (image_var, audio_var), len(set(names)), len(missing), len(bad))
    record = {'seed': seed, 'split_by': split_by, 'requested_sizes': list(sizes),
              'sizes': {s: len(paths[s]) for s in SPLITS}, 'root': root,
              'root_abs': os.path.abspath(root), 'listed': len(set(names)),
              'dropped': {'faulty': [n for n in dropped if n in set(faulty)],
                          'missing': [n for n in dropped if n not in set(faulty)],
                          'bad': dict(sorted(bad.items()))},
              'image_var': image_var, 'audio_var': audio_var}
    labels = {s: encode_labels(splits[s], demographics) for s in SPLITS}
    write_split_folder(out, {s: (paths[s], labels[s], format_stats(labels[s], s))
                             for s in SPLITS},
                       (image_var, audio_var), record, overwrite=overwrite)
    return record


def check_usable(root, paths, variances, listed, missing, bad):
    """Raise MissingError unless every split has clips and both variances (unless None)
    are finite and > 0."""
    empty = [s for s, split_paths in paths.items() if not split_paths]
    if empty:
        raise MissingError(f'no usable clips for split(s) {", ".join(empty)} under {root}: '
                         f'{listed} listed in SentenceFilenames.csv, {missing} without an FLV '
                         f'in VideoFlash/, {bad} failing their checks')
    for name, value in zip(('image', 'audio'), variances or (), strict=False):
        if not np.isfinite(value) or value <= 0:
            raise BadValueError(f'the training {name} variance is {value}: the clips under '
                             f'{root} carry no {name} signal')


def write_split_folder(data_path, splits, variances, record, *, overwrite=False):
    """Write a split config folder as a whole: all new files or none.

    splits: {split: (paths, labels (aligned lists), stats text)}; variances:
    (image_var, audio_var) of the training split; record: the split.json dict.
    The files go to a temporary sibling folder renamed into place
    (atomic.write_folder): an interruption leaves the old folder or the new
    one, never a mix; overwrite=False refuses a non-empty data_path
    (FileExistsError), even against a concurrent writer.
    """
    def fill(folder):
        for s, (paths, labels, stats) in splits.items():
            atomic.write_pickle(folder / f'{s}_videos.pkl', list(paths))
            atomic.write_pickle(folder / f'{s}_labels.pkl', labels)
            atomic.write_bytes(folder / f'{s}_stats.txt', stats)
        for name, value in zip(('train_image_var.pkl', 'train_audio_var.pkl'), variances,
                               strict=True):
            atomic.write_pickle(folder / name, value)
        atomic.write_json(folder / 'split.json', record)
    atomic.write_folder(data_path, fill, overwrite=overwrite)


def prepare_twin(twin_root, data_path, *, seed=0, workers=datasets.DEFAULT_WORKERS,
                 cache_dir='cache', frame_jitter=15, progress=True, **twin):
    """Split configs of a synthetic twin at twin_root, both made if missing (the demo's
    and the benchmark's data). twin: synth_cremad.generate's other keywords
    (num_actors, like, duration_scale, ...)."""
    if (Path(data_path) / 'train_videos.pkl').is_file():
        return
    import synth_cremad
    print(f'{data_path} is missing: making a synthetic twin at {twin_root} and its splits')
    synth_cremad.generate(root=twin_root, seed=seed, workers=workers, progress=progress, **twin)
    build_splits(twin_root, data_path, seed=seed, workers=workers, cache_dir=cache_dir,
                 frame_jitter=frame_jitter, progress=progress)


def _flv(root, name):
    return Path(root) / 'VideoFlash' / f'{name}.flv'


def main():
    from configurator import configure
    cfg = configure(globals(), choices=CHOICES)
    record = build_splits(
        cfg['root'], cfg['data_path'], seed=cfg['seed'], split_by=cfg['split_by'],
        sizes=tuple(cfg['split_sizes']), faulty=tuple(cfg['faulty']), overwrite=cfg['overwrite'],
        workers=cfg['workers'], cache=cfg['cache'], cache_dir=cfg['cache_dir'],
        frame_jitter=cfg['frame_jitter'], backend=cfg['backend'], progress=cfg['progress'])
    print_record(record, cfg['data_path'])


def print_record(record, data_path, extra=()):
    """What a split builder (read_cremad.py, read_rml.py) prints about the folder it wrote:
    split sizes, extra lines, dropped clips with their reasons, the training variances."""
    sizes = ', '.join(f'{s} {n}' for s, n in record['sizes'].items())
    print(f'wrote {data_path}: {sizes} clips ({record["split_by"]} split, seed {record["seed"]})')
    for line in extra:
        print(line)
    for reason, dropped in record['dropped'].items():
        print(f'dropped {len(dropped)} {reason} clip(s): {", ".join(dropped) or "-"}')
    for name, why in record['dropped']['bad'].items():
        print(f'  {name}: {why}')
    print(f'train image variance {record["image_var"]:.6g}, audio variance '
          f'{record["audio_var"]:.6g}')


if __name__ == '__main__':
    run_script(main)
