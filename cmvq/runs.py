"""A run folder: results_dir/<YYYYmmdd-HHMMSS>/ with its log, config, checkpoints.

start_run makes a new folder exclusively and writes log.txt, config.json,
splits.json and environment.json first (minGPT's habit: what ran is on disk before
it runs). Every file is written atomically (temporary name, then rename) and the
log is flushed line by line, so a crash leaves a readable log and no half-written
file. A saved run is found again by its timestamp (find_run_dir, saved_config) and
its best checkpoint rebuilt from its own config (load_model).
"""
import contextlib
import fcntl
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
import zipfile
from pathlib import Path

import av
import librosa
import numpy as np
import sklearn
import torch
import torchvision
from tqdm import tqdm

import model as models
from cmvq import atomic, distributed
from cmvq.config import RUNTIME_KEYS, TIMESTAMP_FORMAT, build_model, model_config
from cmvq.errors import BadValueError, MissingError, NoSpaceError, UserError, one_line
from cmvq.runtime import precision, resolve_device


def save_pickle(path, obj):
    atomic.write_pickle(path, obj)


def save_json(path, obj):
    atomic.write_json(path, obj, default=_jsonable)


def save_json_new(path, obj):
    """save_json under a name no other file has (atomic.write_new); returns the path."""
    return atomic.write_new(path, json.dumps(obj, indent=1, default=_jsonable) + '\n')


def save_torch(path, obj):
    """torch.save, atomically and fsync'ed; a full disk is one line (atomic.write)."""
    def writer(tmp):
        with open(tmp, 'wb') as f:  # a Python file: ENOSPC stays an OSError in the chain
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic.write(path, writer)


def read_json(path):
    """The JSON object in path; one line naming a missing or damaged file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingError(f'{path} does not exist') from None
    except (OSError, ValueError) as e:
        raise BadValueError(f'{path} cannot be read as JSON: {e}') from None


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
    """Print and append to log.txt, line by line; lines are numbered, and an appended
    re-evaluation continues the numbering of the lines already there.

    Each message is appended whole under an exclusive lock (flock), so lines of two
    processes writing one log (two evaluations of a run) stay whole, and the
    numbering continues from whatever the other process wrote. A message that cannot
    be written (disk full) is cut off again: the log keeps whole lines only.

    Under torchrun only rank 0 logs; the other ranks write their failure (error())
    and nothing else."""

    def __init__(self, path, rank=0):
        self.path, self.rank = Path(path), rank
        self.count = _last_line_number(self.path)
        self.fd = (os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                   if rank == 0 else None)
        self.end = os.fstat(self.fd).st_size if self.fd is not None else 0  # our last write

    def __call__(self, msg=''):
        if self.fd is None:
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(self.fd).st_size
            if start != self.end:  # another process wrote
                self.count = _last_line_number(self.path)
            lines = []
            for line in str(msg).splitlines() or ['']:
                lines.append(f'[{self.count + len(lines) + 1:04d}] {line}')
                tqdm.write(lines[-1])
            self.end = _append(self.fd, self.path, start, ''.join(f'{t}\n' for t in lines))
            self.count += len(lines)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def error(self, msg):
        """A failure, from any rank (the run folder may be on another node: then stderr).
        Never raises: on rank 0 the message is printed even when the log cannot take it."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self(msg)
            return
        text = ''.join(f'[rank {self.rank}] {line}\n' for line in str(msg).splitlines())
        try:
            with open(self.path, 'a') as f:
                f.write(text)
        except OSError:
            sys.stderr.write(text)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _append(fd, path, start, text):
    """Write text at the end (start) of the log fd, all of it or nothing; returns the
    new end. A failed write is cut off; a full disk is a NoSpaceError."""
    data = text.encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        if atomic.disk_full(e):
            raise NoSpaceError(f'disk full while appending to {path} (it keeps its lines so '
                               'far); free space on that disk') from None
        raise
    return os.fstat(fd).st_size


def _last_line_number(path):
    """The number of the last '[NNNN] ' line of an existing log (0 if none)."""
    if not path.is_file():
        return 0
    numbers = re.findall(r'^\[(\d+)\] ', path.read_text(errors='replace'), re.MULTILINE)
    return int(numbers[-1]) if numbers else 0


