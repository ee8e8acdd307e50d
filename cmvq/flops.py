"""What a step costs in floating-point operations, and what the device can do.

step_flops counts a model's matrix FLOPs (convolutions, matrix products: what
torch.utils.flop_counter counts) per sample, for a training step (forward, loss,
backward) and for an evaluation forward; the count is linear in the batch, so a batch
of two gives it. matmul_peak measures the rate of large square matrix products, the
peak that tools/bench.py holds a step's rate against.
"""
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cmvq.loss import compute_loss
from cmvq.runtime import synchronize

PEAK_SIZES = {'cuda': 8192, 'cpu': 2048}  # matrix side of matmul_peak per device type


def step_flops(model, batch):
    """(training step, evaluation forward) FLOPs per sample of model on batch (image,
    audio, emotion, ...), counted on a copy in fp32 on the CPU (model is untouched)."""
    net = copy.deepcopy(model).cpu().float()
    image, audio, emotion = (t.cpu() for t in batch[:3])
    net.train()
    with FlopCounterMode(display=False) as train:
        out = net(image, audio)
        loss, _ = compute_loss(out, image, audio, emotion, (1.0, 1.0), net, regularization=True,
                               recon_loss='mse')
        loss.backward()
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        net(image, audio)
    return train.get_total_flops() / len(image), evaluation.get_total_flops() / len(image)


def matmul_peak(device, dtype, repeats=10):
    """TFLOP/s of (n, n) @ (n, n) products of dtype on device (n: PEAK_SIZES)."""
    device = torch.device(device)
    n = PEAK_SIZES[device.type]
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # first call: library set-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12
