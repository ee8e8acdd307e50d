"""Process pools sized to the cores available, each worker computing on one thread.

A worker left at its libraries' defaults (torch, OpenMP and BLAS: one thread per core)
runs cores threads, so a pool of N workers runs N x cores threads on cores cores and
spends its time switching between them: on 16 cores, 12 such workers did not render
the 7,442-clip twin in 407 s, while 14 workers with OMP_NUM_THREADS=1 rendered 38
clips/s. Every pool of the project (twin rendering, probe features, split checks,
the decode-once cache) is made here.

BLAS is left at its default in the pools that compute log-mels (the cache, the split
checks, the probe features): its thread count changes the last bits of the mel
projection (a matrix product), and a log-mel must not depend on where it was computed.
"""
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from threadpoolctl import threadpool_limits

# Thread-count variables of OpenMP and the BLAS libraries, read when a library loads
# (OpenBLAS also reads OMP_NUM_THREADS).
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS',
                    'VECLIB_MAXIMUM_THREADS', 'NUMEXPR_NUM_THREADS')


def available_cores():
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def pin_threads(blas=True):
    """One compute thread in this process: torch's intra-op pool if torch is loaded
    (importing it just for this would cost a second), the OpenMP libraries, and with
    blas the BLAS libraries; those loaded now (threadpoolctl) and, with blas, those
    loaded later (the environment)."""
    if blas:
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, '1'))
    threadpool_limits(1, user_api=None if blas else 'openmp')
    if 'torch' in sys.modules:
        sys.modules['torch'].set_num_threads(1)


def _start_worker(blas, initializer, initargs):
    pin_threads(blas)
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers, initializer=None, initargs=(), blas=True):
    """A ProcessPoolExecutor of `workers` processes, each pinned to one thread
    (pin_threads; blas=False leaves BLAS as it is) before initializer(*initargs)."""
    return ProcessPoolExecutor(workers, initializer=_start_worker,
                               initargs=(blas, initializer, initargs))
