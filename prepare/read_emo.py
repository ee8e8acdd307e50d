"""Build EmoVoxCeleb split files: an EmoVoxCeleb-layout folder -> data_path/.

    python3 -m prepare.read_emo [--root=DIR] [--data_path=DIR] [--seed=0] [--split_by=speaker] ...

The input layout (one face track per key ``SPEAKER/VIDEO/TRACK``, VoxCeleb1's
``id10001/1zcIwhmdeo4/00001``):

    root/frames/KEY/000001.jpg ...   the track's face frames, numbered from 1
    root/wav/KEY.wav                 its speech: 16 kHz mono 16-bit PCM
    root/logits/KEY.npy              the teacher's logits per frame: (frames, 8)
                                     float32, FER+ order (datasets.FERPLUS)

Writes, for split in train / val / test (the seed's EmoVoxCelebDataset files):
    {split}_image.pkl   per item: (frame folder, number of frames)
    {split}_audio.pkl   per item: WAV path
    {split}_labels.pkl  per video: the teacher's logits per frame, (frames, 8) float32
    {split}_index.pkl   per item: its entry of {split}_labels.pkl
    {split}_stats.txt   items and frames per teacher arg-max class
and train_image_var.pkl / train_audio_var.pkl (variances of the training items'
centre frames in [0, 1] and of their 256x256 log-mels) and split.json. Paths
start with root as given (a relative root gives paths relative to the current
directory). Here an item is one track and its "video" is that track's logits,
so index is 0..n-1; the files keep the seed's indirection.

split_by='track' splits the shuffled tracks in the proportions of split_sizes;
'speaker' splits the shuffled speakers (no speaker in two splits). Every track is
checked first (frames numbered 000001.jpg.. without gaps that all decode, one finite
logits row per frame, 16 kHz WAV of at least 0.5 s), as read_cremad.py checks its
clips: a bad one is dropped, named with its reason in the output and in
split.json's 'dropped'; a split left without tracks stops the build, nothing written.
"""
import os
from collections import Counter
from pathlib import Path

import numpy as np

import datasets
from cmvq import atomic, media
from cmvq.configurator import configure
from cmvq.errors import (BadValueError, ExistsError, MissingError, UserError, one_line,
                         run_script)
from cmvq.progress import progress_bar
from cmvq.splits import SPLITS, RunningVariance, split_counts

# ----------------------------------------------------------------------------- config
root = 'synth_emo/EmoVoxCeleb'  # EmoVoxCeleb-layout folder (frames/, wav/, logits/); the twin
data_path = 'data_emo'          # output folder of the split files
seed = 0                        # split seed
split_by = 'track'              # 'track' (random) or 'speaker' (disjoint speakers)
split_sizes = (8, 1, 1)         # train, val, test proportions
overwrite = False               # True: replace the files of an existing data_path
progress = True                 # progress bars (plain lines when output is redirected)
# -----------------------------------------------------------------------------
CHOICES = {'split_by': ('track', 'speaker')}


def list_tracks(root):
    """Sorted track keys of root: the WAVs under root/wav (a key per WAV)."""
    wav_root = Path(root) / 'wav'
    if not wav_root.is_dir():
        raise MissingError(f'{wav_root} does not exist: root={str(root)!r} is not an '
                                'EmoVoxCeleb-layout folder (frames/, wav/, logits/)')
    keys = sorted(p.relative_to(wav_root).with_suffix('').as_posix()
                  for p in wav_root.rglob('*.wav'))
    if not keys:
        raise MissingError(f'{wav_root} holds no WAV files')
    return keys


