"""Data-parallel training over processes started by torchrun (one per GPU, or CPU processes).

    torchrun --nproc_per_node=N main.py [config] [--key=value ...]

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (python3 main.py) every
function here is the single-process no-op, so main.py runs as before. In a run of N
processes each rank trains on batch_size / N items of every global batch and
DistributedDataParallel averages the gradients; what else must agree across ranks
is kept in step here: BatchNorm statistics (SyncBatchNorm), evaluation over the
whole split (ShardSampler + gather), and one writer (rank 0). The EMA codebook
statistics are summed across ranks by model.VectorQuantizerEMA itself.
"""
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel


# torch 2.14 deprecates both; the suggested replacements are private or absent from
# older torch (the GPU image has 2.11), and these still do the job.
for _message in ('.*broadcast_buffers. is deprecated',
                 'torch.distributed.nn.functional.all_reduce is deprecated'):
    warnings.filterwarnings('ignore', message=_message, category=FutureWarning)


class Context(NamedTuple):
    rank: int         # this process, 0 .. world_size - 1
    world_size: int   # processes in the run
    local_rank: int   # this process on its node: the GPU it uses

    @property
    def is_main(self):
        return self.rank == 0


def context():
    """This process's place in the run, from torchrun's environment (rank 0 of 1 without)."""
    env = os.environ
    return Context(int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)),
                   int(env.get('LOCAL_RANK', 0)))


def is_main():
    return context().is_main


def active():
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); no-op for one process.

    The rendezvous (MASTER_ADDR/PORT, set by torchrun on every node) is read from the
    environment, so multi-node runs need nothing here."""
    ctx = context()
    if ctx.world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        _PEERS[:] = all_gather((socket.gethostname(), os.getpid()))
    return ctx


_PEERS = []  # (host, pid) of each rank, gathered when the process group starts


def ended_note(wait=2.0):
    """'rank R of N (pid P) ended first' when another process of this run on this node
    has ended (exited, or killed and not yet reaped), else ''. A rank that ends breaks
    the others' collectives, so a failure here may be its consequence; its end is
    polled for up to `wait` s (the broken connection can arrive first). Ranks on other
    nodes cannot be seen from here."""
    host, me = socket.gethostname(), context().rank
    deadline = time.monotonic() + wait
    while _PEERS:
        ended = [(r, pid) for r, (h, pid) in enumerate(_PEERS)
                 if r != me and h == host and not _running(pid)]
        if ended:
            return '; '.join(f'rank {r} of {len(_PEERS)} (pid {pid}) ended first'
                             for r, pid in ended)
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return ''


def _running(pid):
    """True while process pid runs (a zombie, killed but not reaped, has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] not in 'ZX'
    except (OSError, IndexError):
        return True


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. building a cache), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj):
    """Rank 0's picklable obj, on every rank (obj itself without a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def interleave(shards):
    """Per-rank arrays back in item order: rank r of N held items r, r + N, ... (the
    layout of ShardSampler, and of each epoch's permutation under train_sampler)."""
    if len(shards) == 1:
        return shards[0]
    out = np.empty(sum(len(s) for s in shards), dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        out[rank::len(shards)] = shard
    return out


def mean_over_ranks(tensor):
    """Element-wise mean of a same-shaped tensor across ranks (the tensor without a group)."""
    if not active():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


# ----------------------------------------------------------------------------- samplers

def train_sampler(dataset, *, shuffle, seed):
    """This rank's share of a seeded per-epoch shuffle (call set_epoch every epoch).

    The permutation depends on (seed, epoch) only; rank r takes positions r, r + N,
    ..., so with a local batch of B / N the N ranks' t-th batches together hold the
    one-process run's t-th batch of B. The tail that does not divide by N is dropped
    (the loader drops the last partial batch anyway)."""
    ctx = context()
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
        drop_last=True)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes items r, r + N, r + 2N, ... of the split, in order.

    Unlike DistributedSampler it pads nothing, so gathering the shards counts every
    item exactly once; shards may differ by one item."""

    def __init__(self, dataset):
        ctx = context()
        self.indices = range(ctx.rank, len(dataset), ctx.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------- models

class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    nn.SyncBatchNorm accepts GPU tensors only; this does the same on CPU (gloo) with
    two differentiable all-reduces per layer: (sum, count), then the sum of squared
    deviations from the global mean. Gradients flow through the all-reduces, so with
    DDP's gradient averaging a step equals the one-process step on the whole batch.
    Outside training, or without a process group, it is plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x):
        if not (self.training and active()):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()                                       # (B, C, ...)
        count = torch.tensor([x.numel() / channels], device=x.device)
        first = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]))   # (C + 1,)
        total = first[-1].detach()                           # items x positions, all ranks
        shape = [1, channels] + [1] * (x.dim() - 2)
        mean = first[:channels] / total                      # (C,)
        centred = xf - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dims)) / total     # biased, (C,)
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * total / max(total - 1, 1))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean, unbiased_var):
        """Running statistics as nn.BatchNorm updates them (unbiased variance)."""
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)

    @classmethod
    def convert(cls, module):
        """module with every BatchNorm replaced by a GlooSyncBatchNorm sharing its
        parameters and buffers (state_dict keys unchanged)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats)
            new.weight, new.bias = module.weight, module.bias
            for name in ('running_mean', 'running_var', 'num_batches_tracked'):
                setattr(new, name, getattr(module, name))
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def sync_batchnorm(model, device):
    """BatchNorm layers synchronised across ranks: nn.SyncBatchNorm on CUDA, else gloo's."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlooSyncBatchNorm.convert(model)


def wrap(model, device, *, sync_bn):
    """model for training in a process group: SyncBatchNorm (sync_bn) + DDP; else model.

    With sync_bn every buffer is already equal on every rank (BatchNorm statistics
    are global, the EMA codebook is summed over ranks), so DDP does not broadcast
    rank 0's buffers each step; without it, it does (ranks keep rank 0's BatchNorm
    statistics, which the checkpoint holds anyway)."""
    if not active():
        return model
    if sync_bn:
        model = sync_batchnorm(model, device)
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                   broadcast_buffers=not sync_bn)


def unwrap(model):
    """The project's model inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, '_orig_mod', None)  # torch.compile's OptimizedModule
        if isinstance(model, DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner
