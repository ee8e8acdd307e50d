"""Tests for model.py: shapes, masks, quantizers, state handling, builders, parity.

Small widths keep the file fast on CPU; only the parity test builds paper size. The
method's gradients and updates against their formulas: test_method.py.
"""
import json

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights

import model as M  # conftest.py puts the repository root on sys.path
import model_feat as MF
from cmvq.released import released_names
from conftest import PAPER

SMALL = {'num_hiddens': 16, 'num_residual_hiddens': 8, 'num_residual_layers': 1,
         'embedding_dim': 8, 'num_embeddings': 16}
D, K, B, C = SMALL['embedding_dim'], SMALL['num_embeddings'], 2, 6
SMALL_CFG = {**PAPER, **SMALL}
MASK = {k: SMALL_CFG[k] for k in M.MASK_KEYS if k != 'mode'}  # the mask options, masked


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batch(b=B):
    """image (b, 3, 128, 128) in [0, 1], audio (b, 1, 256, 256)."""
    return torch.rand(b, 3, 128, 128), torch.randn(b, 1, 256, 256)


def small_model(base_type=0, **kwargs):
    return M.build_model({**SMALL_CFG, 'base_type': base_type, **kwargs})


def train_loss(out, image, audio):
    """The runner's loss: reconstructions + CE + VQ (+ mask regulariser)."""
    y = torch.arange(image.shape[0]) % C
    loss = F.cross_entropy(out.logits, y)
    if out.recon_image is not None:
        loss = loss + F.mse_loss(out.recon_image, image) + F.mse_loss(out.recon_audio, audio)
    if out.vq_loss is not None:
        loss = loss + out.vq_loss
    return loss


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize('mode', M.MODES)
@pytest.mark.parametrize('base_type', M.BASE_TYPES)
def test_output_shapes(base_type, mode):
    model = small_model(base_type, mode=mode)
    image, audio = batch()
    out = model(image, audio)
    assert isinstance(out, M.ModelOutput)
    assert out.logits.shape == (B, C)
    if base_type in (0, 2):
        assert out.recon_image.shape == image.shape
        assert out.recon_audio.shape == audio.shape
        assert out.quantized_image.shape == out.quantized_audio.shape == (B, D, 32, 32)
        assert out.indices_image.shape == (B, 32, 32)
        assert out.vq_loss.ndim == 0
        assert torch.allclose(out.vq_loss, out.vq_loss_image + out.vq_loss_audio)
    else:
        assert out.recon_image is None and out.vq_loss is None
        assert out.perplexity_image is None
    has_mask = base_type in (0, 3)
    assert (model.mask_ratios() is not None) == has_mask
    assert (model.mask_regularization() is not None) == has_mask


def test_baselines_do_not_build_removed_modules():
    for base_type in (1, 3):
        backbone = small_model(base_type).backbone
        assert backbone.quantizers is None and backbone.decoders is None
    assert small_model(1).solver.mask is None
    assert small_model(2).solver.mask is None
    assert small_model(3).solver.mask is not None
    assert set(small_model(1, mode='audio-only').backbone.encoders) == {'audio'}
    assert set(small_model(4, mode='image-only').nets) == {'image'}


def test_two_stage_shapes():
    vqvae = M.build_vqvae(SMALL_CFG)
    solver = M.build_solver(SMALL_CFG)
    image, audio = batch()
    with torch.no_grad():
        codes = vqvae.eval()(image, audio)
    assert codes.logits is None and codes.recon_audio.shape == audio.shape
    out = solver(codes.quantized_image, codes.quantized_audio)
    assert out.logits.shape == (B, C)
    assert solver.mask_ratios() is not None


@pytest.mark.parametrize('mode', M.MODES)
def test_feature_model_shapes(mode):
    model = MF.ModelFeat(image_features=10, audio_features=12, embedding_dim=D, mode=mode,
                         num_embeddings=K, commitment_cost=0.25, decay=0.99, hidden_size=16,
                         num_classes=C, masked=True, **MASK)
    out = model(torch.randn(B, 16, 10), torch.randn(B, 64, 12))
    assert out.logits.shape == (B, C)
    assert out.recon_image.shape == (B, 16, 10) and out.recon_audio.shape == (B, 64, 12)
    assert out.quantized_image.shape == (B, D, 16) and out.quantized_audio.shape == (B, D, 64)
    cfg = {**SMALL_CFG, 'dataset': 'RML_feat', 'image_features': 10, 'audio_features': 12}
    assert isinstance(MF.build_model_feat(cfg), MF.ModelFeat)