def check_track(root, key):
    """(frame folder, number of frames, WAV, logits (T, 8)) of a well-formed track: frames
    numbered without gaps that all decode, one finite logits row per frame, 16 kHz
    audio of at least media.MIN_SECONDS. A UserError (BadValueError, MissingError,
    MediaError) names the file of a malformed one."""
    folder, wav, npy = datasets.track_paths(root, key)
    names = sorted(p.name for p in folder.glob('*.jpg')) if folder.is_dir() else []
    if not names:
        raise BadValueError(f'{folder}: no face frames (000001.jpg, ...)')
    if names != [datasets.frame_name(k) for k in range(len(names))]:
        raise BadValueError(f'{folder}: frames must be numbered 000001.jpg..'
                         f'{datasets.frame_name(len(names) - 1)} without gaps')
    for name in names:
        media.check_image(folder / name)
    if not npy.is_file():
        raise MissingError(f'{npy} does not exist (the teacher logits of {key})')
    try:
        logits = np.load(npy)
    except (OSError, ValueError, EOFError) as e:
        raise BadValueError(f'{npy} cannot be read as an array: {e}') from None
    if logits.shape != (len(names), len(datasets.FERPLUS)) or not np.isfinite(logits).all():
        raise BadValueError(f'{npy}: logits {logits.shape} must be finite and '
                         f'({len(names)}, {len(datasets.FERPLUS)}): one row per frame')
    samples, rate = media.read_wav(wav)
    if rate != datasets.EMO_RATE:
        raise BadValueError(f'{wav}: {rate} Hz; EmoVoxCeleb WAVs are {datasets.EMO_RATE} Hz')
    if len(samples) < media.MIN_SECONDS * rate:
        raise BadValueError(f'{wav}: too short: {len(samples) / rate:.3f} s of audio, minimum '
                            f'{media.MIN_SECONDS} s')
    return str(folder), len(names), str(wav), logits.astype(np.float32)


def check_tracks(root, keys, progress=True):
    """({key: check_track's tuple} of the good tracks, {key: reason} of the others)."""
    good, bad = {}, {}
    for key in progress_bar(keys, desc='check tracks', unit='track', enabled=progress):
        try:
            good[key] = check_track(root, key)
        except UserError as e:
            bad[key] = one_line(e)
    return good, bad


# ----------------------------------------------------------------------------- planning

def plan_splits(keys, *, seed=0, split_by='track', sizes=(8, 1, 1)):
    """{split: keys}, a pure function of its arguments; 'speaker' keeps each speaker
    (a key's first part) in one split."""
    rng = np.random.default_rng(seed)
    if split_by == 'track':
        order = [keys[i] for i in rng.permutation(len(keys))]
        bounds = np.cumsum(split_counts(len(order), sizes))[:-1]
        return dict(zip(SPLITS, map(list, np.split(np.array(order, dtype=object), bounds)),
                        strict=True))
    if split_by != 'speaker':
        raise BadValueError(f"split_by={split_by!r} is not 'track' or 'speaker'")
    speakers = sorted({k.split('/')[0] for k in keys})
    if len(speakers) < 3:
        raise BadValueError(f"split_by='speaker' needs >= 3 speakers, got {len(speakers)}")
    speakers = [speakers[i] for i in rng.permutation(len(speakers))]
    bounds = np.cumsum(split_counts(len(speakers), sizes))[:-1]
    owner = {s: k for k, group in enumerate(np.split(np.array(speakers), bounds)) for s in group}
    return {split: [k for k in keys if owner[k.split('/')[0]] == n]
            for n, split in enumerate(SPLITS)}


def format_stats(tracks, split):
    """Items (by the centre frame's teacher arg-max) and frames per FER+ class."""
    items = Counter(int(t[3][media.centre_index(t[1])].argmax()) for t in tracks)
    frames = Counter(int(c) for t in tracks for c in t[3].argmax(1))
    lines = [f'{split}: {len(tracks)} tracks, {sum(frames.values())} frames; '
             'teacher arg-max per class (centre frames | all frames):']
    lines += [f'  {name:10s} {items[c]:6d} | {frames[c]:8d}'
              for c, name in enumerate(datasets.FERPLUS)]
    return '\n'.join(lines) + '\n'


