"""Process pools: workers compute on one thread each, pools are sized to the cores."""
import os

import torch
from threadpoolctl import threadpool_info

from cmvq import cache
from cmvq.pools import available_cores, process_pool


def threads(_):
    """A worker's thread counts: torch, then {OpenMP or BLAS: its largest pool}."""
    pools = {}
    for pool in threadpool_info():
        pools[pool['user_api']] = max(pools.get(pool['user_api'], 0), pool['num_threads'])
    return torch.get_num_threads(), tuple(sorted(pools.items()))


def test_pool_workers_compute_on_one_thread():
    parent = threads(0)
    assert parent[0] > 1 or available_cores() == 1  # the parent is not pinned
    with process_pool(2) as pool:
        assert set(pool.map(threads, range(4))) == {(1, (('blas', 1), ('openmp', 1)))}
    # blas=False (the cache's decoders): BLAS as in the parent, so log-mels are the same
    with process_pool(2, blas=False) as pool:
        blas = dict(parent[1])['blas']
        assert set(pool.map(threads, range(4))) == {(1, (('blas', blas), ('openmp', 1)))}
    assert threads(0) == parent  # and the parent is still not pinned


def test_pools_default_to_the_cores_available():
    assert cache.DEFAULT_WORKERS == available_cores() == len(os.sched_getaffinity(0))
