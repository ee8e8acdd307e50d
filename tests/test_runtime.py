"""Runtime: compile off, the per-device amp / channels_last rule, torchrun settings, and
no host sync per training step."""
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import model as models
from cmvq.config import check_distributed
from cmvq.runtime import Runtime
from cmvq.train import FINITE_CHECK_STEPS, run_epoch
from conftest import TINY_MODEL
from tools.bench import STEP_CONFIG, VARIANCES, random_batch

TINY = {**TINY_MODEL, 'base_type': 0}


def runtime(**cfg):
    return Runtime({'device': 'cpu', 'amp': 'auto', 'channels_last': 'auto', **cfg})


def test_compile_off_never_compiles(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda *a, **k: 1 / 0)
    rt, net = runtime(), nn.Linear(2, 2)
    assert not rt.compile and rt.compiled(net) is net
    assert rt.describe().endswith('torch.compile off') and '\n' not in rt.describe()


def test_torchrun_settings_are_checked_before_any_work():
    import pytest

    from cmvq import distributed as dist
    three = dist.Context(rank=0, world_size=3, local_rank=0)
    check_distributed({'batch_size': 30, 'device': 'auto'}, three)
    with pytest.raises(ValueError, match='batch_size=32 is the global batch and must divide'):
        check_distributed({'batch_size': 32, 'device': 'auto'}, three)
    with pytest.raises(ValueError, match="device='cuda:1': under torchrun"):
        check_distributed({'batch_size': 30, 'device': 'cuda:1'}, three)
    check_distributed({'batch_size': 32, 'device': 'cuda:1'}, dist.context())  # 1 process


def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch):
    for native in (True, False):
        for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
            monkeypatch.setattr(torch.cpu, name, lambda native=native: native)
        rt = runtime()
        assert rt.amp is native and rt.channels_last
        assert not runtime(amp='off', channels_last=False).amp
    assert runtime(amp='bf16').amp


class ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python number conversions (.item(), bool(), float(), int()):
    on CUDA each one waits for the device (a host sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def scalar_reads_of_an_epoch(steps):
    """Scalar reads of run_epoch training the tiny model for `steps` steps."""
    torch.manual_seed(0)
    rt = runtime()
    net = rt.prepare(models.build_model(TINY))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)  # Adam reads its CPU step counts
    batches = [random_batch(2, seed) for seed in range(steps)]
    with ScalarReads() as reads:
        run_epoch(net, batches, rt, VARIANCES, STEP_CONFIG, optimizer)
    return reads.count


def test_training_steps_do_not_wait_for_the_device():
    """No scalar read per step: the losses are checked once per FINITE_CHECK_STEPS
    steps and at the end of the epoch, on the device."""
    assert FINITE_CHECK_STEPS > 3
    assert scalar_reads_of_an_epoch(3) == scalar_reads_of_an_epoch(1) > 0
