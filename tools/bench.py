"""Throughput benchmark: data loading, training step and epoch time, side by side.

    python3 -m tools.bench                 # the header below (about 3 min on a 2-core CPU)
    python3 -m tools.bench --quick=True    # small sizes: under a minute on a 2-core CPU
    python3 -m tools.bench --full=True     # also main.py end to end on a 7,442-clip twin

Sections (each a table in results.md):
1. Per-clip cost (ms): the original's path (moviepy decode of the whole FLV, centre
   frame crop, librosa log-mel), its parts, a PyAV item (CREMADDataset cache=False)
   and cached items (train: random frame; eval: centre frame; also with one torch
   thread, as in DataLoader workers). Methods are interleaved clip by clip, in a
   rotating order, so load on the machine hits all of them alike; speed-up =
   original median / method median.
2. Loader throughput (items/s) of cmvq.loaders.make_loader: raw (decode per item) vs
   cached, per worker count, plus the device-resident DeviceLoader (data_on_gpu)
   when the loaders have it. Timed from the first batch on (worker start-up is
   excluded: it is paid once per run with persistent workers).
3. Training step (samples/s, peak memory) of base_type 0-4 at the paper's widths
   (main.py's header) on a random batch already on the device, through
   cmvq.train.run_epoch: the real step (Runtime.to_device, autocast, compute_loss,
   backward, Adam), in fp32. For cpu_grid_base_types also bf16 autocast x
   channels_last off/on on the CPU (in the same alternating rounds), which is what
   cmvq.runtime.Runtime's amp='auto' / channels_last='auto' rule for the CPU rests on.
   On the CPU also torch.compile (main.py's amp and channels_last) for
   cpu_compile_base_types. On CUDA fp32 vs bf16 autocast x channels_last off/on, and
   torch.compile off/on for compile_base_types. A compiled row's warm-up seconds are
   its compile time; a row whose first compiled step failed says so (and ran eager).
   Every row also gives its TFLOP/s (the step's matrix FLOPs, cmvq.flops.step_flops,
   times samples/s) and its share of the matmul peak measured in the same run on that
   device and precision (cmvq.flops.matmul_peak; section "Matmul peak").
   Reference: on CPU the project's step is compared with `ReferenceModel`
   (cmvq/reference_model.py), a straightforward implementation of the same
   base_type 0 architecture with exactly the same trainable parameters (asserted);
   the comparison is then about the computation. (The original re-creates
   nn.Parameters inside forward; that changes what Adam sees, so copying it would
   not be like for like.) Both run through the same run_epoch, at the same batch
   size and thread count, in alternating rounds.
   Memory: CUDA: torch.cuda.max_memory_allocated (the model alone on the device).
   CPU: the peak resident set size above the one before the timed steps (activations,
   gradients and transients; the weights and Adam state made during warm-up are not
   counted), with freed heap pages first handed back to the OS (glibc malloc_trim):
   otherwise the steps reuse them and no growth shows. The peak is read from VmHWM
   after resetting it through /proc/self/clear_refs (Linux); where that fails, the
   growth of ru_maxrss, which shows only a new high-water mark. results.json says
   which was used.
4. Profile (profile_steps > 0): torch.profiler over training steps of base_type 0
   with main.py's settings on the device: the operators with the most self time
   (CUDA time on a GPU, CPU time otherwise).
5. (full=True) main.py end to end with its header's settings (data_on_gpu='auto',
   amp, channels_last, 50 epochs unless full_epochs) on a full-size twin rendered
   like ../shared/crema-d: epoch and wall seconds, GPU utilisation sampled with
   nvidia-smi, and the FLOP rate of the epochs (train steps + validation forwards)
   against the matmul peak measured in the same run.

Results go to out_dir/<YYYYmmdd-HHMMSS>/ (results.json, results.md; a new folder
every run) with the machine's facts and the exact argv. The bench twin and its
caches live under bench/ (gitignored) and are reused by later runs.
"""
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import datasets
import main
import model as models
from cmvq import atomic, media
from cmvq.config import model_config, non_negative_int, optional_positive_int, positive_int
from cmvq.configurator import configure, read_config_file
from cmvq.cremad import prepare_twin
from cmvq.errors import run_script
from cmvq.flops import matmul_peak, step_flops
from cmvq.loaders import make_loader
from cmvq.runs import new_run_dir, save_json, versions
from cmvq.runtime import Runtime, synchronize
from cmvq.train import run_epoch
from cmvq.reference_model import build_reference

