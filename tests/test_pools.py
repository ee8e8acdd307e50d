"""Process pools: workers compute on one thread each, pools are sized to the cores."""
import os

import torch
from threadpoolctl import threadpool_info

from cmvq import cache
from cmvq.pools import available_cores, process_pool


def threads(_):
    """A worker's thread counts: torch, the largest OpenMP/BLAS pool loaded, OMP_NUM_THREADS."""
    return (torch.get_num_threads(), max(pool['num_threads'] for pool in threadpool_info()),
            os.environ['OMP_NUM_THREADS'])


def test_pool_workers_compute_on_one_thread():
    assert torch.get_num_threads() > 1 or available_cores() == 1  # the parent is not pinned
    with process_pool(2) as pool:
        assert set(pool.map(threads, range(4))) == {(1, 1, '1')}
    assert torch.get_num_threads() > 1 or available_cores() == 1  # and still is not


def test_pools_default_to_the_cores_available():
    assert cache.DEFAULT_WORKERS == available_cores() == len(os.sched_getaffinity(0))
