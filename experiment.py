"""The experiment loop shared by main.py and main_separate.py.

run folder -> data -> epochs (train + validate, best checkpoint by validation
classification loss) -> test metrics, pickles and plots. Every file is written
atomically (temporary name, then rename) and the log is flushed line by line,
so a crash leaves a readable log and no half-written file.

Index convention of the seed's file names: 1 = image, 2 = audio.
"""
import collections
import fcntl
import hashlib
import json
import os
import platform
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from tqdm import tqdm

import atomic
import datasets
import distributed as dist
import groups as group_metrics
import model as models
from errors import BadValueError, MissingError, UserError
from read_variances import read_variances

REGULARIZATION_WEIGHT = 1e-4
RML_DATASETS = ('RML', 'RML_probe')
# 'mse': the released main.py (its division by the training variance is commented
# out); 'mse/var': divided by it, as in the VQ-VAE notebook the code is based on.
RECON_LOSSES = ('mse', 'mse/var')
TIMESTAMP_FORMAT = '%Y%m%d-%H%M%S'


# ----------------------------------------------------------------------------- configuration

def _positive_int(v):
    """a positive int"""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _optional_positive_int(v):
    """None or a positive int"""
    return v is None or _positive_int(v)


def _non_negative_int(v):
    """an int >= 0"""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_float(v):
    """a number > 0"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _decay(v):
    """a number in [0, 1): 0 is plain VQ, > 0 the EMA decay"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _threshold(v):
    """None (meaning 5e-3) or a number"""
    return v is None or isinstance(v, (int, float)) and not isinstance(v, bool)


def _timestamp(v):
    """None (train) or a run folder name 'YYYYmmdd-HHMMSS'"""
    if v is None:
        return True
    try:
        time.strptime(str(v)[:15], TIMESTAMP_FORMAT)
        return isinstance(v, str)
    except ValueError:
        return False


def _subsample(v):
    """None (every item) or an int > 0 (keep every ceil(len/N)-th item)"""
    return v is None or _positive_int(v)


def _frame_jitter(v):
    """None (the dataset's: CREMA-D 15, RML 22) or an int >= 0"""
    return v is None or _non_negative_int(v)


# The seed's spellings, taken as the project's names.
DATASET_ALIASES = {'CREMAD': 'CREMA-D'}


def _dataset(v):
    """'CREMA-D' (or the seed's 'CREMAD'), 'RML', 'RML_feat', 'EmoVoxCeleb'"""
    return DATASET_ALIASES.get(v, v) in models.DATASETS


def _device(v):
    """'auto', 'cpu', 'cuda' or 'cuda:N'"""
    return v in ('auto', 'cpu', 'cuda') or (isinstance(v, str) and v.startswith('cuda:')
                                             and v[5:].isdigit())


# Allowed values of the header constants (a tuple, or a predicate whose
# docstring says what it accepts); configurator.configure checks overrides.
CHOICES = {
    'timestamp': _timestamp,
    'dataset': _dataset,
    'pretrained': (False, True),
    'mode': models.MODES,
    'base_type': models.BASE_TYPES,
    'balanced': (False,),
    'num_epoch': _positive_int,
    'batch_size': _positive_int,
    'shuffle': (True, False),
    'learning_rate': _positive_float,
    'num_hiddens': _positive_int,
    'num_residual_hiddens': _positive_int,
    'num_residual_layers': _non_negative_int,
    'embedding_dim': _positive_int,
    'num_embeddings': _positive_int,
    'commitment_cost': _positive_float,
    'decay': _decay,
    'mask_scale': _positive_float,
    'mask_init': models.MASK_INITS,
    'threshold_fn': models.THRESHOLD_FNS,
    'threshold': _threshold,
    'regularization': (True, False),
    'recon_loss': RECON_LOSSES,
    'modify_modal': (False, True),
    'subsample': _subsample,
    'layer': _positive_int,
    'seed': _non_negative_int,
    'device': _device,
    'num_workers': _non_negative_int,
    'amp': ('auto', 'bf16', 'off'),
    'channels_last': ('auto', True, False),
    'compile': (False, True),
    'sync_bn': (True, False),
    'cache': (True, False),
    'data_on_gpu': (False, True),
    'frame_jitter': _frame_jitter,
    'pretrained_timestamp': _timestamp,
    'reset_mask': (False, True),
    'audio_geometry': (None, *datasets.AUDIO_GEOMETRIES),
    'allow_split_change': (False, True),
    'twin_actors': _non_negative_int,
    'robustness': (False, True),
    'resume': _timestamp,
    'tensorboard': (False, True),
    'num_epoch_vae': _optional_positive_int,
    'num_epoch_solver': _optional_positive_int,
    # probe.py
    'probe_items': _positive_int,
    'probe_epochs': _non_negative_int,
    'probe_seed': _non_negative_int,
    'bootstrap': _positive_int,
    'probe_C': _positive_float,
    'probe_alpha': _positive_float,
    'probe_permutations': _non_negative_int,
}