def test_subsample_features_keeps_ends_and_spreads_evenly():
    x = torch.arange(64.0).reshape(1, 64, 1).expand(2, 64, 3)
    y = MF.subsample_features(x)
    assert y.shape == (2, 16, 3)
    # step 63/15 = 4.2: round(4.2 i), the released rule (Python's round)
    assert y[0, :, 0].tolist() == [round(4.2 * i) for i in range(16)]
    assert y[0, 0, 0] == 0 and y[0, -1, 0] == 63
    assert torch.equal(MF.subsample_features(x[:, :16]), x[:, :16])  # 16 frames stay
    assert MF.frame_indices(5, 1) == [2]


def test_feature_solver_follows_the_released_structure():
    """Per-frame fc + BatchNorm (image 1024, 512; audio 512), concat, LSTM 256, BatchNorm."""
    solver = MF.TaskSolverFeat(embedding_dim=D, num_classes=C, mode='multimodal', masked=True,
                               **MASK)
    image, audio = solver.projections['image'], solver.projections['audio']
    assert [m.out_features for m in image if isinstance(m, torch.nn.Linear)] == [1024, 512]
    assert [m.out_features for m in audio if isinstance(m, torch.nn.Linear)] == [512]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in image) == 2
    assert solver.lstm.input_size == 1024 and solver.lstm.hidden_size == 256
    assert isinstance(solver.classifier[0], torch.nn.BatchNorm1d)
    assert MF.TaskSolverFeat(embedding_dim=D, num_classes=C, mode='audio-only', masked=True,
                             **MASK).lstm.input_size == 512
    # the mask gates code channels: a zero image half leaves only audio in the logits
    solver.eval()
    solver.set_mask(torch.cat([torch.zeros(D), torch.ones(D)]))
    q_audio = torch.randn(B, D, 64)
    a = solver(torch.randn(B, D, 16), q_audio)
    b = solver(torch.randn(B, D, 16), q_audio)
    assert torch.allclose(a, b)


def test_codebooks():
    image_cb, audio_cb = small_model(0).codebooks()
    assert image_cb.shape == audio_cb.shape == (K, D)
    assert small_model(1).codebooks() == (None, None)
    assert small_model(4).codebooks() == (None, None)


# ---------------------------------------------------------------- masks


RAW = torch.tensor([-0.5, -1e-3, 0.0, 1e-3, 5e-3, 6e-3, 0.2, 3.0])


@pytest.mark.parametrize(('name', 'expected'), [
    ('binarizer', [0, 0, 0, 0, 0, 1, 1, 1]),
    ('ternarizer', [-1, -1, 0, 0, 0, 1, 1, 1]),
    ('attention', RAW.tolist()),
])
def test_threshold_values(name, expected):
    mask = M.THRESHOLD_FUNCTIONS[name](RAW, M.DEFAULT_THRESHOLD)
    assert mask.tolist() == pytest.approx(expected)


def test_randomizer_is_binary_and_fresh():
    raw = torch.zeros(256)
    first, second = M.randomizer(raw), M.randomizer(raw)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)


@pytest.mark.parametrize('threshold_fn', ['binarizer', 'ternarizer'])
def test_model_mask_values(threshold_fn):
    model = small_model(0, threshold_fn=threshold_fn, mask_init='uniform', mask_scale=1.0)
    allowed = {0.0, 1.0} if threshold_fn == 'binarizer' else {-1.0, 0.0, 1.0}
    assert set(model.solver.thresholded_mask().unique().tolist()) <= allowed


def test_ratio_arithmetic_on_hand_set_mask():
    model = small_model(0)  # D = 8: image half, then audio half
    image_half = [1, 1, 1, 1, 1, 1, 0, 0]  # 6 shared, 2 private
    audio_half = [1, 1, 1, 0, 0, 0, 0, 0]  # 3 shared, 5 private
    model.set_mask(torch.tensor(image_half + audio_half, dtype=torch.float))
    ratios = model.mask_ratios()
    assert ratios == pytest.approx({'shared1': 37.5, 'private1': 12.5, 'shared2': 18.75,
                                    'private2': 31.25, 'complementarity': 50.0})
    assert model.mask_regularization().item() == pytest.approx(9.0)
    assert torch.equal(model.get_mask(), torch.tensor(image_half + audio_half,
                                                      dtype=torch.float))
    model.set_mask(torch.zeros(2 * D))
    assert model.mask_ratios()['complementarity'] == 0.0


