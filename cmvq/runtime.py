"""Where and how a run computes: the seed, the device, bf16 autocast, channels_last and
torch.compile, resolved once from the config (Runtime)."""
import random
from contextlib import nullcontext

import numpy as np
import torch

from cmvq import distributed
from cmvq.errors import BadValueError


def seed_everything(seed):
    """One seed drives initialisation, shuffles and frame draws."""
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
        raise BadValueError(f"device={cfg['device']!r} but CUDA is not available; use 'auto' "
                            "or 'cpu'")
    ctx = distributed.context()
    if device.type == 'cuda' and ctx.world_size > 1:
        device = torch.device('cuda', ctx.local_rank)
    return device


class Runtime:
    """Device, autocast and memory-format settings resolved once from the config."""

    def __init__(self, cfg):
        self.device = resolve_device(cfg)
        used = precision(cfg, self.device)
        self.amp, self.channels_last = used['bf16_autocast'], used['channels_last']
        self.pin_memory = self.device.type == 'cuda'
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
        ctx = distributed.context()
        text = (f'device {self.device}, bf16 autocast {"on" if self.amp else "off"}, '
                f'channels_last {"on" if self.channels_last else "off"}, '
                f'torch.compile {"on" if self.compile else "off"}')
        if self.compile_problem:
            text += (f'\ncompile=True: torch.compile does not work here '
                     f'({self.compile_problem}); training without it')
        if ctx.world_size > 1:
            text += f'; process {ctx.rank} of {ctx.world_size} (torchrun)'
        return text


def precision(cfg, device):
    """What a run of cfg computes in on device: {'bf16_autocast': bool, 'channels_last':
    bool} (recorded in the run's environment.json; tools/sweep.py compares it)."""
    return {'bf16_autocast': cfg['amp'] == 'bf16' or (cfg['amp'] == 'auto' and auto_amp(device)),
            'channels_last': cfg['channels_last'] is True or cfg['channels_last'] == 'auto'}


def auto_amp(device):
    """amp='auto': bf16 autocast where tools/bench.py measured it faster than fp32: on CUDA,
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
