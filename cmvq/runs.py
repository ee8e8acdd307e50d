"""A run folder: results_dir/<YYYYmmdd-HHMMSS>/ with its log, config, checkpoints.

start_run makes a new folder exclusively and writes log.txt, config.json,
splits.json and environment.json first (minGPT's habit: what ran is on disk before
it runs). Every file is written atomically (temporary name, then rename) and the
log is flushed line by line, so a crash leaves a readable log and no half-written
file. A saved run is found again by its timestamp (find_run_dir, saved_config) and
its best checkpoint rebuilt from its own config (load_model).
"""
import fcntl
import json
import os
import platform
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import av
import librosa
import numpy as np
import sklearn
import torch
from tqdm import tqdm

import model as models
from cmvq import atomic, distributed
from cmvq.config import RUNTIME_KEYS, TIMESTAMP_FORMAT, build_model, model_config
from cmvq.errors import BadValueError, MissingError, UserError, one_line


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
    """results_dir/timestamp if `script` trained it (script None: any trained run);
    otherwise a UserError saying which script evaluates it, or listing the runs
    `script` can evaluate."""
    path = Path(results_dir) / timestamp
    owner = trained_by(path)
    if owner is not None and script in (owner, None):
        return path
    if owner is not None:
        raise BadValueError(f'run {timestamp!r} was trained by {owner}; evaluate it with '
                            f'python3 {owner} --timestamp={timestamp} (same other arguments)')
    runs = sorted(p.name for p in Path(results_dir).glob('*')
                  if trained_by(p) and script in (trained_by(p), None))
    why = 'has no checkpoint (it never trained)' if path.is_dir() else 'does not exist'
    raise MissingError(f'run {str(path)!r} {why}; runs {script or "it"} can evaluate: '
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
    """Library versions and machine facts recorded with every run (torchvision's from its
    package metadata: importing it costs a second, and only base_type 4 needs it)."""
    info = {'python': sys.version.split()[0], 'platform': platform.platform(),
            'torch': torch.__version__, 'torchvision': metadata.version('torchvision'),
            'numpy': np.__version__, 'scikit-learn': sklearn.__version__,
            'librosa': librosa.__version__, 'av': av.__version__,
            'cuda': torch.version.cuda, 'cpu_threads': torch.get_num_threads()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def load_checkpoint(path, weights_only=True):
    """A checkpoint dict read by rank 0 and sent to every rank (the run folder may exist
    on rank 0's node only); tensors on the CPU (load_state_dict moves them)."""
    return distributed.broadcast(torch.load(path, map_location='cpu', weights_only=weights_only)
                                 if distributed.is_main() else None)




def start_run(cfg, argv, fingerprint):
    """New run folder with log.txt, config.json, splits.json (fingerprint: what each
    split holds, preflight.split_fingerprint) and environment.json, written first.

    Under torchrun rank 0 makes it and tells the others its name; they log nothing
    but a failure."""
    ctx = distributed.context()
    if not ctx.is_main:
        run_dir = distributed.broadcast(None)
        return run_dir, Log(run_dir / 'log.txt', ctx.rank)
    run_dir = distributed.broadcast(new_run_dir(cfg['results_dir']))
    log = Log(run_dir / 'log.txt')
    log(f'Message: {cfg["message"]}')
    log(f'Run folder: {run_dir}')
    log('Config: ' + json.dumps(cfg))
    save_json(run_dir / 'config.json', cfg)
    save_json(run_dir / 'splits.json', fingerprint)
    save_json(run_dir / 'environment.json', {
        'argv': [sys.argv[0], *argv], 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
        'processes': ctx.world_size, 'versions': versions()})
    return run_dir, log


def logged(fn):
    """Log why a run stopped before it propagates, so the log so far stays readable:
    a user's mistake (UserError) as its one line, anything else with its traceback."""
    def wrapper(cfg, run_dir, log, *args):
        try:
            return fn(cfg, run_dir, log, *args)
        except UserError as e:
            log.error(f'Run failed: {one_line(e)}')
            raise
        except BaseException:
            log.error('Run failed:\n' + traceback.format_exc())
            raise
        finally:
            log.close()
    return wrapper


def saved_config(cfg, script='main.py', key='timestamp'):
    """The config of the saved run cfg[key] with this machine's runtime settings; a run
    that `script` did not train (or that never trained) is a UserError saying what to
    do (script None: a run of either script)."""
    run_dir = find_run_dir(cfg['results_dir'], cfg[key], script)
    saved = json.loads((run_dir / 'config.json').read_text())
    # Runs saved before recon_loss existed trained with the variance-normalised loss.
    saved.setdefault('recon_loss', 'mse/var')
    return run_dir, {**saved, **{k: cfg[k] for k in RUNTIME_KEYS if k in cfg}}


def load_model(cfg, run_dir, runtime):
    """(model, epoch of its checkpoint): the saved run's model rebuilt from its config
    with its best checkpoint loaded: model.pt of a main.py run, or model_vae.pt and
    model_solver.pt of a main_separate.py run (a frozen VQ-VAE feeding its solver)."""
    if trained_by(run_dir) == 'main_separate.py':
        mcfg = model_config(cfg)
        parts = [(runtime.prepare(build(mcfg)), run_dir / name) for build, name in
                 ((models.build_vqvae, 'model_vae.pt'), (models.build_solver, 'model_solver.pt'))]
        for net, path in parts:
            checkpoint = load_checkpoint(path)
            net.load_state_dict(checkpoint['model'])
        return models.ModelTwoStage(parts[0][0], parts[1][0]), checkpoint['epoch']
    net = runtime.prepare(build_model(cfg))
    checkpoint = load_checkpoint(run_dir / 'model.pt')
    net.load_state_dict(checkpoint['model'])
    return net, checkpoint['epoch']