def test_set_and_reset_mask_keep_the_parameter():
    model = small_model(0, mask_init='1s', mask_scale=0.01)
    param = model.solver.mask
    model.set_mask(torch.zeros(2 * D))
    model.reset_mask()
    assert model.solver.mask is param
    assert torch.allclose(model.get_mask(), torch.full((2 * D,), 0.01))
    with pytest.raises(ValueError, match='no mask'):
        small_model(1).set_mask(torch.zeros(2 * D))


def test_mix_takes_the_previous_samples_private_codes():
    masker = M.Masker(embedding_dim=2, keep='mix')
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])  # image: ch0 shared; audio: ch1 shared
    q = torch.arange(3).float().reshape(3, 1, 1, 1).expand(3, 2, 1, 1)  # sample i -> i
    q_image, q_audio = masker(q, q, mask)
    assert q_image[:, 0].flatten().tolist() == [0, 1, 2]  # shared: own
    assert q_image[:, 1].flatten().tolist() == [2, 0, 1]  # private: sample i - 1 (roll +1)
    assert q_audio[:, 1].flatten().tolist() == [0, 1, 2]
    assert q_audio[:, 0].flatten().tolist() == [2, 0, 1]


@pytest.mark.parametrize(('keep', 'image_channels'), [
    ('shared', [1.0, 0.0]), ('private', [0.0, 1.0]), ('all', [1.0, 1.0]), ('mix', [1.0, 1.0])])
def test_masker_keeps_shared_or_private(keep, image_channels):
    masker = M.Masker(embedding_dim=2, keep=keep)
    q_image, _ = masker(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1),
                        torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert q_image.flatten().tolist() == image_channels


def test_probe_arguments_cannot_be_combined_wrongly():
    with pytest.raises(TypeError):
        M.build_probe(SMALL_CFG, keep='shared', mix=True)  # one argument says it all
    with pytest.raises(ValueError, match="keep='mixed' is not one of"):
        M.build_probe(SMALL_CFG, keep='mixed')


def test_probe_loads_model_state():
    trained = small_model(0)
    probe = M.build_probe(SMALL_CFG, keep='mix')
    probe.load_state_dict(trained.state_dict())
    out = probe.eval()(*batch())
    assert out.recon_image.shape == (B, 3, 128, 128)


def test_attention_ratios_use_the_binarizer_rule():
    # The forward gates by the raw values; ratios (and the probe) count raw > threshold.
    model = small_model(0, threshold_fn='attention')
    image_half = [0.5, 0.2, 0.004, -0.3, 0.0, 0.001, 0.01, 0.006]  # 4 above 5e-3
    audio_half = [0.1, -0.1, -0.2, 0.003, 0.002, 0.001, -0.004, 0.0]  # 1 above
    model.set_mask(torch.tensor(image_half + audio_half))
    assert model.mask_ratios() == pytest.approx({
        'private1': 25.0, 'shared1': 25.0, 'private2': 43.75, 'shared2': 6.25,
        'complementarity': 25.0})
    assert torch.equal(model.solver.thresholded_mask().reshape(-1),
                       torch.tensor(image_half + audio_half))