def check_config(cfg):
    """Reject invalid combinations before any work; messages list what is allowed."""
    if cfg['balanced']:
        raise ValueError('balanced=True is deprecated and not supported; use balanced=False')
    if cfg['dataset'] not in datasets.DATASETS:
        raise ValueError(f"dataset={cfg['dataset']!r} is not implemented yet; "
                         f"implemented: {', '.join(map(repr, datasets.DATASETS))}")
    rml = cfg['dataset'] in RML_DATASETS
    if (cfg['pretrained'] or cfg['modify_modal']) and not rml:
        raise ValueError(f"pretrained and modify_modal apply to the RML dataset only; "
                         f"with {cfg['dataset']} both must be False")
    if cfg['pretrained'] and cfg.get('pretrained_timestamp') is None:
        raise ValueError('pretrained=True needs pretrained_timestamp: the saved run '
                         '(results_dir/<timestamp>) whose VQ-VAE modules the model starts from')
    if cfg['pretrained'] and cfg['base_type'] == 4:
        raise ValueError('pretrained=True transfers VQ-VAE modules; base_type=4 (two ResNet18) '
                         'has none: use base_type 0, 1, 2 or 3')
    if cfg.get('twin_actors') and cfg['dataset'] != 'CREMA-D':
        raise ValueError(f"twin_actors synthesizes a CREMA-D twin; with {cfg['dataset']} it "
                         "must be 0 (make an RML twin with synth_rml.py and read_rml.py)")
    if cfg.get('audio_geometry') is not None and not rml:
        raise ValueError(f"audio_geometry applies to RML only; with {cfg['dataset']} it must "
                         "be None")
    if cfg.get('subsample') is not None and cfg['dataset'] != 'EmoVoxCeleb':
        raise ValueError(f"subsample applies to EmoVoxCeleb only; with {cfg['dataset']} "
                         "it must be None")
    if cfg['dataset'] == 'RML_feat':
        count = datasets.feature_info(cfg['data_path'])['num_layers']
        if cfg['layer'] > count:
            raise ValueError(f"layer={cfg['layer']!r}: {cfg['data_path']} holds {count} audio "
                             f"layers; give one in 1..{count}")
    if cfg['data_on_gpu'] and (cfg['dataset'] not in ('CREMA-D', 'RML') or cfg['modify_modal']):
        raise ValueError(f"data_on_gpu=True samples from the CREMA-D or RML cache without "
                         f"modify_modal; with {cfg['dataset']} (modify_modal="
                         f"{cfg['modify_modal']}) it must be False")
    if cfg['data_on_gpu'] and not cfg['cache']:
        raise ValueError('data_on_gpu=True needs cache=True (it samples from the cache)')
    if cfg['data_on_gpu'] and resolve_device(cfg).type != 'cuda':
        raise ValueError("data_on_gpu=True needs a CUDA device; it is off on 'cpu'")
    check_distributed(cfg, dist.context())
    models.validate_config(model_config(cfg))


def check_distributed(cfg, ctx):
    """Settings a run of ctx.world_size processes (torchrun) cannot take."""
    if ctx.world_size == 1:
        return
    if cfg.get('robustness'):
        raise ValueError('robustness=True evaluates in one process: run it without torchrun')
    if cfg['batch_size'] % ctx.world_size:
        raise ValueError(f"batch_size={cfg['batch_size']} is the global batch and must divide "
                         f"by the {ctx.world_size} processes of this torchrun")
    if str(cfg['device']).startswith('cuda:'):
        raise ValueError(f"device={cfg['device']!r}: under torchrun each process uses "
                         f"cuda:LOCAL_RANK; use 'auto' or 'cuda'")


def model_config(cfg):
    """The keys build_model needs, plus the number of classes (and for RML_feat the
    feature sizes of cfg['data_path'])."""
    extra = {}
    if cfg['dataset'] == 'RML_feat':
        info = datasets.feature_info(cfg['data_path'])
        extra = {k: info[k] for k in ('image_features', 'audio_features')}
    return {**cfg, **extra, 'num_classes': datasets.NUM_CLASSES[cfg['dataset']]}


def train_variances(cfg):
    """(image_var, audio_var) of cfg's training split (RML_feat: of its audio layer)."""
    return read_variances(cfg['data_path'], cfg['layer'] if cfg['dataset'] == 'RML_feat'
                          else None)


# ----------------------------------------------------------------------------- pre-flight

SPLITS = ('train', 'val', 'test')
BUILDERS = {'RML': 'read_rml.py', 'RML_probe': 'read_rml.py', 'EmoVoxCeleb': 'read_emo.py',
            'RML_feat': 'make_features.py'}  # the script that writes each dataset's data_path


def preflight(cfg, splits=SPLITS):
    """Every check that can fail without training, run before a run folder exists.

    Folder settings are paths; data_path exists; its variances are finite and > 0;
    its split files are well-formed (types, 8 aligned label lists in range) with
    no clip in two splits and every clip of `splits` present and passing the
    container checks (media.check_clip, ~2 ms a clip; skipped for splits whose
    cache exists, as its build checked them); results_dir (and cache_dir)
    writable, with enough free space for the caches still to build.
    Raises a UserError whose one line names the file or value; writes nothing.
    """
    folders = ('results_dir', 'data_path') + (('cache_dir',) if cfg['cache'] else ())
    for key in folders:
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise BadValueError(f'{key}={cfg[key]!r} must be a folder path (a non-empty str)')
    data = Path(cfg['data_path'])
    if not data.is_dir():
        builder = BUILDERS.get(cfg['dataset'], 'read_cremad.py')
        raise MissingError(f'data_path={str(data)!r} does not exist: build it with '
                           f'{builder} --data_path={data}')
    train_variances(cfg)
    check_writable('results_dir', cfg['results_dir'])
    if cfg['dataset'] != 'CREMA-D':
        return
    paths = check_split_files(data, cfg.get('media_root'), splits)
    unchecked = list(paths.values())  # clips not yet validated by a cache build
    if cfg['cache']:
        check_writable('cache_dir', cfg['cache_dir'])
        params = datasets.cache_params(frame_jitter(cfg))
        unchecked = [p for p in unchecked if datasets.damage(
            Path(cfg['cache_dir']) / datasets.fingerprint(p, params), len(p), params)]
        datasets.check_free_space(cfg['cache_dir'], sum(map(len, unchecked)), params)
    datasets.check_clips([p for split_paths in unchecked for p in split_paths])


