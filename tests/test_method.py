"""The method's pieces against their formulas: the mask's straight-through gradient, the
plain VQ's gradients, one EMA codebook update, the threshold setting, the single-modality
modes, the probe and the decoders.

Float32 on CPU. Comparisons are exact where the code must give the same numbers; each
other tolerance is stated where it is used (rtol 1e-6 for a float32 value against its
formula, 1e-5 for sums of a few hundred terms taken in another order).
"""
import pytest
import torch
import torch.nn.functional as F

import main
import model as M
from cmvq.config import build_model, model_config, resolve

WIDTHS = ['--num_hiddens=16', '--num_residual_hiddens=8', '--num_residual_layers=1',
          '--embedding_dim=8', '--num_embeddings=16']
D, K, BETA = 8, 16, 0.25
# float32 sums of a few hundred terms in another order than the formula's
SUM_ORDER = {'rtol': 1e-5, 'atol': 1e-8}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def config(*overrides):
    """main.py's header at small widths with overrides, checked as a run checks them."""
    return resolve(main.header(), [*WIDTHS, *overrides])


def small_model(*overrides):
    """The model a run of config(*overrides) builds."""
    return build_model(config(*overrides))


def batch(b=2):
    """image (b, 3, 128, 128) in [0, 1], audio (b, 1, 256, 256)."""
    return torch.rand(b, 3, 128, 128), torch.randn(b, 1, 256, 256)


# ---------------------------------------------------------------- the mask


@pytest.mark.parametrize('threshold_fn', ['binarizer', 'ternarizer', 'randomizer'])
def test_the_mask_gradient_is_the_upstream_gradient(threshold_fn, monkeypatch):
    """d loss / d raw mask == d loss / d thresholded mask, exactly (straight through)."""
    solver = small_model(f'--threshold_fn={threshold_fn}', '--mask_init=uniform',
                         '--mask_scale=0.02').solver
    seen = []

    def thresholded_mask(original=solver.thresholded_mask):
        hard = original()          # (2D, 1, 1), as the forward uses it
        hard.retain_grad()
        seen.append(hard)
        return hard
    monkeypatch.setattr(solver, 'thresholded_mask', thresholded_mask)
    logits = solver(torch.randn(2, D, 32, 32), torch.randn(2, D, 32, 32))
    (logits * torch.randn_like(logits)).sum().backward()
    (hard,) = seen
    assert hard.grad.abs().sum() > 0
    assert torch.equal(solver.mask.grad, hard.grad)


@pytest.mark.parametrize('threshold_fn', ['binarizer', 'ternarizer'])
def test_a_non_default_threshold_changes_which_channels_pass(threshold_fn):
    """--threshold reaches the model: channels with raw values between the default
    (5e-3) and 0.05 pass by default and are dropped at 0.05."""
    raw = torch.tensor([0.001, 0.004, 0.006, 0.02, 0.06, 0.2, -0.1, 0.0,
                        0.03, 0.07, 0.01, -0.02, 0.004, 0.5, 0.049, 0.051])
    codes = torch.ones(1, D, 1, 1)
    passed = {}
    for setting, threshold in (('None', M.DEFAULT_THRESHOLD), ('0.05', 0.05)):
        net = small_model(f'--threshold_fn={threshold_fn}', f'--threshold={setting}')
        net.set_mask(raw)
        gates = net.solver.masked_codes(codes, codes).reshape(-1)  # (2D,) the mask's values
        expected = (raw > threshold).float() - (threshold_fn == 'ternarizer') * (raw < 0).float()
        assert torch.equal(gates, expected), threshold
        passed[threshold] = (gates != 0).tolist()
        assert net.mask_ratios()['shared1'] == 100 * sum(passed[threshold][:D]) / (2 * D)
    changed = [i for i in range(2 * D) if passed[M.DEFAULT_THRESHOLD][i] != passed[0.05][i]]
    assert changed == [2, 3, 8, 10, 14]


# ---------------------------------------------------------------- the quantizers


