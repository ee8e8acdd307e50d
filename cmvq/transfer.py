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
``check``, run before the run folder exists, loads the source's checkpoints and
refuses a source that gives this model nothing (e.g. a base_type 4 run).
"""
from pathlib import Path

import datasets
from cmvq.config import build_model
from cmvq.errors import BadValueError, MissingError
from cmvq.runs import CHECKPOINTS, load_checkpoint, read_json, trained_by

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
    return run_dir, read_json(run_dir / 'config.json')


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
            state.update({_key(k): v for k, v in load_checkpoint(run_dir / name)['model'].items()})
    return state


def plan(target, source, run_dir):
    """What a transfer copies into a model whose state dict is target: ({key: source
    tensor}, modules copied, modules the source lacks); BadValueError on a shape that
    differs."""
    copies, done, missing = {}, set(), set()
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
    return copies, done, missing


def check(cfg):
    """Before the run folder exists: the source's checkpoints load and give this run's
    model something to start from; otherwise one line naming the source."""
    run_dir, saved = source_config(cfg)
    _, done, _ = plan(build_model(cfg).state_dict(), source_state(run_dir), run_dir)
    if not done:
        raise _nothing(cfg, run_dir, saved)


def _nothing(cfg, run_dir, saved):
    return BadValueError(f'pretrained_timestamp={cfg["pretrained_timestamp"]!r}: {run_dir} '
                         f'(base_type {saved.get("base_type")!r}) holds none of the modules a '
                         f'transfer copies ({", ".join(VQVAE_PARTS)}, mask): nothing to start '
                         'from; choose a run of base_type 0, 1, 2 or 3')


def apply(nets, cfg, log):
    """Copy the source's VQ-VAE modules (and mask) into ``nets`` (a model, or the
    two stages of main_separate.py); returns {'transferred': [...], 'missing': [...]}.
    A source that gives nothing is an error (check() says so before the run)."""
    run_dir, saved = source_config(cfg)
    source = source_state(run_dir)
    done, missing = set(), set()
    for net in nets:
        copies, copied, lacking = plan(net.state_dict(), source, run_dir)
        net.load_state_dict({**net.state_dict(), **copies})
        if cfg['reset_mask'] and hasattr(net, 'reset_mask'):
            net.reset_mask()
        done |= copied
        missing |= lacking
    if not done:
        raise _nothing(cfg, run_dir, saved)
    missing -= done
    log(f'Pretrained from {run_dir} (audio geometry {cfg["audio_geometry"]!r}): transferred '
        f'{", ".join(sorted(done))}'
        + (f'; not in the source (left as initialised): {", ".join(sorted(missing))}'
           if missing else '')
        + ('; mask reset after loading' if cfg['reset_mask'] and 'mask' in done else ''))
    return {'transferred': sorted(done), 'missing': sorted(missing)}