def check_split_files(data_path, media_root, splits=SPLITS):
    """Check the three CREMA-D split configs of data_path (types, alignment, label
    ranges, disjoint) and that the clips of `splits` exist: {split: resolved paths}."""
    loaded = {s: datasets.load_split(data_path, s) for s in SPLITS}
    for split, (paths, labels) in loaded.items():
        datasets.check_aligned(paths, labels, where=f'{data_path} split {split!r}')
    datasets.check_disjoint({s: paths for s, (paths, _) in loaded.items()}, where=str(data_path))
    resolved = {s: datasets.resolve_paths(loaded[s][0], media_root) for s in splits}
    for paths in resolved.values():
        datasets.check_clips_exist(paths)
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


# ----------------------------------------------------------------------------- files

def save_pickle(path, obj):
    atomic.write_pickle(path, obj)


def save_json(path, obj):
    atomic.write_json(path, obj, default=_jsonable)


def save_json_new(path, obj):
    """save_json under a name no other file has (atomic.write_new); returns the path."""
    return atomic.write_new(path, json.dumps(obj, indent=1, default=_jsonable) + '\n')


def save_torch(path, obj):
    atomic.write(path, lambda tmp: torch.save(obj, tmp))


def _jsonable(x):
    if isinstance(x, (np.generic, torch.Tensor)):
        return x.tolist() if getattr(x, 'ndim', 0) else x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def new_run_dir(results_dir, prefix=''):
    """Create results_dir/<prefix><YYYYmmdd-HHMMSS> exclusively; never reuse a folder."""
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    while True:
        path = Path(results_dir) / (prefix + time.strftime(TIMESTAMP_FORMAT))
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run started this second: take the next one
            time.sleep(1.0 - time.time() % 1.0 + 0.01)


# The checkpoints of a trained run, by the script that trains and evaluates it.
CHECKPOINTS = {'main.py': ('model.pt',), 'main_separate.py': ('model_vae.pt', 'model_solver.pt')}


def trained_by(run_dir):
    """The script whose checkpoints run_dir holds (a key of CHECKPOINTS), or None:
    a run that failed before saving one is not a trained run."""
    run_dir = Path(run_dir)
    if not (run_dir / 'config.json').is_file():
        return None
    return next((script for script, files in CHECKPOINTS.items()
                 if all((run_dir / f).is_file() for f in files)), None)


def find_run_dir(results_dir, timestamp, script='main.py'):
    """results_dir/timestamp if `script` trained it; otherwise a UserError saying which
    script evaluates it, or listing the runs `script` can evaluate."""
    path = Path(results_dir) / timestamp
    owner = trained_by(path)
    if owner == script:
        return path
    if owner is not None:
        raise BadValueError(f'run {timestamp!r} was trained by {owner}; evaluate it with '
                            f'python3 {owner} --timestamp={timestamp} (same other arguments)')
    runs = sorted(p.name for p in Path(results_dir).glob('*') if trained_by(p) == script)
    why = 'has no checkpoint (it never trained)' if path.is_dir() else 'does not exist'
    raise MissingError(f'run {str(path)!r} {why}; runs {script} can evaluate: '
                       f'{", ".join(runs) or "none"}')


class Log:
    """Print and append to log.txt, flushed line by line; lines are numbered, and an
    appended re-evaluation continues the numbering of the lines already there.

    Each message is appended under an exclusive lock (flock), so lines of two
    processes writing one log (two evaluations of a run) stay whole, and the
    numbering continues from whatever the other process wrote.

    Under torchrun only rank 0 logs; the other ranks write their failure (error())
    and nothing else."""

    def __init__(self, path, rank=0):
        self.path, self.rank = Path(path), rank
        self.count = _last_line_number(self.path)
        self.file = open(self.path, 'a', buffering=1) if rank == 0 else None
        self.end = self.file.tell() if self.file else 0  # where our last write ended

    def __call__(self, msg=''):
        if self.file is None:
            return
        fcntl.flock(self.file, fcntl.LOCK_EX)
        try:
            if os.fstat(self.file.fileno()).st_size != self.end:  # another process wrote
                self.count = _last_line_number(self.path)
            for line in str(msg).splitlines() or ['']:
                self.count += 1
                text = f'[{self.count:04d}] {line}'
                tqdm.write(text)
                self.file.write(text + '\n')
            self.file.flush()
            self.end = self.file.tell()
        finally:
            fcntl.flock(self.file, fcntl.LOCK_UN)

    def error(self, msg):
        """A failure, from any rank (the run folder may be on another node: then stderr)."""
        if self.file is not None:
            return self(msg)
        text = ''.join(f'[rank {self.rank}] {line}\n' for line in str(msg).splitlines())
        try:
            with open(self.path, 'a') as f:
                f.write(text)
        except OSError:
            sys.stderr.write(text)

    def close(self):
        if self.file is not None:
            self.file.close()


def _last_line_number(path):
    """The number of the last '[NNNN] ' line of an existing log (0 if none)."""
    if not path.is_file():
        return 0
    numbers = re.findall(r'^\[(\d+)\] ', path.read_text(errors='replace'), re.MULTILINE)
    return int(numbers[-1]) if numbers else 0


