"""torch.compile: a compiled training run gives the eager run's losses.

The whole step is compiled with the 'aot_eager' backend: dynamo and AOT autograd (the
layers where compiling once broke, on channels_last bf16 codes) in seconds, without
inductor's code generation, which takes minutes on a small CPU. Inductor itself
compiles the vector quantizer, where it broke. Tolerances: aot_eager runs the same
kernels as eager, so rtol 1e-6 (equal in practice); inductor fuses and reorders
float sums, so rtol 1e-4 on the quantizer's loss and perplexity, and equal code
indices.
"""
import pytest
import torch
from torch import nn

import model as models
from cmvq import runtime as rt
from cmvq.train import run_epoch
from conftest import TINY_MODEL
from tools.bench import STEP_CONFIG, VARIANCES, random_batch

TINY = {**TINY_MODEL, 'base_type': 0}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def three_steps(compile):
    """(history, state) after three Adam steps of the tiny model, bf16 + channels_last."""
    torch.manual_seed(0)
    runtime = rt.Runtime({'device': 'cpu', 'amp': 'bf16', 'channels_last': True,
                          'compile': compile})
    net = runtime.prepare(models.build_model(TINY))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = [random_batch(4, seed) for seed in range(3)]
    result = run_epoch(runtime.compiled(net), batches, runtime, VARIANCES, STEP_CONFIG,
                       optimizer)
    assert runtime.compile is compile and runtime.compile_failure is None
    return result.history, net.state_dict()


def test_a_compiled_run_gives_the_eager_losses(monkeypatch):
    monkeypatch.setitem(rt.COMPILE_OPTIONS, 'backend', 'aot_eager')
    (eager, eager_state), (compiled, compiled_state) = three_steps(False), three_steps(True)
    assert set(compiled) == set(eager) and len(compiled['loss']) == 3
    for key, values in eager.items():
        assert compiled[key] == pytest.approx(values, rel=1e-6), key
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-6, atol=1e-7, msg=key)


class PreVQ(nn.Module):
    """A 1x1 conv under bf16 autocast (channels_last) feeding a training-mode EMA quantizer,
    as in Model: the pattern that compiling once broke on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1).to(memory_format=torch.channels_last)
        self.quantizer = models.make_quantizer(num_embeddings=16, embedding_dim=8,
                                               commitment_cost=0.25, decay=0.99)

    def forward(self, x):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            z = self.conv(x)  # (B, 8, 32, 32) bf16, channels_last
        return self.quantizer(z)


def test_inductor_compiles_the_quantizer_on_channels_last_bf16_codes():
    torch.manual_seed(0)
    eager, compiled = PreVQ(), PreVQ()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(4, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    theirs, ours = eager(x), torch.compile(compiled)(x)
    assert torch.equal(ours.indices, theirs.indices)
    for key in ('loss', 'perplexity', 'quantized'):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-4,
                                   atol=1e-5, msg=key)
    for key, value in eager.state_dict().items():  # the EMA codebook update
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