def versions():
    """Library versions and machine facts recorded with every run."""
    info = {'python': sys.version.split()[0], 'platform': platform.platform(),
            'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'numpy': np.__version__, 'scikit-learn': sklearn.__version__,
            'librosa': librosa.__version__, 'av': av.__version__,
            'cuda': torch.version.cuda, 'cpu_threads': torch.get_num_threads()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info


def read_checkpoint(path):
    """torch.load of a checkpoint (tensors on the CPU) with weights_only=True: tensors and
    plain values only, so nothing in the file runs. A missing, truncated, damaged or
    foreign file is one line naming it."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise MissingError(f'checkpoint {path} does not exist') from None
    except Exception as e:  # noqa: BLE001 - torch reports damage as RuntimeError, OSError...
        refused = re.search(r'Unsupported global: (?:GLOBAL )?(\S+)', str(e))
        if refused:  # weights_only met a callable: what a crafted file would run
            raise BadValueError(f'{path} holds {refused[1]}, not only tensors and plain '
                                'values: refused unread (weights_only=True)') from None
        why = ('it is not a whole torch.save archive (truncated, or another format)'
               if not zipfile.is_zipfile(path) else one_line(e).split('. ')[0][:200])
        raise BadValueError(f'{path} cannot be read as a checkpoint: {why}') from None


def load_checkpoint(path):
    """read_checkpoint on rank 0, sent to every rank (the run folder may exist on rank 0's
    node only); a failure is raised on every rank."""
    return _on_main(lambda: read_checkpoint(path))


def check_checkpoints(run_dir, names=None):
    """{name: epoch} of the checkpoints names (None: those of the script that trained
    run_dir), each read before anything is written; one line naming a missing or
    damaged one."""
    names = names or CHECKPOINTS[trained_by(run_dir)]
    return _on_main(lambda: {n: read_checkpoint(Path(run_dir) / n).get('epoch') for n in names})


def _on_main(read):
    """read() on rank 0, its result on every rank; a UserError is raised on every rank."""
    result = None
    if distributed.is_main():
        try:
            result = read()
        except UserError as e:
            result = e
    result = distributed.broadcast(result)
    if isinstance(result, UserError):
        raise result
    return result


def load_weights(net, path, key='model'):
    """Load the state dict checkpoint[key] of checkpoint path (key None: the file is the
    state dict) into net; returns the checkpoint. A file of another model is one line
    naming it."""
    checkpoint = load_checkpoint(path)
    where = f'{path} does not fit {type(net).__name__}'
    try:
        missing, unexpected = net.load_state_dict(checkpoint if key is None else
                                                  checkpoint[key], strict=False)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # shapes differ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise BadValueError(f'{where}: {lines[min(1, len(lines) - 1)][:200]}') from None
    if missing or unexpected:
        raise BadValueError(f'{where}: ' + '; '.join(
            f'{len(keys)} {what} keys (e.g. {keys[0]})' for what, keys in
            (('missing', missing), ('unexpected', unexpected)) if keys))
    return checkpoint


def start_run(cfg, argv, fingerprint):
    """New run folder with log.txt, config.json, splits.json (fingerprint: what each
    split holds, preflight.split_fingerprint) and environment.json (argv, versions, the
    precision the run computes in), written first.

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
        'processes': ctx.world_size, 'precision': precision(cfg, resolve_device(cfg)),
        'versions': versions()})
    return run_dir, log


def logged(fn):
    """Log why a run stopped before it propagates, so the log so far stays readable:
    a user's mistake (UserError) as its one line; SIGTERM or Ctrl-C as one line saying
    what last.pt holds; anything else with its traceback. Under torchrun a failure
    that follows the end of another process names that rank, as one line."""
    def wrapper(cfg, run_dir, log, *args):
        try:
            with atomic.sigterm_raises():
                return fn(cfg, run_dir, log, *args)
        except UserError as e:
            log.error(f'Run failed: {one_line(e)}')
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            notes = [_stop_reason(e), distributed.ended_note(), _resume_note(run_dir)]
            log.error('Run stopped: ' + '; '.join(n for n in notes if n))
            raise
        except BaseException as e:
            ended = distributed.ended_note()
            if not ended:
                log.error('Run failed:\n' + traceback.format_exc())
                raise
            first = re.sub(r'^\[[^]]*\]\s*', '', one_line(e)).split('. ')[0]  # gloo's file:line off
            error = UserError(f'{ended}; this process stopped with it ({first[:200]})')
            log.error(f'Run failed: {error}')
            raise error from None
        finally:
            log.close()
    return wrapper


def _stop_reason(error):
    if isinstance(error, KeyboardInterrupt):
        return 'interrupted (Ctrl-C)'
    if error.code == 128 + signal.SIGTERM:  # atomic.sigterm_raises
        return 'terminated (SIGTERM)'
    return f'exit status {error.code}'


def _resume_note(run_dir):
    """What an unfinished training run can be continued from ('' for a finished run)."""
    if (run_dir / 'metrics.json').is_file():
        return ''
    last = run_dir / 'last.pt'
    if not last.is_file():
        return 'nothing to resume from (no last.pt): start a new run'
    try:
        epoch = read_checkpoint(last)['epoch']
    except UserError as e:
        return one_line(e)
    return f'last.pt holds epoch {epoch}: continue with --resume={run_dir.name}'


def saved_config(cfg, script='main.py', key='timestamp'):
    """The config of the saved run cfg[key] with this machine's runtime settings; a run
    that `script` did not train (or that never trained) is a UserError saying what to
    do (script None: a run of either script)."""
    run_dir = find_run_dir(cfg['results_dir'], cfg[key], script)
    saved = read_json(run_dir / 'config.json')
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
        checkpoints = [load_weights(net, path) for net, path in parts]
        return models.ModelTwoStage(parts[0][0], parts[1][0]), checkpoints[-1]['epoch']
    net = runtime.prepare(build_model(cfg))
    return net, load_weights(net, run_dir / 'model.pt')['epoch']