# ------------------------------------------------------------------------------------------
# config: edit here, or override with a config file / --key=value (values are type-checked)
quick = False               # True: small sizes (QUICK below) for keys not set explicitly
full = False                # True: also time epochs on a full-size twin (~15 min to render
#                             on 2 cores, ~13 GB of cache), see the full_* keys
seed = 0                    # random batches, shuffles and frame draws
out_dir = 'bench'           # results go to out_dir/<YYYYmmdd-HHMMSS>/
twin_root = 'bench/twin/CREMA-D'  # bench twin (made if missing; full-length clips)
data_path = 'bench/data'    # its split configs (made if missing)
cache_dir = 'bench/cache'   # decode-once caches of the bench (and the full twin)
twin_actors = 1             # actors of the bench twin (82 clips each)
decode_clips = 8            # clips timed per per-clip method
decode_rounds = 3           # passes over those clips
loader_items = 256          # items timed per loader measurement
loader_workers = (0, 1, 2)  # DataLoader worker counts to compare
loader_batch_size = 32      # batch size of the loader measurements
batch_size = 16             # training-step batch on CPU
cuda_batch_size = 128       # training-step batch on CUDA (the paper's)
base_types = (0, 1, 2, 3, 4)  # models of the training-step section
reference = True            # also time ReferenceModel (base_type 0) on CPU
warmup_steps = 2            # untimed steps before each measurement
train_steps = 4             # timed steps per round
train_rounds = 2            # CPU: rounds, alternating between models
compile_base_types = (0,)   # CUDA: base types also timed with torch.compile
cpu_grid_base_types = (0,)  # CPU: base types also timed with bf16 autocast x channels_last
cpu_compile_base_types = (0,)  # CPU: base types also timed with torch.compile (minutes each)
profile_steps = 3           # profiled training steps of base_type 0 (0: no profile)
num_threads = 0             # torch CPU threads (0: torch's default)
full_root = 'bench/full/CREMA-D'  # full=True: the 7,442-clip twin
full_data_path = 'bench/full-data'  # its split configs
full_epochs = None          # epochs of the full run (None: main.py's num_epoch)
# ------------------------------------------------------------------------------------------

# What quick=True changes (keys given on the command line keep their value).
QUICK = {'decode_clips': 3, 'decode_rounds': 2, 'loader_items': 64, 'loader_workers': (0, 2),
         'loader_batch_size': 16, 'batch_size': 4, 'cuda_batch_size': 32,
         'base_types': (0, 1), 'warmup_steps': 1, 'train_steps': 1, 'compile_base_types': (),
         'cpu_grid_base_types': (), 'cpu_compile_base_types': (), 'profile_steps': 1,
         'full_epochs': 1}
SHARED_CREMAD = Path(__file__).resolve().parents[2] / 'shared' / 'crema-d'
VARIANCES = (1.0, 1.0)  # the loss's scale does not change the step's cost
STEP_CONFIG = {'dataset': 'CREMA-D', 'regularization': True, 'recon_loss': 'mse'}  # run_epoch's


def _workers(v):
    """a tuple of ints >= 0, e.g. (0, 1, 2)"""
    return isinstance(v, tuple) and len(v) > 0 and all(map(non_negative_int, v))


def _base_types(v):
    """a tuple of base types from 0, 1, 2, 3, 4, e.g. (0, 1)"""
    return isinstance(v, tuple) and all(b in models.BASE_TYPES for b in v)


CHOICES = {'quick': (False, True), 'full': (False, True), 'seed': non_negative_int,
           'twin_actors': positive_int, 'decode_clips': positive_int,
           'decode_rounds': positive_int, 'loader_items': positive_int,
           'loader_workers': _workers, 'loader_batch_size': positive_int,
           'batch_size': positive_int, 'cuda_batch_size': positive_int,
           'base_types': _base_types, 'reference': (True, False),
           'warmup_steps': non_negative_int, 'train_steps': positive_int,
           'train_rounds': positive_int, 'compile_base_types': _base_types,
           'cpu_grid_base_types': _base_types, 'cpu_compile_base_types': _base_types,
           'profile_steps': non_negative_int, 'num_threads': non_negative_int,
           'full_epochs': optional_positive_int}


def resolve(argv):
    """Header constants with overrides; quick=True shrinks the keys not set explicitly."""
    cfg = configure(globals(), argv, CHOICES)
    if cfg['quick']:
        given = set()
        for arg in argv:
            given |= ({arg[2:].partition('=')[0]} if arg.startswith('--')
                      else set(read_config_file(arg)))
        cfg.update({k: v for k, v in QUICK.items() if k not in given})
    return cfg


# ----------------------------------------------------------------------------- helpers

