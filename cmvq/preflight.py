"""Every check that can fail without training, run before a run folder exists.

A failure is a UserError whose one line names the file or value; nothing is
written. The run folder then records what each split held (split_fingerprint), so
a later evaluation can tell when the test split changed (check_test_split).
"""
import hashlib
import json
import os
from pathlib import Path

import datasets
from cmvq import cache
from cmvq.errors import BadValueError, MissingError
from cmvq.loaders import frame_jitter, train_variances
from cmvq.splits import SPLITS, check_disjoint

# The command that writes each dataset's data_path.
BUILDERS = {'CREMA-D': 'python3 read_cremad.py', 'RML': datasets.RML_BUILDER,
            'RML_probe': datasets.RML_BUILDER, 'EmoVoxCeleb': 'python3 -m prepare.read_emo',
            'RML_feat': 'python3 -m prepare.make_features'}


def preflight(cfg, splits=SPLITS):
    """Every check that can fail without training, run before a run folder exists.

    data_path exists; its variances are finite and > 0;
    its split files are well-formed (types, 8 aligned label lists in range) with
    no clip in two splits and every clip of `splits` present and passing the
    container checks (media.check_clip, ~2 ms a clip; skipped for splits whose
    cache exists, as its build checked them); results_dir (and cache_dir)
    writable, with enough free space for the caches still to build.
    Raises a UserError whose one line names the file or value; writes nothing.
    """
    data = Path(cfg['data_path'])
    if not data.is_dir():
        raise MissingError(f'data_path={str(data)!r} does not exist: build it with '
                           f'{BUILDERS[cfg["dataset"]]} --data_path={data}')
    if cfg['dataset'] == 'RML_feat':
        count = datasets.feature_info(data)['num_layers']
        if cfg['layer'] > count:
            raise BadValueError(f"layer={cfg['layer']!r}: {data} holds {count} audio layers; "
                                f'give one in 1..{count}')
    train_variances(cfg)
    check_writable('results_dir', cfg['results_dir'])
    if cfg['dataset'] != 'CREMA-D':
        return
    paths = check_split_files(data, cfg.get('media_root'), splits)
    unchecked = list(paths.values())  # clips not yet validated by a cache build
    if cfg['cache']:
        check_writable('cache_dir', cfg['cache_dir'])
        params = datasets.cache_params(frame_jitter(cfg))
        unchecked = [p for p in unchecked if cache.damage(
            Path(cfg['cache_dir']) / cache.fingerprint(p, params), len(p), params)]
        cache.check_free_space(cfg['cache_dir'], sum(map(len, unchecked)), params)
    datasets.check_clips([p for split_paths in unchecked for p in split_paths])


def check_split_files(data_path, media_root, splits=SPLITS):
    """Check the three CREMA-D split configs of data_path (types, alignment, label
    ranges, disjoint) and that the clips of `splits` exist: {split: resolved paths}."""
    loaded = {s: datasets.load_split(data_path, s) for s in SPLITS}
    for split, (paths, labels) in loaded.items():
        datasets.check_aligned(paths, labels, where=f'{data_path} split {split!r}')
    check_disjoint({s: paths for s, (paths, _) in loaded.items()}, where=str(data_path))
    resolved = {s: datasets.resolve_paths(loaded[s][0], media_root) for s in splits}
    for paths in resolved.values():
        cache.check_clips_exist(paths)
    return resolved


def check_writable(key, folder):
    """Raise a UserError unless `folder` is (or can be created as) a writable folder."""
    path = Path(folder)
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise BadValueError(f'{key}={str(folder)!r}: {path} is a file, not a folder')
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadValueError(f'{key}={str(folder)!r}: {path} is not writable; choose another '
                            f'--{key}')


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


def check_test_split(cfg, run_dir):
    """None if the test split is the one run_dir was trained with (or the run predates
    splits.json); else a line saying how it changed, returned if
    cfg['allow_split_change'] and raised (BadValueError) otherwise."""
    saved_path = Path(run_dir) / 'splits.json'
    if not saved_path.is_file():
        return None
    saved, now = json.loads(saved_path.read_text()), split_fingerprint(cfg)
    if saved['test']['sha1'] == now['test']['sha1']:
        return None
    msg = f'the test split of {cfg["data_path"]} changed since run {Path(run_dir).name} trained'
    if saved['train']['names'] and now['test']['names']:
        trained = set(saved['train']['names'])
        seen = sum(n in trained for n in now['test']['names'])
        msg += (f' ({now["test"]["clips"]} test clips now, {saved["test"]["clips"]} then; '
                f'{seen} of them were in its training split)')
    if not cfg.get('allow_split_change'):
        raise BadValueError(msg + '; restore that split, or pass --allow_split_change=True '
                            'to evaluate anyway (the result then says so)')
    return msg