def test_plain_vq_gradients_follow_the_loss():
    """Loss ||sg[z]-e||^2 + beta ||z-sg[e]||^2 (means over the N*D entries): the input
    gets 2 beta (z - e) / ND, code k the sum over its vectors of 2 (e_k - z_i) / ND."""
    vq = M.make_quantizer(num_embeddings=K, embedding_dim=D, commitment_cost=BETA, decay=0.0)
    z = torch.randn(3, D, 4, 5, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    flat = z.detach().movedim(1, -1).reshape(-1, D)           # (N, D)
    indices = out.indices.reshape(-1)                         # (N,)
    codes = vq.codebook.detach()[indices]                     # (N, D)
    assert indices.unique().numel() > 1
    expected_z = 2 * BETA * (flat - codes) / flat.numel()
    torch.testing.assert_close(z.grad, expected_z.reshape(3, 4, 5, D).movedim(-1, 1),
                               rtol=1e-6, atol=0)
    expected_codebook = torch.zeros(K, D).index_add_(0, indices, 2 * (codes - flat) / flat.numel())
    torch.testing.assert_close(vq.embedding.weight.grad, expected_codebook, **SUM_ORDER)


def test_one_ema_update_follows_its_formulas():
    """Hand-set state, six vectors assigned to codes 0, 0, 1, 1, 1, 2 (code 3 unused):
    sizes = decay sizes + (1 - decay) counts, Laplace-smoothed to
    (sizes + eps) / (n + K eps) n; sums = decay sums + (1 - decay) vector sums;
    codebook = sums / sizes. The forward quantizes with the codes before the update."""
    decay, eps, k, d = 0.9, M.EMA_EPS, 4, 2
    vq = M.make_quantizer(num_embeddings=k, embedding_dim=d, commitment_cost=BETA, decay=decay)
    codes = torch.tensor([[0., 0.], [4., 0.], [0., 4.], [4., 4.]])
    sums = torch.tensor([[1., 2.], [3., 4.], [5., 6.], [7., 8.]])
    sizes = torch.tensor([1., 2., 3., 0.])
    with torch.no_grad():
        vq.embedding.copy_(codes)
        vq.ema_w.copy_(sums)
        vq.ema_cluster_size.copy_(sizes)
    assigned = torch.tensor([0, 0, 1, 1, 1, 2])
    z = codes[assigned] + 0.5 * torch.rand(6, d) - 0.25       # (B, D) = (6, 2)
    out = vq(z)
    assert out.indices.tolist() == assigned.tolist()
    assert torch.equal(out.quantized, codes[assigned])
    torch.testing.assert_close(out.loss, BETA * F.mse_loss(z, codes[assigned]), rtol=1e-6,
                               atol=0)

    counts = torch.bincount(assigned, minlength=k).double()   # (K,)
    vector_sums = torch.zeros(k, d).double().index_add_(0, assigned, z.double())
    new_sizes = decay * sizes.double() + (1 - decay) * counts
    n = new_sizes.sum()
    new_sizes = (new_sizes + eps) / (n + k * eps) * n
    new_sums = decay * sums.double() + (1 - decay) * vector_sums
    # the float32 state against the formulas in float64
    torch.testing.assert_close(vq.ema_cluster_size.double(), new_sizes, rtol=1e-6, atol=0)
    torch.testing.assert_close(vq.ema_w.double(), new_sums, rtol=1e-6, atol=0)
    torch.testing.assert_close(vq.codebook.double(), new_sums / new_sizes.unsqueeze(1),
                               rtol=1e-6, atol=0)
    assert not vq.embedding.requires_grad and not list(vq.parameters())


# ---------------------------------------------------------------- modes, probe, decoders


@pytest.mark.parametrize('mode, unused', [('image-only', 'audio'), ('audio-only', 'image')])
@pytest.mark.parametrize('base_type', M.BASE_TYPES)
def test_single_modality_logits_ignore_the_other_input(base_type, mode, unused):
    net = small_model(f'--base_type={base_type}', f'--mode={mode}').eval()
    image, audio = batch()
    other = {'image': (torch.rand_like(image), audio), 'audio': (image, torch.randn_like(audio))}
    with torch.no_grad():
        logits = net(image, audio).logits
        assert torch.equal(net(*other[unused]).logits, logits)
        assert not torch.equal(net(*other[mode.split('-')[0]]).logits, logits)


def trained_state():
    """A Model's state after one training forward (BatchNorm statistics, EMA codes)."""
    net = small_model()
    net(*batch())
    return net.eval()


def test_a_probe_keeping_all_channels_reproduces_the_model():
    net = trained_state()
    net.set_mask(torch.tensor([0.0, 0.01] * D))   # private and shared channels alternate
    ratios = net.mask_ratios()
    assert ratios['private1'] == ratios['shared2'] == 25.0
    probe = M.build_probe(model_config(config()), keep='all')
    probe.load_state_dict(net.state_dict())
    image, audio = batch(3)
    with torch.no_grad():
        ours, theirs = probe.eval()(image, audio), net(image, audio)
    for field in ('logits', 'recon_image', 'recon_audio', 'quantized_image', 'quantized_audio'):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


def test_decoding_the_codes_gives_the_reconstructions():
    net = trained_state()
    image, audio = batch()
    with torch.no_grad():
        out = net(image, audio)
        recon_image, recon_audio = net.backbone.decode(out.quantized_image, out.quantized_audio)
    assert torch.equal(recon_image, out.recon_image)
    assert torch.equal(recon_audio, out.recon_audio)