def summary_ms(seconds):
    """{'mean_ms', 'median_ms', 'n'} of a list of durations in seconds."""
    ms = [1000 * s for s in seconds]
    return {'mean_ms': statistics.fmean(ms), 'median_ms': statistics.median(ms), 'n': len(ms)}


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """Facts that decide the numbers: CPU, cores, threads, library versions, GPU."""
    info = {'cpu': cpu_model(), 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            **versions()}
    info['cuda_device'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def warm_up_librosa():
    """librosa compiles its kernels on first use (~10 s): keep that out of the timings."""
    media.log_mel(np.zeros(media.AUDIO_RATE, np.float32))


# ----------------------------------------------------------------------------- the bench twin

def prepare_bench_twin(cfg):
    """The bench twin (full-length clips: moviepy's audio reader fails on clips under
    1 s) and its split configs with the train cache, made if missing."""
    prepare_twin(cfg['twin_root'], cfg['data_path'], seed=cfg['seed'], cache_dir=cfg['cache_dir'],
                 num_actors=cfg['twin_actors'], duration_scale=1.0)


def bench_dataset(data_path, cache_dir, *, cache, train, split='train'):
    return datasets.CREMADDataset(data_path, split, train=train, cache=cache,
                                  cache_dir=cache_dir, progress=False)


# ----------------------------------------------------------------------------- 1. per clip

def original_item(path):
    """The original code's per-item work: moviepy decode (every frame), centre crop,
    log-mel: (face (128, 128, 3) uint8, log-mel (256, 256))."""
    faces, spec = datasets.decode_clip(path, frame_jitter=0, backend='moviepy')
    return faces[0], spec


def pyav_decode(path):
    return media.read_flv(path, 'pyav')


def decode_methods(data_path, cache_dir, clips, original=True):
    """({name: f(i)}, number of clips) for the per-clip comparison, the original first."""
    raw = bench_dataset(data_path, cache_dir, cache=False, train=False)
    cached_train = bench_dataset(data_path, cache_dir, cache=True, train=True)
    cached_eval = bench_dataset(data_path, cache_dir, cache=True, train=False)
    paths = raw.paths
    clips = min(clips, len(paths))
    audio = [pyav_decode(paths[i])[1].mean(axis=0) for i in range(clips)]  # for log-mel only
    methods = {}
    if original:
        methods['original: moviepy + crop + log-mel'] = lambda i: original_item(paths[i])
        methods['moviepy decode only'] = lambda i: media.read_flv(paths[i], 'moviepy')
    methods.update({
        'PyAV decode only': lambda i: pyav_decode(paths[i]),
        'log-mel only': lambda i: media.log_mel(audio[i]),
        'PyAV item (cache=False)': raw.__getitem__,
        'cached train item': cached_train.__getitem__,
        'cached eval item': cached_eval.__getitem__,
        'cached eval item, 1 torch thread': one_thread(cached_eval.__getitem__),
    })
    return methods, clips


def one_thread(fn):
    """fn run with one torch thread, as in DataLoader workers (torch sets 1 there): on a
    busy machine, waking the intra-op pool for a small tensor op can cost milliseconds."""
    def wrapped(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return wrapped


def measure_decode(data_path, cache_dir, *, clips, rounds, original=True):
    """Per-clip cost of each method (mean and median ms) and its speed-up over the
    original (or, without it, over the PyAV item). Clip by clip, every method runs
    once, in an order rotated each time."""
    warm_up_librosa()
    methods, n = decode_methods(data_path, cache_dir, clips, original)
    names = list(methods)
    for name in names:  # first calls import and set up decoders; cached reads fill the page cache
        for i in range(n if 'cached' in name else 1):
            methods[name](i)
    times = {name: [] for name in names}
    for r in range(rounds):
        for i in range(n):
            shift = (r * n + i) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                methods[name](i)
                times[name].append(time.perf_counter() - start)
    rows = [{'method': name, **summary_ms(t)} for name, t in times.items()]
    base = rows[0]['median_ms']
    for row in rows:
        row['speedup_vs_' + ('original' if original else 'pyav_item')] = base / row['median_ms']
    return rows


# ----------------------------------------------------------------------------- 2. loaders

def loader_config(batch_size, workers, seed, data_on_gpu=False):
    """The keys cmvq.loaders.make_loader reads."""
    return {'batch_size': batch_size, 'num_workers': workers, 'shuffle': True, 'seed': seed,
            'data_on_gpu': data_on_gpu}


def items_per_second(loader, items, device):
    """Items/s over `items` items, from the first batch on; epochs restart as needed."""
    it = iter(loader)
    next(it)  # worker start-up and first fetch: not steady state
    count, start = 0, time.perf_counter()
    while count < items:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        count += len(batch[0])
    synchronize(device)
    seconds = time.perf_counter() - start
    return {'items': count, 'seconds': seconds, 'items_per_s': count / seconds}


def measure_loaders(data_path, cache_dir, *, workers, items, batch_size, runtime, seed):
    """Rows of items/s: raw (PyAV decode per item) and cached DataLoaders per worker
    count, then the DeviceLoader (on runtime.device)."""
    warm_up_librosa()  # before forking workers, as build_cache does
    rows = []
    for cache in (False, True):
        dataset = bench_dataset(data_path, cache_dir, cache=cache, train=True)
        for w in workers:
            loader = make_loader(dataset, loader_config(batch_size, w, seed), runtime,
                                 train=True)
            rows.append({'loader': 'cached' if cache else 'raw (PyAV decode)', 'workers': w,
                         **items_per_second(loader, items, runtime.device)})
            del loader  # stops its persistent workers before the next measurement
            gc.collect()
    rows.append(measure_device_loader(data_path, cache_dir, items=items,
                                      batch_size=batch_size, runtime=runtime, seed=seed))
    return rows


def measure_device_loader(data_path, cache_dir, *, items, batch_size, runtime, seed):
    dataset = bench_dataset(data_path, cache_dir, cache=True, train=True)
    start = time.perf_counter()
    loader = make_loader(dataset, loader_config(batch_size, 0, seed, data_on_gpu=True),
                         runtime, train=True)
    synchronize(runtime.device)
    setup = time.perf_counter() - start
    return {'loader': f'DeviceLoader ({runtime.device})', 'workers': 0,
            'setup_seconds': setup, **items_per_second(loader, items, runtime.device)}


# ----------------------------------------------------------------------------- 3. training step

def random_batch(batch_size, seed):
    """A batch in the loaders' format; log-mel-like values for the audio."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 3, media.IMAGE_SIZE, media.IMAGE_SIZE, generator=g)
    audio = -40 + 15 * torch.randn(batch_size, 1, media.MEL['n_mels'], media.SPEC_FRAMES,
                                   generator=g)
    labels = [torch.randint(0, n, (batch_size,), generator=g) for n in (6, 4, 2, 12)]
    return (image, audio, *labels)


@contextmanager
def peak_memory(device):
    """Yields a dict that gets 'peak_mb' (see the module docstring) and 'method'."""
    result = {}
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result.update(peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                      method='torch.cuda.max_memory_allocated')
        return
    trimmed = _release_free_memory()
    before, reset = _rss_kb('VmRSS'), _reset_peak_rss()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield result
    if reset:
        result.update(peak_mb=(_rss_kb('VmHWM') - before) / 1024,
                      method='VmHWM (reset via /proc/self/clear_refs) - VmRSS before'
                      + (' (after malloc_trim)' if trimmed else ''))
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max
        result.update(peak_mb=grown / 1024, method='ru_maxrss growth (a lower bound)')


def _release_free_memory():
    """Hand freed heap pages back to the OS (glibc malloc_trim): otherwise memory freed
    by an earlier measurement stays resident, is reused, and hides this one's peak."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def _rss_kb(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss():
    """Reset the kernel's peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return _rss_kb('VmHWM') > 0
    except OSError:
        return False


class StepTimer:
    """One model ready to train: optimizer, batch, warm-up done (compiled first when
    runtime.compile; warmup_seconds); time(steps) runs the real training step
    (cmvq.train.run_epoch) and returns (seconds, memory)."""

    def __init__(self, net, runtime, *, batch_size, warmup, seed):
        self.net = runtime.prepare(net)
        self.runtime, self.batch_size = runtime, batch_size
        self.step_net = runtime.compiled(self.net)
        self.cpu_seconds = 0.0
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=1e-3)
        # on the device already: the step is timed here, the loader in section 2
        self.batch = tuple(t.to(runtime.device) for t in random_batch(batch_size, seed))
        start = time.perf_counter()
        self._run(warmup)
        synchronize(runtime.device)
        self.warmup_seconds = time.perf_counter() - start

    def _run(self, steps):
        run_epoch(self.step_net, [self.batch] * steps, self.runtime, VARIANCES,
                     STEP_CONFIG, self.optimizer)

    def time(self, steps):
        """(wall seconds, memory) of `steps` steps; self.cpu_seconds adds up the process's
        CPU time of every timed step (all threads), which other load does not inflate."""
        synchronize(self.runtime.device)
        with peak_memory(self.runtime.device) as memory:
            start, cpu = time.perf_counter(), time.process_time()
            self._run(steps)
            synchronize(self.runtime.device)
            seconds = time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        return seconds, memory


def train_row(label, base_type, timer, seconds, steps, memory, **extra):
    runtime = timer.runtime
    row = {'model': label, 'base_type': base_type, 'device': str(runtime.device),
           'precision': 'bf16' if runtime.amp else 'fp32',
           'channels_last': runtime.channels_last, 'compile': runtime.compile, **extra,
           'batch_size': timer.batch_size, 'steps': steps,
           'samples_per_s': timer.batch_size * steps / seconds,
           'ms_per_step': 1000 * seconds / steps,
           'warmup_seconds': timer.warmup_seconds, 'peak_mb': memory['peak_mb'],
           'memory_method': memory['method']}
    if runtime.compile_failure:
        row['compile_failure'] = runtime.compile_failure
    return row


def cpu_runtime(amp='off', channels_last=False, compile=False):
    return Runtime({'device': 'cpu', 'amp': amp, 'channels_last': channels_last,
                    'compile': compile})


def cpu_variants(base_types, grid_base_types, compile_base_types=()):
    """(base_type, amp, channels_last, compile) of the CPU rows: fp32 for every base
    type, bf16 autocast x channels_last for grid_base_types, then torch.compile with
    main.py's amp and channels_last for compile_base_types."""
    rows = [(b, 'off', False, False) for b in base_types]
    rows += [(b, amp, cl, False) for b in grid_base_types for amp in ('off', 'bf16')
             for cl in (False, True) if (b, amp, cl, False) not in rows]
    header = main.header()
    return rows + [(b, header['amp'], header['channels_last'], True) for b in compile_base_types]


def measure_train_cpu(model_cfg, *, base_types, reference, batch_size, warmup, steps,
                      rounds, seed, grid_base_types=(), compile_base_types=()):
    """CPU rows: every base type (and the reference) in fp32, the precision x
    memory-format grid of grid_base_types and compile_base_types compiled, in `rounds`
    alternating rounds of `steps` steps; throughput from the total time, memory the
    largest peak."""
    timers = {}
    for b, amp, channels_last, compiled in cpu_variants(base_types, grid_base_types,
                                                        compile_base_types):
        torch.manual_seed(seed)
        net = models.build_model({**model_cfg, 'base_type': b})
        timers[(f'Model (base_type {b})', b, amp, channels_last, compiled)] = StepTimer(
            net, cpu_runtime(amp, channels_last, compiled), batch_size=batch_size,
            warmup=max(warmup, 2 * compiled), seed=seed)
    if reference:
        torch.manual_seed(seed)
        timers[('ReferenceModel (straightforward)', 0, 'off', False, False)] = StepTimer(
            build_reference(model_cfg), cpu_runtime(), batch_size=batch_size, warmup=warmup,
            seed=seed)
    totals = {key: [0.0, []] for key in timers}
    keys = list(timers)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            seconds, memory = timers[key].time(steps)
            totals[key][0] += seconds
            totals[key][1].append(memory)
    return [train_row(key[0], key[1], timers[key], total, steps * rounds,
                      max(mems, key=lambda m: m['peak_mb']),
                      cpu_ms_per_step=1000 * timers[key].cpu_seconds / (steps * rounds))
            for key, (total, mems) in totals.items()]


def cuda_variants(base_type, compile_base_types):
    """(amp, channels_last, compile) combinations timed on CUDA for a base type."""
    compiles = (False, True) if base_type in compile_base_types else (False,)
    return [(amp, cl, c) for c in compiles for amp in ('off', 'bf16') for cl in (False, True)]


def measure_train_cuda(model_cfg, *, base_types, compile_base_types, batch_size, warmup,
                       steps, seed):
    """CUDA rows, one model on the device at a time (so its peak memory is its own)."""
    rows = []
    for b in base_types:
        for amp, channels_last, compiled in cuda_variants(b, compile_base_types):
            runtime = Runtime({'device': 'cuda', 'amp': amp, 'channels_last': channels_last,
                               'compile': compiled})
            torch.manual_seed(seed)
            net = models.build_model({**model_cfg, 'base_type': b})
            timer = StepTimer(net, runtime, batch_size=batch_size,
                              warmup=max(warmup, 3 * compiled), seed=seed)
            with host_syncs() as syncs:
                seconds, memory = timer.time(steps)
            rows.append(train_row(f'Model (base_type {b})', b, timer, seconds, steps, memory,
                                  host_syncs=len(syncs)))
            del timer, net
            gc.collect()
            torch.cuda.empty_cache()
    return rows


@contextmanager
def host_syncs():
    """Yields the list of the warnings CUDA's sync debug mode gives for each operation that
    waits for the device. A timed run_epoch has a few at its end (the loss check, the
    history's copy to the host) and should have none per step."""
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode('default')


def step_costs(model_cfg, base_types):
    """{base_type: (training step, evaluation forward) matrix FLOPs per sample}."""
    costs = {}
    for b in base_types:
        torch.manual_seed(0)
        costs[b] = step_flops(models.build_model({**model_cfg, 'base_type': b}),
                              random_batch(2, 0))
    return costs


def measure_peaks(devices):
    """Rows of the matmul peak (TFLOP/s) per device and precision."""
    return [{'device': str(d), 'precision': name, 'tflops': matmul_peak(d, dtype)}
            for d in devices for name, dtype in (('fp32', torch.float32),
                                                 ('bf16', torch.bfloat16))]


def add_rates(rows, costs, peaks):
    """Each training-step row gets its TFLOP/s and its % of the peak of its device and
    precision (ReferenceModel: base_type 0's FLOPs, the same architecture)."""
    peak = {(p['device'], p['precision']): p['tflops'] for p in peaks}
    for row in rows:
        row['gflop_per_sample'] = costs[row['base_type']][0] / 1e9
        row['tflops'] = row['gflop_per_sample'] * row['samples_per_s'] / 1e3
        row['peak_percent'] = 100 * row['tflops'] / peak[row['device'], row['precision']]


# ----------------------------------------------------------------------------- 4. profile

def measure_profile(model_cfg, *, batch_size, steps, seed, top=15):
    """Rows of the operators with the most self time over `steps` training steps of
    base_type 0 with main.py's device, amp and channels_last (CUDA time on a GPU)."""
    runtime = Runtime(main.header())
    torch.manual_seed(seed)
    timer = StepTimer(models.build_model({**model_cfg, 'base_type': 0}), runtime,
                      batch_size=batch_size, warmup=1, seed=seed)
    cuda = runtime.device.type == 'cuda'
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        timer._run(steps)
        synchronize(runtime.device)
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1
    return [{'op': e.key, 'device': str(runtime.device), 'calls_per_step': e.count / steps,
             'self_ms_per_step': getattr(e, key) / 1000 / steps,
             'share_percent': 100 * getattr(e, key) / total} for e in events[:top]]


# ----------------------------------------------------------------------------- 5. full run

class GpuUtilization:
    """Samples nvidia-smi's utilization.gpu (first GPU) every `interval` s in a thread."""

    def __init__(self, interval=0.5):
        self.interval, self.samples = interval, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        command = ['nvidia-smi', '--query-gpu=utilization.gpu', '--format=csv,noheader,nounits']
        while not self.stop.wait(self.interval):
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return

    def __enter__(self):
        if shutil.which('nvidia-smi') and torch.cuda.is_available():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def mean(self):
        return statistics.fmean(self.samples) if self.samples else None


def prepare_full(cfg):
    """The full-size twin (like ../shared/crema-d) and its split configs and cache."""
    prepare_twin(cfg['full_root'], cfg['full_data_path'], seed=cfg['seed'],
                 cache_dir=cfg['cache_dir'], like=str(SHARED_CREMAD))


def full_argv(cfg, results_dir):
    """main.py's arguments of the full run: its header's settings, the bench's data."""
    epochs = [f'--num_epoch={cfg["full_epochs"]}'] if cfg['full_epochs'] else []
    return [f'--data_path={cfg["full_data_path"]}', f'--cache_dir={cfg["cache_dir"]}',
            f'--results_dir={results_dir}', f'--seed={cfg["seed"]}', '--twin_actors=0',
            *epochs]


def measure_full(cfg, run_dir):
    """main.py end to end (its header's settings) on the full-size twin -> one row:
    epoch and wall seconds, GPU utilisation, the epochs' FLOP rate and its share of
    the matmul peak measured here on the run's device and precision."""
    prepare_full(cfg)
    start = time.perf_counter()
    with GpuUtilization() as gpu:
        test = main.main(full_argv(cfg, run_dir / 'full'))
    wall = time.perf_counter() - start
    run = next((run_dir / 'full').iterdir())
    run_cfg = json.loads((run / 'config.json').read_text())
    epoch_seconds = json.loads((run / 'history.json').read_text())['epoch_seconds']
    runtime = Runtime(run_cfg)
    train_flops, eval_flops = step_flops(models.build_model(model_config(run_cfg)),
                                         random_batch(2, 0))
    train_items, val_items = (len(datasets.load_split(cfg['full_data_path'], split)[0])
                              for split in ('train', 'val'))
    tflops = (len(epoch_seconds) * (train_flops * train_items + eval_flops * val_items)
              / sum(epoch_seconds) / 1e12)
    peak = matmul_peak(runtime.device, torch.bfloat16 if runtime.amp else torch.float32)
    return [{'run': str(run), 'device': str(runtime.device),
             'precision': 'bf16' if runtime.amp else 'fp32', 'train_items': train_items,
             'epochs': len(epoch_seconds), 'epoch_seconds': statistics.fmean(epoch_seconds),
             'epochs_seconds': sum(epoch_seconds), 'wall_seconds': wall,
             'gpu_utilization_pct': gpu.mean(), 'tflops': tflops, 'peak_tflops': peak,
             'peak_percent': 100 * tflops / peak, 'test_accuracy': test['accuracy']}]


# ----------------------------------------------------------------------------- results

COLUMNS = {
    'decode': [('method', 'method', '{}'), ('mean ms', 'mean_ms', '{:.1f}'),
               ('median ms', 'median_ms', '{:.1f}'), ('n', 'n', '{}'),
               ('speed-up vs original (median)', 'speedup_vs_original', '{:.1f}x'),
               ('speed-up vs PyAV item (median)', 'speedup_vs_pyav_item', '{:.1f}x')],
    'loaders': [('loader', 'loader', '{}'), ('workers', 'workers', '{}'),
                ('items/s', 'items_per_s', '{:.1f}'), ('items', 'items', '{}'),
                ('set-up s', 'setup_seconds', '{:.2f}')],
    'train': [('model', 'model', '{}'), ('device', 'device', '{}'),
              ('precision', 'precision', '{}'), ('channels_last', 'channels_last', '{}'),
              ('compile', 'compile', '{}'), ('batch', 'batch_size', '{}'), ('steps', 'steps', '{}'),
              ('samples/s', 'samples_per_s', '{:.2f}'), ('ms/step', 'ms_per_step', '{:.0f}'),
              ('CPU ms/step', 'cpu_ms_per_step', '{:.0f}'),
              ('warm-up s', 'warmup_seconds', '{:.1f}'), ('peak MB', 'peak_mb', '{:.0f}'),
              ('TFLOP/s', 'tflops', '{:.3f}'), ('% of peak', 'peak_percent', '{:.1f}'),
              ('host syncs per timing', 'host_syncs', '{}')],
    'peaks': [('device', 'device', '{}'), ('precision', 'precision', '{}'),
              ('matmul TFLOP/s', 'tflops', '{:.2f}')],
    'profile': [('operator', 'op', '{}'), ('device', 'device', '{}'),
                ('calls/step', 'calls_per_step', '{:.0f}'),
                ('self ms/step', 'self_ms_per_step', '{:.1f}'),
                ('share %', 'share_percent', '{:.1f}')],
    'full': [('device', 'device', '{}'), ('precision', 'precision', '{}'),
             ('train items', 'train_items', '{}'), ('epochs', 'epochs', '{}'),
             ('epoch s', 'epoch_seconds', '{:.2f}'), ('epochs s', 'epochs_seconds', '{:.1f}'),
             ('wall s', 'wall_seconds', '{:.1f}'), ('GPU util %', 'gpu_utilization_pct', '{:.0f}'),
             ('TFLOP/s', 'tflops', '{:.2f}'), ('peak TFLOP/s', 'peak_tflops', '{:.1f}'),
             ('% of peak', 'peak_percent', '{:.1f}'), ('test accuracy', 'test_accuracy', '{:.4f}')],
}
TITLES = {'decode': 'Per-clip cost', 'loaders': 'Loader throughput', 'train': 'Training step',
          'peaks': 'Matmul peak', 'profile': 'Profile of the training step',
          'full': 'main.py end to end, full-size twin'}

def table(rows, columns):
    """Markdown table of rows with the columns some row has; blanks where a row lacks one."""
    columns = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |',
             '|' + '|'.join('---' for _ in columns) + '|']
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else ''
                 for _, key, fmt in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def markdown(results):
    m = results['machine']
    lines = [f'# tools/bench.py, {results["started"]}', '',
             f'`{" ".join(results["argv"])}`; CPU {m["cpu"]} ({m["cores"]} cores, '
             f'{m["torch_threads"]} torch threads), torch {m["torch"]}, '
             f'GPU {m["cuda_device"] or "none"}']
    for section, title in TITLES.items():
        if results.get(section):
            lines += ['', f'## {title}', '', table(results[section], COLUMNS[section])]
    for note in results.get('notes', []):
        lines += ['', note]
    return '\n'.join(lines) + '\n'


def comparison_notes(results):
    """One-line summaries: cached vs original, project vs reference, precision, memory
    format and compile vs the fp32 step; compile failures."""
    notes = []
    decode = {row['method']: row for row in results.get('decode', [])}
    original = decode.get('original: moviepy + crop + log-mel')
    for name in ('cached train item', 'cached eval item'):
        if original and name in decode:
            notes.append(f'{name}: {original["median_ms"] / decode[name]["median_ms"]:.0f}x '
                         f'faster than the original path (median).')
    cpu = [row for row in results.get('train', []) if row['device'] == 'cpu']
    train = {row['model']: row for row in cpu
             if row['precision'] == 'fp32' and not row['channels_last']}
    ours, ref = train.get('Model (base_type 0)'), train.get('ReferenceModel (straightforward)')
    if ours and ref:
        notes.append(f'CPU training step, base_type 0: Model {ours["samples_per_s"]:.2f} vs '
                     f'reference {ref["samples_per_s"]:.2f} samples/s '
                     f'(ratio {ours["samples_per_s"] / ref["samples_per_s"]:.2f}).')
    for row in cpu:
        base = train.get(row['model'])
        if base and row is not base and row['model'].startswith('Model'):
            ratio = row['samples_per_s'] / base['samples_per_s']
            cpu = base['cpu_ms_per_step'] / row['cpu_ms_per_step']
            compiled = f', compiled in {row["warmup_seconds"]:.0f} s' if row['compile'] else ''
            notes.append(f'CPU {row["model"]}, {row["precision"]}, channels_last '
                         f'{row["channels_last"]}{compiled}: {ratio:.2f}x the fp32 step\'s '
                         f'throughput ({cpu:.2f}x by CPU time).')
    notes += [f'{row["model"]} on {row["device"]}: {row["compile_failure"]}.'
              for row in results.get('train', []) if row.get('compile_failure')]
    return notes


def write_results(run_dir, results):
    """results.json and results.md in run_dir; returns the markdown."""
    results['notes'] = comparison_notes(results)
    save_json(Path(run_dir) / 'results.json', results)
    text = markdown(results)
    atomic.write_bytes(Path(run_dir) / 'results.md', text)
    return text


# ----------------------------------------------------------------------------- main

def run_sections(cfg, results, save, run_dir):
    """Fill results section by section, saving after each (a crash keeps the rest)."""
    prepare_bench_twin(cfg)
    results['decode'] = measure_decode(cfg['data_path'], cfg['cache_dir'],
                                       clips=cfg['decode_clips'], rounds=cfg['decode_rounds'])
    save()
    runtime = Runtime({'device': 'auto', 'amp': 'auto', 'channels_last': 'auto'})
    results['loaders'] = measure_loaders(
        cfg['data_path'], cfg['cache_dir'], workers=cfg['loader_workers'],
        items=cfg['loader_items'], batch_size=cfg['loader_batch_size'], runtime=runtime,
        seed=cfg['seed'])
    save()
    model_cfg = model_config(main.header())
    results['train'] = measure_train_cpu(
        model_cfg, base_types=cfg['base_types'], reference=cfg['reference'],
        batch_size=cfg['batch_size'], warmup=cfg['warmup_steps'], steps=cfg['train_steps'],
        rounds=cfg['train_rounds'], seed=cfg['seed'],
        grid_base_types=cfg['cpu_grid_base_types'],
        compile_base_types=cfg['cpu_compile_base_types'])
    save()
    cuda = torch.cuda.is_available()
    if cuda:
        results['train'] += measure_train_cuda(
            model_cfg, base_types=cfg['base_types'], compile_base_types=cfg['compile_base_types'],
            batch_size=cfg['cuda_batch_size'], warmup=cfg['warmup_steps'],
            steps=cfg['train_steps'], seed=cfg['seed'])
    results['peaks'] = measure_peaks(['cpu'] + (['cuda'] if cuda else []))
    add_rates(results['train'], step_costs(model_cfg, cfg['base_types']), results['peaks'])
    save()
    if cfg['profile_steps']:
        results['profile'] = measure_profile(
            model_cfg, batch_size=cfg['cuda_batch_size'] if cuda else cfg['batch_size'],
            steps=cfg['profile_steps'], seed=cfg['seed'])
        save()
    if cfg['full']:
        results['full'] = measure_full(cfg, run_dir)
        save()

def run(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(argv)
    if cfg['num_threads']:
        torch.set_num_threads(cfg['num_threads'])
    run_dir = new_run_dir(cfg['out_dir'])
    results = {'argv': [sys.argv[0], *argv], 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
               'config': cfg, 'machine': machine()}
    start = time.time()

    def save():
        results['seconds'] = time.time() - start
        return write_results(run_dir, results)
    print(f'bench: writing {run_dir}')
    run_sections(cfg, results, save, run_dir)
    print(save(), end='')
    print(f'bench: {results["seconds"]:.0f} s; results in {run_dir}')
    return results


if __name__ == '__main__':
    run_script(run)
