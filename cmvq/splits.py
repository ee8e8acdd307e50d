"""Split config folders: what every split builder shares.

A split config folder holds, for split in train / val / test, {split}_videos.pkl
(clip paths), {split}_labels.pkl (labels), {split}_stats.txt (class counts), plus
train_image_var.pkl / train_audio_var.pkl (variances of the training clips' centre
face crops in [0, 1] and of their log-mels) and split.json (how it was made). The
builders (read_cremad.py, prepare/read_rml.py) plan their splits, then decode every
clip once here (validate_splits: bad clips are dropped, the variances measured,
the caches training reuses are built) and write the folder as a whole.
"""
import itertools
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import datasets
from cmvq import atomic, media
from cmvq.cache import DEFAULT_WORKERS
from cmvq.errors import BadValueError, MissingError
from cmvq.progress import progress_bar

SPLITS = ('train', 'val', 'test')
PAPER_SIZES = (5954, 744, 744)  # train, val, test of CREMA-D's 7,442 clips (the paper's)


def split_counts(n, sizes=PAPER_SIZES):
    """Split n items in the proportions of sizes: (train, val, test), val/test >= 1 if n >= 3."""
    total = sum(sizes)
    val, test = (round(n * s / total) for s in sizes[1:])
    if n >= 3:
        val, test = max(val, 1), max(test, 1)
    return n - val - test, val, test


def check_disjoint(split_paths, where='', name=None):
    """Raise BadValueError if a clip is in two splits: {split: paths}; clips are told apart
    by name(path) (default: the file name, CREMA-D's clip name)."""
    name = name or datasets.clip_name
    names = {s: {name(p) for p in paths} for s, paths in split_paths.items()}
    for a, b in itertools.combinations(names, 2):
        both = sorted(names[a] & names[b])
        if both:
            raise BadValueError(f'{where}: {len(both)} clips are in both {a} and {b} (e.g. '
                                f'{", ".join(both[:3])}); rebuild the split configs')


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


def validate_splits(paths, *, cache=True, cache_dir='cache',
                    frame_jitter=datasets.CREMAD_JITTER, backend='pyav',
                    workers=DEFAULT_WORKERS, progress=True, decoder=None):
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
    for (split, path), item in progress_bar(zip(jobs, items, strict=True), total=len(jobs),
                                            desc='decode centres', unit='clip',
                                            enabled=progress):
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
    for start in progress_bar(range(0, len(frames), chunk), desc='variances',
                              enabled=progress):
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


def print_record(record, data_path, extra=()):
    """What a split builder (read_cremad.py, prepare/read_rml.py) prints about the folder it wrote:
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

