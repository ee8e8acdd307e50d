"""Every check that can fail without training, run before a run folder exists.

A failure is a UserError whose one line names the file or value; nothing is
written. Every dataset is checked: a data_path another dataset's builder wrote, its
split files, the clips (CREMA-D, RML), frames and WAVs (EmoVoxCeleb) or feature
arrays (RML_feat) they name, the variances, and the free space the run's outputs
need. The run folder then records what each split held (split_fingerprint), so a
later evaluation or resume can tell when a split changed (check_splits).
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
from cmvq import cache, pickles
from cmvq.config import build_model
from cmvq.errors import BadValueError, MissingError, NoSpaceError
from cmvq.loaders import frame_jitter
from cmvq.splits import SPLITS, check_disjoint
from read_variances import read_variances

# The command that writes each dataset's data_path.
BUILDERS = {'CREMA-D': 'python3 read_cremad.py', 'RML': datasets.RML_BUILDER,
            'RML_probe': datasets.RML_BUILDER, 'EmoVoxCeleb': datasets.EMO_BUILDER,
            'RML_feat': datasets.FEAT_BUILDER}
# What a run writes besides its checkpoints: the last test batch's inputs and
# reconstructions (valid_*.pkl: 2 x (3x128x128 + 256x256) float32 an item), plus logs,
# history and plots (OUTPUT_MARGIN).
ITEM_OUTPUT_BYTES = 2 * (3 * 128 * 128 + 256 * 256) * 4
OUTPUT_MARGIN = 64 * 2 ** 20
# model.pt and last.pt (the model plus Adam's two moments) are each written beside
# the old file before it is replaced: 2 + 2 x 3 model-sized files at the peak.
CHECKPOINT_COPIES = 8


def preflight(cfg, splits=SPLITS):
    """Every check that can fail without training, run before a run folder exists:
    data_path exists and is a split folder of cfg['dataset'] (not another dataset's);
    the split files of every split are well-formed and the media of `splits` present
    and sound (check_media); the variances are finite and > 0; results_dir (and
    cache_dir) writable, with free space for the caches still to build and, for a
    training run ('train' in splits), for its checkpoints and outputs. Raises a
    UserError whose one line names the file or value; writes nothing."""
    data = Path(cfg['data_path'])
    if not data.is_dir():
        raise MissingError(f'data_path={str(data)!r} does not exist: build it with '
                           f'{BUILDERS[cfg["dataset"]]} --data_path={data}')
    check_kind(cfg)
    check_media(cfg, splits)
    read_variances(data, cfg['layer'] if cfg['dataset'] == 'RML_feat' else None,
                   builder=BUILDERS[cfg['dataset']])
    check_writable('results_dir', cfg['results_dir'])
    if 'train' in splits:
        check_run_space(cfg)


def folder_kind(data_path):
    """The dataset whose builder wrote data_path ('CREMA-D', 'RML', 'EmoVoxCeleb',
    'RML_feat'), told by its files; None when it cannot be told."""
    data = Path(data_path)
    if (data / 'features.json').is_file():
        return 'RML_feat'
    if (data / 'train_index.pkl').is_file():
        return 'EmoVoxCeleb'
    if not (data / 'train_labels.pkl').is_file():
        return None
    labels = pickles.read(data / 'train_labels.pkl')
    if isinstance(labels, (list, tuple)) and labels:
        if all(isinstance(x, (list, tuple)) for x in labels):
            return 'CREMA-D'
        if all(pickles.is_int(x) for x in labels):
            return 'RML'
    return None


def check_kind(cfg):
    """BadValueError when data_path is a split folder of another dataset."""
    kind, want = folder_kind(cfg['data_path']), cfg['dataset']
    if kind is not None and kind != {'RML_probe': 'RML'}.get(want, want):
        raise BadValueError(f'data_path={str(cfg["data_path"])!r} is a {kind} folder '
                            f'({BUILDERS[kind]}), not a {want} one: give dataset={kind!r}, '
                            f'or build a {want} folder with {BUILDERS[want]}')


def check_media(cfg, splits=SPLITS):
    """The split files of every split of cfg's data_path, and what `splits` read."""
    data = cfg['data_path']
    if cfg['dataset'] == 'RML_feat':
        for split in splits:  # reads labels and array headers only (memory-mapped)
            datasets.RMLFeatDataset(data, split, layer=cfg['layer'])
    elif cfg['dataset'] == 'EmoVoxCeleb':
        lists = {s: datasets.load_emo_split(data, s) for s in SPLITS}
        for split in splits:
            datasets.check_emo_tracks(lists[split], f'{data} split {split!r}')
    else:
        check_clips(cfg, check_split_files(cfg, splits))


def check_split_files(cfg, splits=SPLITS):
    """Check the three split configs of a CREMA-D or RML data_path (types, alignment,
    label ranges, disjoint) and that the clips of `splits` exist: {split: resolved
    paths}."""
    data, rml = cfg['data_path'], cfg['dataset'] in datasets.RML_DATASETS
    if rml:
        loaded = {s: datasets.load_rml_split(data, s) for s in SPLITS}
    else:
        loaded = {s: datasets.load_split(data, s) for s in SPLITS}
        for split, (paths, labels) in loaded.items():
            datasets.check_aligned(paths, labels, where=f'{data} split {split!r}')
    check_disjoint({s: paths for s, (paths, _) in loaded.items()}, where=str(data),
                   name=datasets.rml_clip_name if rml else None)
    resolve = datasets.rml_resolve_paths if rml else datasets.resolve_paths
    resolved = {s: resolve(loaded[s][0], cfg.get('media_root')) for s in splits}
    hint = (f'set media_root to your {cfg["dataset"]} copy or rebuild the split configs with '
            f'{BUILDERS[cfg["dataset"]]}')
    for paths in resolved.values():
        cache.check_clips_exist(paths, hint=hint)
    return resolved


def check_clips(cfg, paths):
    """The container checks (media.check_clip, ~2 ms a clip) of the clips of
    {split: paths} whose decode-once cache is not built yet (its build checked them),
    and free space for those caches."""
    rml = cfg['dataset'] in datasets.RML_DATASETS
    decoder = (datasets.rml_decoder(cfg.get('audio_geometry') or 'RML', cfg['modify_modal'])
               if rml else None)
    unchecked = list(paths.values())
    if cfg['cache']:
        check_writable('cache_dir', cfg['cache_dir'])
        params = datasets.cache_params(frame_jitter(cfg), decoder=decoder)
        unchecked = [p for p in unchecked if cache.damage(
            Path(cfg['cache_dir']) / cache.fingerprint(p, params), len(p), params)]
        cache.check_free_space(cfg['cache_dir'], sum(map(len, unchecked)), params)
    clips = [p for split_paths in unchecked for p in split_paths]
    if rml:  # frames 240 or 480 high, at 30 fps
        datasets.check_clips(clips, size=None, fps=datasets.RML_FPS)
    else:
        datasets.check_clips(clips)


def check_writable(key, folder):
    """Raise a UserError unless `folder` is (or can be created as) a writable folder."""
    path = _existing(folder)
    if not path.is_dir():
        raise BadValueError(f'{key}={str(folder)!r}: {path} is a file, not a folder')
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadValueError(f'{key}={str(folder)!r}: {path} is not writable; choose another '
                            f'--{key}')


def _existing(folder):
    """folder, or its nearest existing parent."""
    path = Path(folder)
    while not path.exists():
        path = path.parent
    return path


def check_run_space(cfg):
    """NoSpaceError unless results_dir's disk holds a training run's checkpoints (each
    written beside the old one, then renamed) and outputs."""
    weights = sum(t.numel() * t.element_size() for t in build_model(cfg).state_dict().values())
    need = CHECKPOINT_COPIES * weights + cfg['batch_size'] * ITEM_OUTPUT_BYTES + OUTPUT_MARGIN
    free = shutil.disk_usage(_existing(cfg['results_dir'])).free
    if need > free:
        raise NoSpaceError(f'not enough free space in results_dir={cfg["results_dir"]!r} for '
                           f"the run's checkpoints and outputs: they need {need / 1e9:.2f} GB, "
                           f'{free / 1e9:.2f} GB are free (free some, or set results_dir '
                           'elsewhere)')


def split_fingerprint(cfg):
    """{split: {'clips', 'sha1', 'names'}}: what each split of cfg['data_path'] holds
    (CREMA-D: clip names and labels; other datasets: the split files' bytes)."""
    out = {}
    for split in SPLITS:
        h = hashlib.sha1()
        if cfg['dataset'] == 'CREMA-D':
            paths, labels = datasets.load_split(cfg['data_path'], split)
            names = [datasets.clip_name(p) for p in paths]
            h.update(json.dumps([names, labels]).encode())
        else:
            names = None
            for f in sorted(Path(cfg['data_path']).glob(f'{split}_*.pkl')):
                h.update(f.name.encode() + b'\0' + f.read_bytes())
        out[split] = {'clips': None if names is None else len(names), 'sha1': h.hexdigest(),
                      'names': names}
    return out


def check_splits(cfg, run_dir, splits=('test',), action='evaluate'):
    """None if `splits` of data_path are the ones run_dir was trained with (or the run
    predates splits.json); else a line saying how they changed, returned if
    cfg['allow_split_change'] and raised (BadValueError) otherwise."""
    saved_path = Path(run_dir) / 'splits.json'
    if not saved_path.is_file():
        return None
    saved, now = json.loads(saved_path.read_text()), split_fingerprint(cfg)
    changed = [s for s in splits if saved[s]['sha1'] != now[s]['sha1']]
    if not changed:
        return None
    msg = (f'the {" and ".join(changed)} split{"s" if len(changed) > 1 else ""} of '
           f'{cfg["data_path"]} changed since run {Path(run_dir).name} trained')
    if saved['train']['names'] and now['test']['names']:
        trained = set(saved['train']['names'])
        seen = sum(n in trained for n in now['test']['names'])
        msg += (f' ({now["test"]["clips"]} test clips now, {saved["test"]["clips"]} then; '
                f'{seen} of them were in its training split)')
    if not cfg.get('allow_split_change'):
        raise BadValueError(msg + f'; restore that split, or pass --allow_split_change=True '
                            f'to {action} anyway (the result then says so)')
    return msg
