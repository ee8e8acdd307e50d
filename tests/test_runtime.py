"""Runtime: the compile fallback and the per-device amp / channels_last rule."""
import torch
from torch import nn

from cmvq.config import check_distributed

from cmvq.runtime import Runtime


def runtime(**cfg):
    return Runtime({'device': 'cpu', 'amp': 'auto', 'channels_last': 'auto', **cfg})


def test_compile_falls_back_with_one_line_where_the_platform_cannot_compile(monkeypatch):
    def broken(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError('Compiler: cc is not found.\nSee the docs')
        return call
    monkeypatch.setattr(torch, 'compile', broken)
    rt = runtime(compile=True)
    net = nn.Linear(2, 2)
    assert not rt.compile and rt.compiled(net) is net
    lines = rt.describe().splitlines()
    assert lines[1] == ('compile=True: torch.compile does not work here (RuntimeError: '
                        'Compiler: cc is not found.); training without it')


def test_compile_off_never_probes(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda *a, **k: 1 / 0)
    rt = runtime()
    assert not rt.compile and 'torch.compile off' in rt.describe()
    assert len(rt.describe().splitlines()) == 1


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
