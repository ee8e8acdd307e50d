"""The settings of main.py: one table of allowed values, the rules between settings,
and the resolution of a header with its overrides.

Every key of main.py's header has exactly one validator here (CHOICES: a tuple of
allowed values, or a predicate whose docstring says what it accepts); the header's
comments list the same values for the reader. configurator.configure applies the
table; check_config then rejects combinations that no single key can see.
"""
import math
import time

import datasets
import model as models
from model_feat import build_model_feat
from cmvq import distributed
from cmvq.configurator import ConfigError, configure
from cmvq.loaders import DEVICE_DATASETS
from cmvq.loss import RECON_LOSSES
from cmvq.runtime import resolve_device

TIMESTAMP_FORMAT = '%Y%m%d-%H%M%S'  # run folder names
# Settings of the machine, not of the model: evaluating or resuming a saved run
# takes these from the current header and everything else from its config.json.
RUNTIME_KEYS = ('message', 'timestamp', 'device', 'num_workers', 'amp', 'channels_last',
                'compile', 'cache', 'cache_dir', 'data_on_gpu', 'results_dir', 'media_root',
                'robustness', 'resume', 'tensorboard', 'allow_split_change')
# The machine settings a tool that reads a saved run takes (tools/predict.py, tools/probe.py).
TOOL_KEYS = ('timestamp', 'results_dir', 'media_root', 'device', 'num_workers', 'amp',
             'channels_last', 'compile', 'cache', 'cache_dir', 'data_on_gpu',
             'allow_split_change')
# The released code's spelling of a dataset, taken as the project's name.
DATASET_ALIASES = {'CREMAD': 'CREMA-D'}


def _int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v):
    """a str"""
    return isinstance(v, str)


def _folder(v):
    """a folder path (a non-empty str)"""
    return isinstance(v, str) and bool(v)


def _optional_folder(v):
    """None or a folder path (a non-empty str)"""
    return v is None or _folder(v)


def positive_int(v):
    """an int > 0"""
    return _int(v, 1)


def optional_positive_int(v):
    """None or an int > 0"""
    return v is None or _int(v, 1)


def non_negative_int(v):
    """an int >= 0"""
    return _int(v, 0)


def _width(v):
    """a positive multiple of 4"""
    return _int(v, 4) and v % 4 == 0


def _residual_hiddens(v):
    """an int >= 4 (the TaskSolver's residual stack gets a quarter of it)"""
    return _int(v, 4)


def _positive_float(v):
    """a number > 0"""
    return _number(v) and v > 0


def _decay(v):
    """a number in [0, 1): 0 is plain VQ, > 0 the EMA decay"""
    return _number(v) and 0 <= v < 1


def _threshold(v):
    """None (meaning 5e-3) or a number"""
    return v is None or _number(v)


def _timestamp(v):
    """None or a run folder name 'YYYYmmdd-HHMMSS'"""
    if v is None:
        return True
    try:
        time.strptime(str(v)[:15], TIMESTAMP_FORMAT)
        return isinstance(v, str)
    except ValueError:
        return False


def _frame_jitter(v):
    """None (the dataset's: CREMA-D 15, RML 22) or an int >= 0"""
    return v is None or _int(v, 0)


def _dataset(v):
    """'CREMA-D' (or the released code's 'CREMAD'), 'RML', 'RML_feat', 'EmoVoxCeleb'"""
    return DATASET_ALIASES.get(v, v) in models.DATASETS


def _device(v):
    """'auto', 'cpu', 'cuda' or 'cuda:N'"""
    return v in ('auto', 'cpu', 'cuda') or (isinstance(v, str) and v.startswith('cuda:')
                                             and v[5:].isdigit())


def _balanced(v):
    """False (balanced=True is deprecated and not supported)"""
    return v is False


# Allowed values of main.py's header constants, one entry per key.
CHOICES = {
    'message': _text,
    'timestamp': _timestamp,
    'dataset': _dataset,
    'pretrained': (False, True),
    'pretrained_timestamp': _timestamp,
    'reset_mask': (False, True),
    'mode': models.MODES,
    'base_type': models.BASE_TYPES,
    'data_path': _folder,
    'media_root': _optional_folder,
    'balanced': _balanced,
    'num_epoch': positive_int,
    'batch_size': positive_int,
    'shuffle': (True, False),
    'learning_rate': _positive_float,
    'num_hiddens': _width,
    'num_residual_hiddens': _residual_hiddens,
    'num_residual_layers': non_negative_int,
    'embedding_dim': _width,
    'num_embeddings': positive_int,
    'commitment_cost': _positive_float,
    'decay': _decay,
    'mask_scale': _positive_float,
    'mask_init': models.MASK_INITS,
    'threshold_fn': models.THRESHOLD_FNS,
    'threshold': _threshold,
    'regularization': (True, False),
    'recon_loss': RECON_LOSSES,
    'modify_modal': (False, True),
    'audio_geometry': (None, *datasets.AUDIO_GEOMETRIES),
    'subsample': optional_positive_int,
    'layer': positive_int,
    'seed': non_negative_int,
    'device': _device,
    'num_workers': non_negative_int,
    'amp': ('auto', 'bf16', 'off'),
    'channels_last': ('auto', True, False),
    'compile': (False, True),
    'sync_bn': (True, False),
    'cache': (True, False),
    'cache_dir': _folder,
    'data_on_gpu': ('auto', False, True),
    'frame_jitter': _frame_jitter,
    'results_dir': _folder,
    'tensorboard': (False, True),
    'resume': _timestamp,
    'robustness': (False, True),
    'allow_split_change': (False, True),
    'twin_actors': non_negative_int,
    'twin_root': _folder,
}