def versions():
    """Library versions and machine facts recorded with every run."""
    import av
    import librosa
    import sklearn
    import torchvision
    info = {'python': sys.version.split()[0], 'platform': platform.platform(),
            'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'numpy': np.__version__, 'scikit-learn': sklearn.__version__,
            'librosa': librosa.__version__, 'av': av.__version__,
            'cuda': torch.version.cuda, 'cpu_threads': torch.get_num_threads()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- runtime

def seed_everything(seed):
    """One seed drives initialisation, shuffles and frame draws."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(cfg):
    """The configured device; under torchrun a CUDA run uses cuda:LOCAL_RANK."""
    if cfg['device'] == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(cfg['device'])
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={cfg['device']!r} but CUDA is not available; use 'auto' or 'cpu'")
    ctx = dist.context()
    if device.type == 'cuda' and ctx.world_size > 1:
        device = torch.device('cuda', ctx.local_rank)
    return device


class Runtime:
    """Device, autocast and memory-format settings resolved once from the config."""

    def __init__(self, cfg):
        self.device = resolve_device(cfg)
        cuda = self.device.type == 'cuda'
        self.amp = cfg['amp'] == 'bf16' or (cfg['amp'] == 'auto' and auto_amp(self.device))
        self.channels_last = cfg['channels_last'] is True or cfg['channels_last'] == 'auto'
        self.pin_memory = cuda
        self.compile, self.compile_problem = bool(cfg.get('compile', False)), None
        if self.compile:
            self.compile_problem = compile_problem(self.device)
            self.compile = self.compile_problem is None

    def compiled(self, model):
        """torch.compile(model) when compile=True works here, else model."""
        return torch.compile(model) if self.compile else model

    def autocast(self):
        """bf16 autocast (the VQ distances stay fp32 inside model.py)."""
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch):
        """Move (image, audio, labels...) to the device; images channels_last if set."""
        image, audio, *labels = batch
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if image.dim() != 4:  # feature sequences (B, T, F): no memory format to choose
            fmt = torch.contiguous_format
        image = image.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        audio = audio.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        return image, audio, [y.to(self.device, non_blocking=True) for y in labels]

    def prepare(self, model):
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def describe(self):
        ctx = dist.context()
        text = (f'device {self.device}, bf16 autocast {"on" if self.amp else "off"}, '
                f'channels_last {"on" if self.channels_last else "off"}, '
                f'torch.compile {"on" if self.compile else "off"}')
        if self.compile_problem:
            text += (f'\ncompile=True: torch.compile does not work here '
                     f'({self.compile_problem}); training without it')
        if ctx.world_size > 1:
            text += f'; process {ctx.rank} of {ctx.world_size} (torchrun)'
        return text


def auto_amp(device):
    """amp='auto': bf16 autocast where bench.py measured it faster than fp32: on CUDA,
    and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where the paper-width
    step took half the CPU time; fp32 on other CPUs, which emulate bf16."""
    if device.type == 'cuda':
        return True
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')  # torch.cpu, >= 2.1
    return device.type == 'cpu' and any(getattr(torch.cpu, name, lambda: False)()
                                        for name in checks)


def compile_problem(device):
    """None if torch.compile works on device, else why not (a tiny function is compiled:
    no C++ compiler, no Triton, an unsupported Python all fail there)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means: run uncompiled
        first = str(e).strip().splitlines()
        return f'{type(e).__name__}: {first[0] if first else ""}'
    return None


# ----------------------------------------------------------------------------- data

def frame_jitter(cfg):
    """cfg['frame_jitter'], or when None the dataset's (CREMA-D 15, RML 22)."""
    if cfg['frame_jitter'] is not None:
        return cfg['frame_jitter']
    return datasets.RML_JITTER if cfg['dataset'] in RML_DATASETS else 15


def dataset_options(cfg):
    """The keyword arguments cfg['dataset']'s class takes from the config."""
    if cfg['dataset'] == 'EmoVoxCeleb':
        return {'subsample': cfg.get('subsample'), 'seed': cfg['seed']}
    if cfg['dataset'] == 'RML_feat':
        return {'layer': cfg['layer']}
    options = {'root': cfg.get('media_root'), 'cache': cfg['cache'],
               'cache_dir': cfg['cache_dir'], 'frame_jitter': frame_jitter(cfg),
               'workers': max(1, cfg['num_workers']), 'seed': cfg['seed']}
    if cfg['dataset'] in RML_DATASETS:
        options.update(modify_modal=cfg['modify_modal'],
                       audio_geometry=cfg.get('audio_geometry') or 'RML')
    return options


def make_datasets(cfg, splits=('train', 'val', 'test'), train=None):
    """The splits of cfg['data_path']. train=None: the training split draws its items
    at random, the others take the centre frame; False: every split takes the centre
    frame (deterministic features, e.g. for probe.py)."""
    return {split: datasets.get_dataset(cfg['dataset'], cfg['data_path'], split,
                                        train=split == 'train' if train is None else train,
                                        **dataset_options(cfg))
            for split in splits}


class DeviceLoader:
    """Batches sampled from the decode-once cache held in device memory.

    The whole cache moves to `device` once: frames (N, 2J+1, 128, 128, 3) uint8
    and log-mels (N, 256, 256) float32 (~1.7 MB a clip: ~13 GB for CREMA-D, which
    an H200 holds easily). Each batch is then an index gather plus one uint8 ->
    float conversion on the device, so loading never starves the GPU. Batches
    match the DataLoader's: (image (B, 3, 128, 128) in [0, 1], audio (B, 1, 256,
    256), emotion, race, gender, sentence), with the same frame rule (training:
    uniform within +-J of the centre, evaluation: the centre frame). Each epoch's
    draws come from a generator seeded by (seed, epoch) (see set_epoch).
    """

    def __init__(self, dataset, *, batch_size, train, sampler, drop_last, device, seed):
        arrays = dataset.arrays()
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.sampler, self.drop_last = sampler, drop_last
        self.jitter = (arrays['frames'].shape[1] - 1) // 2
        self.frames = _to_device(arrays['frames'], device)   # (N, 2J+1, 128, 128, 3) uint8
        self.specs = _to_device(arrays['specs'], device)     # (N, 256, 256) float32
        self.labels = torch.as_tensor(dataset.item_labels(), device=device)  # (N, 4) as items
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        device = self.frames.device
        order = torch.as_tensor(list(self.sampler), device=device)  # this rank's items
        self.generator.manual_seed(datasets.epoch_seed(self.seed, self.epoch))
        # one draw per item of the split, picked by index: an item's frame depends on
        # (seed, epoch, index) only, not on its rank or its place in the batch
        offsets = torch.randint(0, 2 * self.jitter + 1, (len(self.dataset),), device=device,
                                generator=self.generator)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            offset = offsets[idx] if self.train else torch.full_like(idx, self.jitter)
            image = self.frames[idx, offset].permute(0, 3, 1, 2).float().div_(255)
            audio = self.specs[idx].unsqueeze(1)
            yield (image, audio, *self.labels[idx].unbind(1))


def _to_device(array, device, chunk=256):
    """Copy a (memory-mapped) array to the device in chunks: no full host copy."""
    dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
    out = torch.empty(array.shape, dtype=dtype, device=device)
    for start in range(0, len(array), chunk):
        part = np.array(array[start:start + chunk])  # a writable host copy of one chunk
        out[start:start + chunk] = torch.from_numpy(part)
    return out


def make_loader(dataset, cfg, runtime, *, train):
    """DataLoader seeded from cfg['seed'] (a DeviceLoader when cfg['data_on_gpu']) over
    this process's items. Training: a per-epoch shuffle seeded by (seed, epoch) (if
    cfg['shuffle']) whose draws (order, frames) are a function of (seed, epoch): call
    set_epoch(loader, epoch) before each epoch. Evaluation: every item in order. Under
    torchrun of N processes each takes 1/N of the items and cfg['batch_size'] / N per
    batch: batch_size is the global batch, and the N ranks' t-th batches together are
    the one-process run's t-th batch."""
    world = dist.context().world_size
    sampler = (dist.train_sampler(dataset, shuffle=cfg['shuffle'], seed=cfg['seed']) if train
               else dist.ShardSampler(dataset))
    batch_size = cfg['batch_size'] // world
    # As released, training keeps the last partial batch, except one of a single
    # item: the solver's BatchNorm1d cannot train on one value per channel.
    drop_last = train and len(sampler) % batch_size == 1 and len(sampler) > 1
    if cfg['data_on_gpu']:
        return DeviceLoader(dataset, batch_size=batch_size, train=train, sampler=sampler,
                            drop_last=drop_last, device=runtime.device, seed=cfg['seed'])
    generator = torch.Generator().manual_seed(cfg['seed'])
    workers = cfg['num_workers']
    if train:  # (epoch, index) keys: frame draws independent of workers and ranks
        sampler = datasets.EpochSampler(len(dataset), sampler=sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=runtime.pin_memory, generator=generator,
        persistent_workers=workers > 0, drop_last=drop_last)


def set_epoch(loader, epoch):
    """Select the draws of `epoch` for a training loader (before iterating it)."""
    (loader if isinstance(loader, DeviceLoader) else loader.sampler).set_epoch(epoch)


def make_loaders(cfg, runtime, splits=('train', 'val', 'test')):
    data = make_datasets(cfg, splits)
    return {split: make_loader(ds, cfg, runtime, train=split == 'train')
            for split, ds in data.items()}


def setup(cfg, log):
    """Seed, runtime, the three loaders and the training variances of a new run."""
    seed_everything(cfg['seed'])
    runtime = Runtime(cfg)
    log(runtime.describe())
    with dist.main_first():  # rank 0 builds a missing cache, the others then open it
        loaders = make_loaders(cfg, runtime)
    variances = train_variances(cfg)
    log(f'Data: {cfg["data_path"]}: ' + ', '.join(
        f'{s} {len(dl.dataset)}' for s, dl in loaders.items())
        + f'; train variances image {variances[0]:.4g}, audio {variances[1]:.4g}')
    log(describe_loss(cfg))
    return runtime, loaders, variances


# ----------------------------------------------------------------------------- epochs

def class_criterion(dataset):
    """The classification term the dataset selects: MSE between the logits and a
    teacher's logits (EmoVoxCeleb, as released), else cross-entropy on class indices."""
    return F.mse_loss if dataset in datasets.SOFT_LABELS else F.cross_entropy


def class_targets(labels, dataset):
    """(B,) class indices: the labels, or the arg-max of a teacher's logits (B, C)."""
    return labels.argmax(1) if dataset in datasets.SOFT_LABELS else labels


def compute_loss(out, image, audio, emotion, variances, model, regularization, recon_loss,
                 criterion=F.cross_entropy):
    """Total loss and its parts (floats for logging) from a ModelOutput.

    MSE(image recon) + MSE(audio recon) + criterion(logits, emotion) + VQ losses
    (+ 1e-4 * sum(raw mask) when regularization); with recon_loss 'mse/var' each
    MSE is divided by its training variance (variances = (image, audio)). Missing
    parts are skipped. criterion: class_criterion(dataset).
    """
    models.check_choice('recon_loss', recon_loss, RECON_LOSSES)
    scale = variances if recon_loss == 'mse/var' else (1.0, 1.0)
    parts = {}
    if out.recon_image is not None:
        parts['recon_error1'] = F.mse_loss(out.recon_image.float(), image) / scale[0]
    if out.recon_audio is not None:
        parts['recon_error2'] = F.mse_loss(out.recon_audio.float(), audio) / scale[1]
    if out.logits is not None:
        parts['class_error'] = criterion(out.logits.float(), emotion)
    if out.vq_loss is not None:
        parts['vq_loss'] = out.vq_loss.float()
    reg = model.mask_regularization() if regularization else None
    if reg is not None:
        parts['mask_regularization'] = REGULARIZATION_WEIGHT * reg
    loss = sum(parts.values())
    return loss, parts


def describe_loss(cfg):
    """The training loss of cfg in words, for the log."""
    recon = ('MSE(image recon) + MSE(audio recon)' if cfg['recon_loss'] == 'mse' else
             'MSE(image recon)/var1 + MSE(audio recon)/var2')
    reg = f' + {REGULARIZATION_WEIGHT:g} * sum(mask)' if cfg['regularization'] else ''
    task = ('MSE(logits, teacher logits)' if cfg['dataset'] in datasets.SOFT_LABELS
            else 'cross-entropy')
    return (f"Loss (recon_loss={cfg['recon_loss']!r}): {recon} + {task} + VQ losses"
            f"{reg}; terms a model does not produce are skipped")


class EpochResult(NamedTuple):
    history: dict         # per-batch lists of the logged quantities
    preds: np.ndarray     # (items,) predicted classes of all ranks; empty without logits
    targets: np.ndarray   # (items,) their labels
    sizes: list           # items per batch of this rank


def run_epoch(model, loader, runtime, variances, cfg, optimizer=None, desc=''):
    """One pass over loader; trains when an optimizer is given -> EpochResult.

    model may be wrapped (DDP, torch.compile). Under torchrun the training history
    is the mean over ranks of each step (the global batch's values, ranks holding
    equal shares) and the predictions are gathered from all ranks."""
    training = optimizer is not None
    criterion = class_criterion(cfg['dataset'])
    model.train(training)
    plain = dist.unwrap(model)
    history, preds, targets, sizes = {}, [], [], []
    grad = nullcontext() if training else torch.no_grad()
    with grad:
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                          disable=not dist.is_main()):
            image, audio, (emotion, *_) = runtime.to_device(batch)
            with runtime.autocast():
                out = model(image, audio)
            loss, parts = compute_loss(out, image, audio, emotion, variances, plain,
                                       cfg['regularization'], cfg['recon_loss'], criterion)
            check_finite(loss, parts, desc, len(history.get('loss', ())) + 1)
            sizes.append(len(emotion))
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            parts['loss'] = loss
            for key, p in (('perplexity1', out.perplexity_image),
                           ('perplexity2', out.perplexity_audio)):
                if p is not None:
                    parts[key] = p
            for key, value in parts.items():  # stay on the device: no sync per batch
                history.setdefault(key, []).append(value.detach().float())
            if out.logits is not None:
                preds.append(out.logits.argmax(1))
                targets.append(class_targets(emotion, cfg['dataset']))
    history = {k: torch.stack(v) for k, v in history.items()}  # (steps,) each
    if training and history:  # one all-reduce of (keys, steps) per epoch
        means = dist.mean_over_ranks(torch.stack(list(history.values())))
        history = dict(zip(history, means, strict=True))
    history = {k: v.cpu().tolist() for k, v in history.items()}
    preds, targets = (dist.interleave(x) for x in zip(*dist.all_gather(
        (_concat(preds), _concat(targets))), strict=True))
    return EpochResult(history, preds, targets, sizes)


