"""pretrained=True: start an RML model from a saved run's VQ-VAE modules.

The source is a run in results_dir/<pretrained_timestamp> (e.g. a CREMA-D run of
main.py or main_separate.py). Before any training, ``resolve`` checks that the
source's widths (num_hiddens, num_residual_hiddens, num_residual_layers,
embedding_dim, num_embeddings) and codebook kind (EMA or plain) match, and sets
the RML audio geometry to the source's (the audio encoder only knows the
spectrograms it was trained on: a CREMA-D source means whole clips at 44.1 kHz).
``apply`` then copies, per module (image and audio each): the encoders, the
pre-VQ convs, the quantizers (codebook and EMA state) and the decoders, plus the
TaskSolver's mask when both have one (reset_mask=True restores its initial
value afterwards, for the seed's comparisons of knowledge transfer). The
classifier always starts from scratch (its classes are another dataset's).
"""
import json
from pathlib import Path

import torch

import datasets
from cmvq.errors import BadValueError, MissingError
from cmvq.runs import CHECKPOINTS, trained_by

VQVAE_PARTS = ('encoders', 'pre_vq', 'quantizers', 'decoders')
WIDTH_KEYS = ('num_hiddens', 'num_residual_hiddens', 'num_residual_layers', 'embedding_dim',
              'num_embeddings')
SOURCE_FILES = [f for files in CHECKPOINTS.values() for f in files]  # of either script


def source_config(cfg):
    """(run folder, saved config) of cfg['pretrained_timestamp']: a run trained by
    main.py or main_separate.py; MissingError listing the trained runs otherwise."""
    results = Path(cfg['results_dir'])
    run_dir = results / cfg['pretrained_timestamp']
    if trained_by(run_dir) is None:
        runs = sorted(p.name for p in results.glob('*') if trained_by(p))
        raise MissingError(f'pretrained_timestamp={cfg["pretrained_timestamp"]!r}: '
                           f'{run_dir} is not a trained run; trained runs in {results}: '
                           f'{", ".join(runs) or "none"}')
    return run_dir, json.loads((run_dir / 'config.json').read_text())


def resolve(cfg):
    """cfg with audio_geometry set (the source's when pretrained, else 'RML' for RML);
    BadValueError naming the mismatch when the source cannot be transferred."""
    if cfg['dataset'] not in datasets.RML_DATASETS:
        return cfg
    if not cfg['pretrained']:
        return {**cfg, 'audio_geometry': cfg.get('audio_geometry') or 'RML'}
    run_dir, saved = source_config(cfg)
    where = f'pretrained_timestamp={cfg["pretrained_timestamp"]!r} ({run_dir})'
    diff = [f'{k} {saved.get(k)!r} vs {cfg[k]!r}' for k in WIDTH_KEYS if saved.get(k) != cfg[k]]
    if diff:
        raise BadValueError(f'{where} has other widths than this run (source vs here): '
                         f'{", ".join(diff)}; set them to the source\'s')
    if (saved.get('decay', 0) > 0) != (cfg['decay'] > 0):
        raise BadValueError(f'{where}: codebook kind differs (source decay {saved.get("decay")!r}, '
                         f'here {cfg["decay"]!r}: EMA needs decay > 0 on both, plain VQ 0)')
    geometry = saved.get('audio_geometry') or saved['dataset']
    if geometry not in datasets.AUDIO_GEOMETRIES:
        raise BadValueError(f'{where}: its audio geometry ({geometry!r}) cannot feed RML; '
                         f'supported sources: {", ".join(datasets.AUDIO_GEOMETRIES)}')
    if cfg.get('audio_geometry') not in (None, geometry):
        raise BadValueError(f'{where} was trained on {geometry!r} audio, but audio_geometry='
                         f'{cfg["audio_geometry"]!r}; leave it None to follow the source')
    return {**cfg, 'audio_geometry': geometry}


def _key(name):
    """State-dict key -> the name shared by every model class ('backbone.' off)."""
    return name.removeprefix('backbone.')


def _module(key):
    """'encoders.image.0.weight' -> 'encoders.image'; 'solver.mask' -> 'mask'; else None."""
    parts = key.split('.')
    if parts[0] in VQVAE_PARTS:
        return '.'.join(parts[:2])
    return 'mask' if parts[-1] == 'mask' else None


def source_state(run_dir):
    """The source run's tensors by shared key, from every checkpoint it holds."""
    state = {}
    for name in SOURCE_FILES:
        if (run_dir / name).is_file():
            checkpoint = torch.load(run_dir / name, map_location='cpu', weights_only=True)
            state.update({_key(k): v for k, v in checkpoint['model'].items()})
    return state


def apply(nets, cfg, log):
    """Copy the source's VQ-VAE modules (and mask) into ``nets`` (a model, or the
    two stages of main_separate.py); returns {'transferred': [...], 'missing': [...]}."""
    run_dir, _ = source_config(cfg)
    source = source_state(run_dir)
    done, missing = set(), set()
    for net in nets:
        target = net.state_dict()
        copies = {}
        for name, tensor in target.items():
            module = _module(_key(name))
            if module is None:
                continue
            value = source.get(_key(name))
            if value is None:
                missing.add(module)
            elif value.shape != tensor.shape:
                raise BadValueError(f'pretrained: {name} has shape {tuple(value.shape)} in '
                                 f'{run_dir}, {tuple(tensor.shape)} here')
            else:
                copies[name] = value
                done.add(module)
        net.load_state_dict({**target, **copies})
        if cfg['reset_mask'] and hasattr(net, 'reset_mask'):
            net.reset_mask()
    missing -= done
    log(f'Pretrained from {run_dir} (audio geometry {cfg["audio_geometry"]!r}): transferred '
        f'{", ".join(sorted(done)) or "nothing"}'
        + (f'; not in the source (left as initialised): {", ".join(sorted(missing))}'
           if missing else '')
        + ('; mask reset after loading' if cfg['reset_mask'] and 'mask' in done else ''))
    return {'transferred': sorted(done), 'missing': sorted(missing)}