def resolve(defaults, argv, choices=None):
    """defaults (a header) with argv's overrides, every value checked, then the rules
    between settings (check_config); a problem raises ConfigError (one line).
    choices: the table of a script's own extra keys."""
    cfg = configure(defaults, argv, {**CHOICES, **(choices or {})})
    cfg['dataset'] = DATASET_ALIASES.get(cfg['dataset'], cfg['dataset'])
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Reject combinations of settings before any work; ConfigError says what to change."""
    rules = [
        ((cfg['pretrained'] or cfg['modify_modal']) and cfg['dataset'] not in datasets.RML_DATASETS,
         f"pretrained and modify_modal apply to the RML dataset only; with {cfg['dataset']} "
         'both must be False'),
        (cfg['pretrained'] and cfg['pretrained_timestamp'] is None,
         'pretrained=True needs pretrained_timestamp: the saved run (results_dir/<timestamp>) '
         'whose VQ-VAE modules the model starts from'),
        (cfg['pretrained'] and cfg['base_type'] == 4,
         'pretrained=True transfers VQ-VAE modules; base_type=4 (two ResNet18) has none: use '
         'base_type 0, 1, 2 or 3'),
        (cfg['twin_actors'] and cfg['dataset'] != 'CREMA-D',
         f"twin_actors synthesizes a CREMA-D twin; with {cfg['dataset']} it must be 0 (make "
         'an RML twin with python3 -m prepare.synth_rml and python3 -m prepare.read_rml)'),
        (cfg['audio_geometry'] is not None and cfg['dataset'] not in datasets.RML_DATASETS,
         f"audio_geometry applies to RML only; with {cfg['dataset']} it must be None"),
        (cfg['subsample'] is not None and cfg['dataset'] != 'EmoVoxCeleb',
         f"subsample applies to EmoVoxCeleb only; with {cfg['dataset']} it must be None"),
        (cfg['data_on_gpu'] is True and (cfg['dataset'] not in DEVICE_DATASETS
                                         or cfg['modify_modal']),
         f"data_on_gpu=True samples from the CREMA-D or RML cache without modify_modal; with "
         f"{cfg['dataset']} (modify_modal={cfg['modify_modal']}) it must be 'auto' or False"),
        (cfg['data_on_gpu'] is True and not cfg['cache'],
         'data_on_gpu=True needs cache=True (it samples from the cache)'),
        (cfg['dataset'] == 'RML_feat' and cfg['base_type'] not in (0, 2),
         f"dataset='RML_feat' supports base_type 0 and 2, not {cfg['base_type']!r}"),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(message)
    if cfg['data_on_gpu'] is True and resolve_device(cfg).type != 'cuda':
        raise ConfigError("data_on_gpu=True needs a CUDA device; use 'auto' or False on 'cpu'")
    check_distributed(cfg, distributed.context())


def check_distributed(cfg, ctx):
    """Settings a run of ctx.world_size processes (torchrun) cannot take."""
    if ctx.world_size == 1:
        return
    if cfg.get('robustness'):
        raise ConfigError('robustness=True evaluates in one process: run it without torchrun')
    if cfg['batch_size'] % ctx.world_size:
        raise ConfigError(f"batch_size={cfg['batch_size']} is the global batch and must divide "
                          f"by the {ctx.world_size} processes of this torchrun")
    if str(cfg['device']).startswith('cuda:'):
        raise ConfigError(f"device={cfg['device']!r}: under torchrun each process uses "
                          "cuda:LOCAL_RANK; use 'auto' or 'cuda'")


def model_config(cfg):
    """The keys model.build_model needs: cfg plus the number of classes (and for
    RML_feat the feature sizes of cfg['data_path'])."""
    extra = {}
    if cfg['dataset'] == 'RML_feat':
        info = datasets.feature_info(cfg['data_path'])
        extra = {k: info[k] for k in ('image_features', 'audio_features')}
    return {**cfg, **extra, 'num_classes': datasets.NUM_CLASSES[cfg['dataset']]}


def build_model(cfg):
    """The model cfg describes (untrained): model.py's for base_type 0-4, model_feat.py's
    for RML_feat."""
    mcfg = model_config(cfg)
    return (build_model_feat if cfg['dataset'] == 'RML_feat' else models.build_model)(mcfg)