class NonFiniteLoss(UserError, FloatingPointError):
    """A NaN or Inf loss: the run stops; nothing is reported as a result."""


def check_finite(loss, parts, desc, batch):
    """Raise NonFiniteLoss naming the epoch (desc), batch and loss terms, before the
    optimizer step, so the saved checkpoint stays the last finite one. (One host
    sync per batch: the price of stopping at the first bad batch.)"""
    if bool(torch.isfinite(loss.detach())):
        return
    terms = ', '.join(f'{k} {float(v.detach()):.4g}' for k, v in parts.items())
    raise NonFiniteLoss(f'non-finite loss {float(loss.detach()):.4g} in '
                        f'{desc or "evaluation"}, batch {batch} ({terms}); the run stops and '
                        'reports no result (check the variances in data_path, or lower '
                        'learning_rate)')


def _concat(tensors):
    """List of (B,) label tensors -> one numpy array (empty if none)."""
    return torch.cat(tensors).cpu().numpy() if tensors else np.zeros(0, np.int64)


def classification_metrics(preds, targets, num_classes, names=datasets.EMOTIONS):
    """Accuracy, per-class accuracy, macro-F1 and confusion matrix (rows = truth)."""
    labels = list(range(num_classes))
    cm = confusion_matrix(targets, preds, labels=labels)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    return {'accuracy': float(cm.trace() / max(cm.sum(), 1)),
            'per_class_accuracy': {names[i]: float(a) for i, a in enumerate(per_class)},
            'macro_f1': float(f1_score(targets, preds, labels=labels, average='macro',
                                       zero_division=0)),
            'confusion_matrix': cm.tolist(), 'num_samples': int(cm.sum())}