@pytest.mark.parametrize(('r', 'd'), [(16, 8), (8, 32)])
def test_solver_residual_width_is_a_quarter_of_num_residual_hiddens(r, d):
    for net in (small_model(0, num_residual_hiddens=r, embedding_dim=d),
                small_model(2, num_residual_hiddens=r, embedding_dim=d),
                M.build_solver({**SMALL_CFG, 'num_residual_hiddens': r, 'embedding_dim': d})):
        stack = net.solver.features[-1]  # ResidualStack on D/2 channels
        conv3x3 = stack[0].block[2]
        assert (conv3x3.in_channels, conv3x3.out_channels) == (d // 2, r // 4)


# ---------------------------------------------------------------- quantizers


def make_vq(decay):
    return M.make_quantizer(num_embeddings=K, embedding_dim=D, commitment_cost=0.25,
                            decay=decay)


@pytest.mark.parametrize('decay', [0.0, 0.9])
def test_perplexity_and_straight_through(decay):
    vq = make_vq(decay)
    z = torch.randn(4, D, 6, 6, requires_grad=True)
    codebook = vq.codebook.detach().clone()  # EMA updates it during forward
    out = vq(z)
    usage = torch.bincount(out.indices.flatten(), minlength=K).numpy()  # (K,) code counts
    assert (usage > 0).sum() > 1
    # exp(entropy of the batch's code usage), entropy in nats
    assert out.perplexity.item() == pytest.approx(np.exp(scipy.stats.entropy(usage)),
                                                  rel=1e-5)
    assert out.quantized.shape == z.shape and out.indices.shape == (4, 6, 6)
    codes = codebook[out.indices].movedim(-1, 1)  # (4, D, 6, 6)
    assert torch.allclose(out.quantized, codes, atol=1e-6)
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through


def test_single_code_perplexity_is_one():
    vq = make_vq(0.0)
    out = vq(vq.codebook[3].detach().reshape(1, D, 1, 1).expand(2, D, 3, 3))
    assert out.perplexity.item() == pytest.approx(1.0)
    assert (out.indices == 3).all()


def test_ema_is_frozen_in_eval_mode():
    vq = make_vq(0.9).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, D, 4, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


@pytest.mark.parametrize('decay', [0.0, 0.9])
def test_quantizer_is_fp32_under_autocast(decay):
    vq = make_vq(decay)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        out = vq(torch.randn(2, D, 4, 4).bfloat16())
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32


# ---------------------------------------------------------------- state


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_optimizer_parameters_stay_the_modules(decay):
    model = small_model(0, decay=decay, threshold_fn='ternarizer')
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    image, audio = batch()
    for _ in range(3):
        optimizer.zero_grad()
        out = model(image, audio)
        loss = train_loss(out, image, audio) + 1e-4 * model.mask_regularization()
        loss.backward()
        optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert held == {id(p) for p in model.parameters()}
    assert all(id(p) in held for p in optimizer.state)


@pytest.mark.parametrize('base_type', M.BASE_TYPES)
def test_state_dict_round_trip(base_type):
    model = small_model(base_type)
    image, audio = batch()
    model(image, audio)  # one training step's worth of EMA / BN updates
    fresh = small_model(base_type)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model.eval()(image, audio), fresh.eval()(image, audio)
    assert torch.equal(a.logits, b.logits)
    if a.recon_audio is not None:
        assert torch.equal(a.recon_audio, b.recon_audio)


@pytest.mark.parametrize('base_type', [0, 3])
def test_eval_outputs_are_deterministic(base_type):
    model = small_model(base_type).eval()
    image, audio = batch()
    with torch.no_grad():
        first, second = model(image, audio), model(image, audio)
    assert torch.equal(first.logits, second.logits)


# ---------------------------------------------------------------- builders


@pytest.mark.parametrize(('key', 'value'), [('threshold_fn', 'foo'), ('mode', 'video-only'),
                                            ('mask_init', 'zeros'), ('base_type', 5)])
def test_models_refuse_values_they_do_not_implement(key, value):
    with pytest.raises(ValueError, match=f'{key}={value!r} is not one of'):
        M.build_model({**SMALL_CFG, key: value})
    with pytest.raises(ValueError, match='base_type=4 is not one of 0, 2'):
        M.build_solver({**SMALL_CFG, 'base_type': 4})


def test_build_model_ignores_extra_keys_and_defaults_threshold():
    model = M.build_model({**SMALL_CFG, 'learning_rate': 1e-3, 'threshold': None})
    assert model.solver.threshold == M.DEFAULT_THRESHOLD


def test_constructors_are_keyword_only():
    with pytest.raises(TypeError):
        M.Model('multimodal')
    with pytest.raises(TypeError):
        M.TaskSolver('multimodal')


# ---------------------------------------------------------------- parity

# Released state-dict entries that are buffers there: BatchNorm statistics, EMA sizes.
RELEASED_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked', '_ema_cluster_size')


@pytest.mark.parametrize('name', ['model_ema', 'model_plain', 'baseline2'])
def test_trainable_parameters_are_the_released_ones(name, shared):
    """Built from a released fixture's config, the model trains exactly the released
    parameters that a training step's gradient reaches (train_step_NAME, same config),
    with their sizes. The released code also counts its EMA codebook and code sums as
    parameters (no gradient reaches them); the project keeps those in buffers."""
    orig = shared / 'cm-vqvae-orig'
    index = json.loads((orig / 'index.json').read_text())
    assert index[name]['config'] == index['train_step'][name]['config']
    state = torch.load(orig / f'{name}.pt', map_location='cpu', weights_only=True)
    net = M.build_model({**index[name]['config'], 'num_classes': C})
    names = released_names(net)
    ours = {names[k]: p.numel() for k, p in net.named_parameters() if p.requires_grad}
    with_grad = index['train_step'][name]['params_with_grad']
    assert ours == {k: state[k].numel() for k in with_grad}
    assert M.count_parameters(net) == sum(state[k].numel() for k in with_grad)
    released_parameters = {k for k in state if not k.endswith(RELEASED_BUFFERS)}
    ema = [f'_vq_vae_{m}.{p}' for m in M.MODALITIES for p in ('_ema_w', '_embedding.weight')]
    assert released_parameters - set(with_grad) == \
        (set(ema) if index[name]['config']['decay'] > 0 else set())


def conv(k, cin, cout, bias=True):
    """Weights and bias of a k x k (transposed) convolution or a linear layer (k = 1)."""
    return k * k * cin * cout + bias * cout


def stack(c, r, layers):
    """Residual stack: per block BN(c), conv3x3 c->r, BN(r), conv1x1 r->c (no biases);
    then BN(c). A BatchNorm has 2 c parameters."""
    return layers * (2 * c + conv(3, c, r, False) + 2 * r + conv(1, r, c, False)) + 2 * c


def head(features, classes):
    """fc features->256, BatchNorm1d(256), fc 256->classes."""
    return conv(1, features, 256) + 2 * 256 + conv(1, 256, classes)


def paper_count(cfg):
    """Trainable parameters of cfg's model, counted from the architecture of DESIGN.md
    section 4 (not from the implementation); base_type 4 from torchvision's published
    ResNet18 size."""
    h, r, layers = cfg['num_hiddens'], cfg['num_residual_hiddens'], cfg['num_residual_layers']
    d, k, c = cfg['embedding_dim'], cfg['num_embeddings'], cfg['num_classes']
    used = M.used_modalities(cfg['mode'])
    if cfg['base_type'] == 4:
        resnet18 = ResNet18_Weights.IMAGENET1K_V1.meta['num_params'] - conv(1, 512, 1000)
        audio_conv1 = conv(7, 3, 64, False) - conv(7, 1, 64, False)  # 1 input channel
        return len(used) * resnet18 - ('audio' in used) * audio_conv1 + head(512 * len(used), c)
    encoder = {m: conv(4, channels, h // 2) + 2 * (h // 2) + conv(4, h // 2, h) + 2 * h
               + conv(3, h, h) + stack(h, r, layers) + conv(1, h, d)   # + pre-VQ conv
               for m, channels in (('image', 3), ('audio', 1))}
    decoder = conv(3, d, h) + stack(h, r, layers) + conv(4, h, h // 2) + 2 * (h // 2)
    decoder = {'image': decoder + conv(4, h // 2, 3),
               'audio': decoder + conv(4, h // 2, h // 4) + 2 * (h // 4) + conv(4, h // 4, 1)}
    solver = (conv(3, d * len(used), d // 2) + 2 * (d // 2) + conv(3, d // 2, d // 2)
              + stack(d // 2, r // 4, layers) + head(d // 2 * 8 * 8, c))
    mask = 2 * d if cfg['base_type'] in (0, 3) else 0
    if cfg['base_type'] in (1, 3):   # encoders and pre-VQ convs of the used modalities only
        return sum(encoder[m] for m in used) + solver + mask
    codebooks = 0 if cfg['decay'] > 0 else 2 * k * d   # EMA codes live in buffers
    return sum(encoder.values()) + sum(decoder.values()) + codebooks + solver + mask


def test_paper_parameter_counts():
    from tools.parity import VARIANTS, parity_counts
    expected = {name: paper_count({**PAPER, **change}) for name, change in VARIANTS.items()}
    assert parity_counts() == expected