def compute_variances(tracks, progress=True):
    """(image_var, audio_var) over the centre frames in [0, 1] and the 256x256 log-mels."""
    image, audio = RunningVariance(), RunningVariance()
    for folder, count, wav, _ in progress_bar(tracks, desc='variances', unit='track',
                                              enabled=progress):
        face = media.read_jpeg(Path(folder) / datasets.frame_name(media.centre_index(count)),
                               media.IMAGE_SIZE)
        image.update(face / 255)
        samples, rate = media.read_wav(wav)
        audio.update(media.resized_log_mel(samples, rate, datasets.EMO_AUDIO_SIZE,
                                           **datasets.EMO_MEL))
    return float(image.variance), float(audio.variance)


# ----------------------------------------------------------------------------- main

def build_splits(root, data_path, *, seed=0, split_by='track', sizes=(8, 1, 1),
                 overwrite=False, progress=True):
    """Check every track of root (a bad one is dropped, its reason recorded in split.json),
    then write the split files into data_path as a whole (atomic.write_folder); returns
    the split.json record. Refuses (FileExistsError) a non-empty data_path unless
    overwrite, and (MissingError) a split left without tracks."""
    out = Path(data_path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExistsError(f'data_path {str(out)!r} already exists and is not empty; '
                              'pass overwrite=True (--overwrite=True) to replace its files')
    root = os.path.normpath(root)
    keys = list_tracks(root)
    tracks, bad = check_tracks(root, keys, progress)
    # planned over every track, then the bad ones left out: a bad track moves no other
    splits = {s: [k for k in names if k in tracks] for s, names in
              plan_splits(keys, seed=seed, split_by=split_by, sizes=sizes).items()}
    empty = [s for s, names in splits.items() if not names]
    if empty:
        first = '; '.join(f'{k}: {why}' for k, why in list(bad.items())[:3])
        raise MissingError(f'no usable tracks for split(s) {", ".join(empty)} under {root}: '
                           f'{len(bad)} of {len(keys)} tracks fail their checks ({first})')
    image_var, audio_var = compute_variances([tracks[k] for k in splits['train']], progress)
    record = {'dataset': 'EmoVoxCeleb', 'seed': seed, 'split_by': split_by,
              'requested_sizes': list(sizes), 'sizes': {s: len(v) for s, v in splits.items()},
              'root': root, 'root_abs': os.path.abspath(root), 'tracks': len(keys),
              'dropped': {'bad': bad}, 'image_var': image_var, 'audio_var': audio_var}

    def fill(folder):
        for split, names in splits.items():
            rows = [tracks[k] for k in names]
            atomic.write_pickle(folder / f'{split}_image.pkl', [(r[0], r[1]) for r in rows])
            atomic.write_pickle(folder / f'{split}_audio.pkl', [r[2] for r in rows])
            atomic.write_pickle(folder / f'{split}_labels.pkl', [r[3] for r in rows])
            atomic.write_pickle(folder / f'{split}_index.pkl', list(range(len(rows))))
            atomic.write_bytes(folder / f'{split}_stats.txt', format_stats(rows, split))
        atomic.write_pickle(folder / 'train_image_var.pkl', image_var)
        atomic.write_pickle(folder / 'train_audio_var.pkl', audio_var)
        atomic.write_json(folder / 'split.json', record)
    atomic.write_folder(out, fill, overwrite=overwrite)  # all new files or none
    return record


def main(argv=None):
    cfg = configure(globals(), argv, choices=CHOICES)
    record = build_splits(cfg['root'], cfg['data_path'], seed=cfg['seed'],
                          split_by=cfg['split_by'], sizes=tuple(cfg['split_sizes']),
                          overwrite=cfg['overwrite'], progress=cfg['progress'])
    sizes = ', '.join(f'{s} {n}' for s, n in record['sizes'].items())
    print(f'wrote {cfg["data_path"]}: {sizes} tracks ({cfg["split_by"]} split, '
          f'seed {cfg["seed"]}); train image variance {record["image_var"]:.6g}, '
          f'audio variance {record["audio_var"]:.6g}')
    bad = record['dropped']['bad']
    print(f'dropped {len(bad)} bad track(s)' + ''.join(f'\n  {k}: {why}' for k, why in
                                                        bad.items()))


if __name__ == '__main__':
    run_script(main)