def item_means(history, sizes):
    """Means over the items of all ranks of per-batch means (history lists, batch sizes).

    Exact for per-item losses; perplexity, a per-batch statistic, is batch-weighted."""
    sums = {k: float(np.dot(v, sizes)) for k, v in history.items()}
    shards = dist.all_gather((sums, sum(sizes)))
    total = max(sum(n for _, n in shards), 1)
    return {k: sum(s[k] for s, _ in shards) / total for k in sums}


def evaluate(model, loader, runtime, variances, cfg, desc='test', groups=False):
    """Deterministic evaluation: eval mode, fixed frames, seeded randomizer masks.

    groups: also the accuracy per gender, race, age group and actor (groups.py;
    CREMA-D only).

    The seeding happens on a forked RNG so that training, which calls this every
    epoch, does not restart its dropout and mask draws from the same state."""
    devices = [runtime.device] if runtime.device.type == 'cuda' else []
    model = dist.unwrap(model)  # no collectives: ranks may hold one batch more or less
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg['seed'])
        history, preds, targets, sizes = run_epoch(model, loader, runtime, variances, cfg,
                                                   desc=desc)
    metrics = item_means(history, sizes)
    if len(preds):
        names = datasets.CLASS_NAMES[cfg['dataset']]
        metrics.update(classification_metrics(preds, targets, len(names), names))
        if groups and cfg['dataset'] == 'CREMA-D':  # RMLDataset is a CREMADDataset too
            metrics['groups'] = split_groups(loader.dataset, preds, targets)
    metrics['mask'] = model.mask_ratios()
    return metrics


def split_groups(dataset, preds, targets):
    """groups.group_metrics of an evaluation, whose predictions come in split order."""
    labels = dataset.labels  # (N, 8)
    if len(preds) != len(labels) or not np.array_equal(targets, labels[:, datasets.EMOTION]):
        raise RuntimeError('group metrics need one prediction per clip in split order')
    return group_metrics.group_metrics(preds, targets, labels, dataset.paths)


def fit(model, loaders, runtime, variances, cfg, log, checkpoint, *, num_epoch=None,
        monitor='class_error', save=None, last=None, resume=False, on_epoch=None):
    """Train for num_epoch epochs; keep the checkpoint with the lowest val `monitor`.

    The checkpoint holds the state_dict of `save` (default: model) with the config.
    last: path of the training state written after every epoch (save_state);
    resume: continue from it (the epochs it holds are not trained again).
    on_epoch: optional hook on_epoch(epoch, train lists, val metrics, model) after
    each epoch's log block (tblog.TensorBoardLog).

    Returns the history: per-iteration train lists and per-epoch val lists, keyed
    like the seed's pickles (class_error, res_recon_error1/2, res_perplexity1/2).
    """
    num_epoch = num_epoch or cfg['num_epoch']
    trainer = runtime.compiled(dist.wrap(model, runtime.device, sync_bn=cfg['sync_bn']))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg['learning_rate'])
    history = {'train': {}, 'val': {}, 'mask': [], 'epoch_seconds': []}
    best, first = float('inf'), 1
    if resume:
        first, best, history = load_state(last, model, optimizer, loaders, runtime)
        log(f'Resumed from {last} after epoch {first - 1} (best val {monitor} {best:.4f})')
    if dist.active():  # same weights everywhere (DDP broadcast them), own dropout draws
        torch.manual_seed(cfg['seed'] + 1000 * dist.context().rank + first)
    for epoch in range(first, num_epoch + 1):
        start = time.time()
        set_epoch(loaders['train'], epoch)
        train, preds, targets, _ = run_epoch(trainer, loaders['train'], runtime, variances,
                                             cfg, optimizer, desc=f'epoch {epoch} train')
        val = evaluate(model, loaders['val'], runtime, variances, cfg, desc=f'epoch {epoch} val')
        for key, values in train.items():
            history['train'].setdefault(key, []).extend(values)
        for key, value in val.items():
            if isinstance(value, float):
                history['val'].setdefault(key, []).append(value)
        history['mask'].append(val['mask'])
        history['epoch_seconds'].append(time.time() - start)
        train_acc = float((preds == targets).mean()) if len(preds) else None
        log(epoch_block(epoch, num_epoch, train, train_acc, val, history['epoch_seconds'][-1]))
        if on_epoch is not None and dist.is_main():
            on_epoch(epoch, train, val, model)
        if val.get(monitor, float('inf')) < best or epoch == 1:  # equal on every rank
            best = val.get(monitor, float('inf'))
            if dist.is_main():
                save_torch(checkpoint, {'model': (save or model).state_dict(), 'config': cfg,
                                        'epoch': epoch, f'val_{monitor}': best})
            log(f'  saved {Path(checkpoint).name} (best val {monitor} {best:.4f})')
        if last is not None and dist.is_main():
            save_state(last, model, optimizer, loaders, epoch, best, history)
    return history


def save_state(path, model, optimizer, loaders, epoch, best, history):
    """Everything a later epoch depends on, written atomically: model and optimizer
    state, the epoch done, best-so-far, history, and every RNG state (the training
    data draws are a function of (seed, epoch) and need none)."""
    import random
    save_torch(path, {
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
        'best': best, 'history': history, 'rng': {
            'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
            'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'loaders': {k: dl.generator.get_state() for k, dl in loaders.items()
                        if isinstance(getattr(dl, 'generator', None), torch.Generator)}}})


def load_state(path, model, optimizer, loaders, runtime):
    """Restore save_state's file into model, optimizer, loaders and the RNGs;
    returns (first epoch to train, best-so-far, history)."""
    import random
    # our own file: it holds numpy/python RNG states, which weights_only refuses
    state = load_checkpoint(path, weights_only=False)
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    rng = state['rng']
    torch.set_rng_state(rng['torch'].cpu())
    np.random.set_state(rng['numpy'])
    random.setstate(rng['python'])
    if rng['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng['cuda']])
    for key, generator_state in rng['loaders'].items():
        loaders[key].generator.set_state(generator_state.cpu())
    return state['epoch'] + 1, state['best'], state['history']
def load_checkpoint(path, weights_only=True):
    """A checkpoint dict read by rank 0 and sent to every rank (the run folder may exist
    on rank 0's node only); tensors on the CPU (load_state_dict moves them)."""
    return dist.broadcast(torch.load(path, map_location='cpu', weights_only=weights_only)
                          if dist.is_main() else None)


def epoch_block(epoch, num_epoch, train, train_acc, val, seconds):
    """The log's per-epoch block, in the released log's spirit."""
    def fmt(stats, acc):
        means = {k: float(np.mean(v)) if isinstance(v, list) else v for k, v in stats.items()}
        text = ', '.join(f'{k} {means[k]:.4f}' for k in
                         ('loss', 'class_error', 'recon_error1', 'recon_error2', 'vq_loss',
                          'perplexity1', 'perplexity2') if k in means)
        return text + (f', accuracy {100 * acc:.2f}%' if acc is not None else '')
    lines = [f'Epoch {epoch}/{num_epoch} ({seconds:.1f} s)',
             f'  train: {fmt(train, train_acc)}',
             f'  val:   {fmt(val, val.get("accuracy"))}']
    if val.get('mask'):
        m = val['mask']
        lines.append(f"  mask: private1 {m['private1']:.1f}%, shared1 {m['shared1']:.1f}%, "
                     f"private2 {m['private2']:.1f}%, shared2 {m['shared2']:.1f}%, "
                     f"complementarity {m['complementarity']:.1f}%")
    return '\n'.join(lines)


def test_block(metrics, title='Test'):
    """Log lines of an evaluation: system and per-class accuracy, macro-F1, mask."""
    lines = [f'{title}: accuracy {100 * metrics["accuracy"]:.2f}%, '
             f'macro-F1 {100 * metrics["macro_f1"]:.2f}%, '
             f'{metrics["num_samples"]} samples, class_error {metrics["class_error"]:.4f}']
    lines.append('  per class: ' + ', '.join(
        f'{k} {100 * v:.1f}%' for k, v in metrics['per_class_accuracy'].items()))
    lines.append('  confusion (rows truth, cols predicted): '
                 + ' | '.join(' '.join(f'{n:3d}' for n in row)
                              for row in metrics['confusion_matrix']))
    if metrics.get('groups'):
        lines += group_metrics.group_lines(metrics['groups'])
    if metrics.get('mask'):
        lines.append('  mask: ' + ', '.join(f'{k} {v:.1f}%' for k, v in metrics['mask'].items()))
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- run outputs

def save_history(run_dir, history, stage1=None):
    """The seed's pickles: train_/val_ class_error, res_perplexity1/2, res_recon_error1/2.

    A two-stage run passes its VQ-VAE stage's history as stage1: the reconstruction
    and perplexity pickles then hold that stage's series, the class-error ones the
    solver stage's (history), and history.json holds both (stage 1 under 'stage1').
    """
    names = {'class_error': 'class_error', 'perplexity1': 'res_perplexity1',
             'perplexity2': 'res_perplexity2', 'recon_error1': 'res_recon_error1',
             'recon_error2': 'res_recon_error2'}
    for split in ('train', 'val'):
        for key, name in names.items():
            source = stage1 if stage1 is not None and key != 'class_error' else history
            save_pickle(run_dir / f'{split}_{name}.pkl', source[split].get(key, []))
    save_json(run_dir / 'history.json',
              history if stage1 is None else {**history, 'stage1': stage1})


@torch.no_grad()
def last_batch(loader):
    """The last batch `loader` yields, loading only that one where it can (a
    DataLoader without shuffling: its batch sampler gives the indices)."""
    if isinstance(loader, torch.utils.data.DataLoader) and \
            isinstance(loader.sampler, torch.utils.data.SequentialSampler):
        indices = list(loader.batch_sampler)[-1]
        return loader.collate_fn([loader.dataset[i] for i in indices])
    return collections.deque(loader, maxlen=1)[0]


@torch.no_grad()
def save_reconstructions(run_dir, model, loader, runtime, num=8):
    """What the released main.py pickles after its test, as CPU torch tensors:
    valid_originals{1,2}.pkl / valid_reconstructions{1,2}.pkl, the inputs and
    reconstructions of the last batch of `loader` (the test loader; None without
    decoders), and weight{1,2}.pkl, the codebooks (K, D) (None without VQ).
    Returns numpy copies of the first `num` items for the plots."""
    model.eval()
    image, audio, _ = runtime.to_device(last_batch(loader))
    with runtime.autocast():
        out = model(image, audio)
    pairs = {1: (image, out.recon_image), 2: (audio, out.recon_audio)}
    arrays = {}
    for k, (original, recon) in pairs.items():
        original = original.float().cpu().contiguous()
        recon = None if recon is None else recon.float().cpu().contiguous()
        save_pickle(run_dir / f'valid_originals{k}.pkl', original)
        save_pickle(run_dir / f'valid_reconstructions{k}.pkl', recon)
        arrays[k] = (original[:num].numpy(), None if recon is None else recon[:num].numpy())
    for k, codebook in enumerate(model.codebooks(), start=1):
        save_pickle(run_dir / f'weight{k}.pkl',
                    None if codebook is None else codebook.float().cpu().clone())
    return arrays
