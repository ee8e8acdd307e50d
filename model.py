"""CM-VQVAE model family (WACV 2024): VQ-VAEs per modality + a masked TaskSolver.

Imports only torch, torchvision and the standard library. Shapes use B = batch,
D = embedding_dim, K = num_embeddings, h = num_hiddens; 1 = image, 2 = audio.

Builders (cfg: main.py's settings plus num_classes; extra keys are ignored):
    build_model(cfg)            -> Model | ModelBaseline | ModelComparison | ModelFeat
    build_vqvae(cfg)            -> ModelVQVAE      (two-stage, stage 1)
    build_solver(cfg)           -> ModelSolver     (two-stage, stage 2)
    build_probe(cfg, keep=)     -> ModelProbe      (keep: PROBE_KEEPS)
Models (keyword-only constructors; the paper's values are main.py's header):
    Model               base_type 0: VQ-VAE x 2 + masked TaskSolver
    ModelBaseline       base_type 1 (no VQ/decoders, no mask), 2 (no mask),
                        3 (no VQ/decoders, masked)
    ModelComparison     base_type 4: two ResNet18 (the OGM-GE backbone)
    ModelVQVAE          encoders + pre-VQ + quantizers + decoders, no classifier
    ModelSolver         TaskSolver on frozen quantized maps: forward(q_image, q_audio)
    ModelTwoStage       a frozen ModelVQVAE feeding a ModelSolver (main_separate.py)
    ModelProbe + Masker decode shared-only / private-only / neighbour-mixed codes
(RML_feat's ModelFeat, on pre-extracted feature sequences, is in model_feat.py.)
All forwards return ModelOutput (fields a variant does not produce are None):
    logits (B, C), vq_loss (image + audio), recon_image, recon_audio,
    perplexity_image, perplexity_audio, quantized_image, quantized_audio
    (B, D, 32, 32; the pre-VQ map for base_type 1/3), vq_loss_image,
    vq_loss_audio, indices_image, indices_audio (B, 32, 32).
Every model has (None / no-op when it has no mask or no codebook):
    mask_ratios() -> dict(private1, shared1, private2, shared2, complementarity), in %
    mask_regularization() -> scalar tensor, the sum of the raw mask
    codebooks() -> (image codebook (K, D) or None, audio codebook (K, D) or None)
    get_mask() -> raw mask (2D,) or None; set_mask(values); reset_mask()

As released: the TaskSolver's residual stack (on D/2 channels) has
num_residual_hiddens // 4 hidden channels; 'attention' masks multiply by the raw
values but count channels with the binarizer rule; the probe's 'mix' gives sample
i the private codes of sample i - 1. A state dict saved by the released code loads
with cmvq.released.load_released.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ('multimodal', 'image-only', 'audio-only')
BASE_TYPES = (0, 1, 2, 3, 4)
THRESHOLD_FNS = ('binarizer', 'ternarizer', 'attention', 'randomizer')
MASK_INITS = ('1s', 'uniform')
DATASETS = ('CREMA-D', 'RML', 'RML_feat', 'EmoVoxCeleb')
PROBE_KEEPS = ('all', 'shared', 'private', 'mix')
MODALITIES = ('image', 'audio')
DEFAULT_THRESHOLD = 5e-3
EMA_EPS = 1e-5                 # Laplace smoothing of the EMA cluster sizes (released)
LATENT_SIZE = 32               # side of the latent maps the TaskSolver takes
DROPOUT = 0.5                  # the released TaskSolver's dropout probability

# Per-modality architecture: input channels, maxpool after the third encoder
# conv (audio is 256x256 and must reach the same 32x32 latent), decoder upsamplings.
_MODALITY_SPEC = {
    'image': {'channels': 3, 'pool': False, 'upsamples': 2},
    'audio': {'channels': 1, 'pool': True, 'upsamples': 3},
}


def check_choice(name, value, allowed):
    """Raise ValueError naming the allowed values unless value is one of them."""
    # Compare types too, so that True is not accepted as base_type 1.
    if not any(value == a and type(value) is type(a) for a in allowed):
        listed = ', '.join(repr(a) for a in allowed)
        raise ValueError(f'{name}={value!r} is not one of {listed}')


def used_modalities(mode):
    """Modalities whose codes reach the classifier in this mode."""
    check_choice('mode', mode, MODES)
    return {'multimodal': MODALITIES, 'image-only': ('image',),
            'audio-only': ('audio',)}[mode]


class ModelOutput(NamedTuple):
    """What every model's forward returns; absent outputs are None."""
    logits: torch.Tensor | None = None            # (B, num_classes)
    vq_loss: torch.Tensor | None = None           # scalar, image + audio
    recon_image: torch.Tensor | None = None       # (B, 3, 128, 128)
    recon_audio: torch.Tensor | None = None       # (B, 1, 256, 256)
    perplexity_image: torch.Tensor | None = None  # scalar
    perplexity_audio: torch.Tensor | None = None  # scalar
    quantized_image: torch.Tensor | None = None   # (B, D, 32, 32)
    quantized_audio: torch.Tensor | None = None   # (B, D, 32, 32)
    vq_loss_image: torch.Tensor | None = None     # scalar
    vq_loss_audio: torch.Tensor | None = None     # scalar
    indices_image: torch.Tensor | None = None     # (B, 32, 32) long
    indices_audio: torch.Tensor | None = None     # (B, 32, 32) long


# ----------------------------------------------------------------------------
# Vector quantizers


class VQOutput(NamedTuple):
    loss: torch.Tensor        # scalar
    quantized: torch.Tensor   # (B, D, *S), straight-through to the input
    perplexity: torch.Tensor  # scalar, exp(entropy of mean code usage)
    indices: torch.Tensor     # (B, *S) long


def _nearest_code(flat, codebook):
    """Index of the nearest code for each row: flat (N, D), codebook (K, D) -> (N,)."""
    # ||x||^2 + ||e||^2 - 2 x.e, shape (N, K)
    dist = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
            - 2 * flat @ codebook.t())
    return dist.argmin(1)


def _code_counts(indices, num_embeddings, dtype=torch.float32):
    """How often each code is used: indices (N,) -> (K,) counts, exact below 2**24.

    A scatter-add, not torch.bincount: bincount's output size depends on the data,
    which splits a torch.compile graph there (and the split tripped torch 2.14 on
    channels_last bf16 inputs)."""
    ones = torch.ones_like(indices, dtype=dtype)
    return torch.zeros(num_embeddings, dtype=dtype, device=indices.device).index_add_(
        0, indices, ones)


def _perplexity(indices, num_embeddings):
    """exp(entropy) of the batch's code usage: 1 (one code) .. K (uniform)."""
    probs = _code_counts(indices, num_embeddings) / indices.numel()
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


class _Quantizer(nn.Module):
    """Nearest-code lookup shared by the plain and the EMA quantizer."""

    def __init__(self, *, num_embeddings, embedding_dim, commitment_cost):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost

    @property
    def codebook(self):
        """The (K, D) code table."""
        raise NotImplementedError

    def forward(self, z):
        """z (B, D, *S) -> VQOutput; D is dim 1 as for conv maps."""
        batch, dim, *spatial = z.shape
        assert dim == self.embedding_dim, f'expected {self.embedding_dim} channels, got {dim}'
        # fp32 even under bf16 autocast: distances between nearby codes need it.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().movedim(1, -1).reshape(-1, dim)          # (N, D)
            codebook = self.codebook.float()                          # (K, D)
            indices = _nearest_code(flat.detach(), codebook.detach())  # (N,)
            quantized = F.embedding(indices, codebook)                # (N, D)
            loss = self._loss(flat, quantized)
            if self.training:
                self._update(flat.detach(), indices)
            quantized = flat + (quantized - flat).detach()  # straight-through
            perplexity = _perplexity(indices, self.num_embeddings)
        quantized = quantized.reshape(batch, *spatial, dim).movedim(-1, 1).contiguous()
        return VQOutput(loss, quantized, perplexity, indices.reshape(batch, *spatial))

    def _loss(self, flat, quantized):
        raise NotImplementedError

    def _update(self, flat, indices):
        """Codebook update that is not done by the optimizer (EMA only)."""


class VectorQuantizer(_Quantizer):
    """Plain VQ: codebook learned by gradient, loss ||sg[z]-e||^2 + beta ||z-sg[e]||^2."""

    def __init__(self, *, num_embeddings, embedding_dim, commitment_cost):
        super().__init__(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                         commitment_cost=commitment_cost)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1 / num_embeddings, 1 / num_embeddings)

    @property
    def codebook(self):
        return self.embedding.weight

    def _loss(self, flat, quantized):
        codebook_loss = F.mse_loss(quantized, flat.detach())
        commitment = F.mse_loss(quantized.detach(), flat)
        return codebook_loss + self.commitment_cost * commitment


class VectorQuantizerEMA(_Quantizer):
    """VQ whose codes are EMA means of their assigned vectors; loss beta ||z-sg[e]||^2.

    All state lives in buffers updated in place under no_grad, in training mode
    only, so the optimizer's parameter set never changes.
    """

    def __init__(self, *, num_embeddings, embedding_dim, commitment_cost, decay,
                 epsilon=EMA_EPS):
        super().__init__(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                         commitment_cost=commitment_cost)
        assert 0.0 < decay < 1.0, f'EMA decay must be in (0, 1), got {decay}'
        self.decay = decay
        self.epsilon = epsilon
        self.register_buffer('embedding', torch.randn(num_embeddings, embedding_dim))
        self.register_buffer('ema_cluster_size', torch.zeros(num_embeddings))
        self.register_buffer('ema_w', torch.randn(num_embeddings, embedding_dim))

    @property
    def codebook(self):
        return self.embedding

    def _loss(self, flat, quantized):
        return self.commitment_cost * F.mse_loss(quantized.detach(), flat)

    @torch.no_grad()
    def _update(self, flat, indices):
        """EMA of cluster sizes (K,) and code sums (K, D); codes = sums / sizes."""
        k, decay, eps = self.num_embeddings, self.decay, self.epsilon
        counts = _code_counts(indices, k, flat.dtype)                     # (K,)
        code_sums = torch.zeros_like(self.ema_w).index_add_(0, indices, flat)  # (K, D)
        counts, code_sums = _sum_over_processes(counts, code_sums)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        # Laplace smoothing keeps unused codes from dividing by zero; like the
        # original, the smoothed sizes are what is stored.
        total = self.ema_cluster_size.sum()
        self.ema_cluster_size.add_(eps).div_(total + k * eps).mul_(total)
        self.ema_w.mul_(decay).add_(code_sums, alpha=1 - decay)
        self.embedding.copy_(self.ema_w / self.ema_cluster_size.unsqueeze(1))


def _sum_over_processes(counts, code_sums):
    """(K,) counts and (K, D) sums of the whole global batch under torch.distributed.

    Each process quantizes its share of the batch; summing the statistics (one
    all-reduce) gives every process the EMA update of the whole batch, so all keep
    the same codebook (DDP would otherwise keep rank 0's). No-op in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return counts, code_sums
    k = counts.numel()
    both = torch.cat([counts.unsqueeze(1), code_sums], 1)  # (K, 1 + D)
    dist.all_reduce(both)
    return both[:, 0].reshape(k), both[:, 1:]


def make_quantizer(*, num_embeddings, embedding_dim, commitment_cost, decay):
    """decay > 0: EMA codebook (buffers); decay == 0: plain codebook (parameter)."""
    kwargs = {'num_embeddings': num_embeddings, 'embedding_dim': embedding_dim,
              'commitment_cost': commitment_cost}
    if decay > 0:
        return VectorQuantizerEMA(decay=decay, **kwargs)
    return VectorQuantizer(**kwargs)


# ----------------------------------------------------------------------------
# Encoders and decoders


class ResidualBlock(nn.Module):
    """x + conv1x1(ReLU(BN(conv3x3(ReLU(BN(x)))))), channels -> hiddens -> channels."""

    def __init__(self, *, channels, hiddens):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, hiddens, 3, padding=1, bias=False),
            nn.BatchNorm2d(hiddens), nn.ReLU(inplace=True),
            nn.Conv2d(hiddens, channels, 1, bias=False),
        )

    def forward(self, x):
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    """num_layers residual blocks, then BN + ReLU; shape preserved."""

    def __init__(self, *, channels, hiddens, num_layers):
        blocks = [ResidualBlock(channels=channels, hiddens=hiddens)
                  for _ in range(num_layers)]
        super().__init__(*blocks, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class Encoder(nn.Sequential):
    """(B, in_channels, S, S) -> (B, h, S/4, S/4), or S/8 with pool (audio)."""

    def __init__(self, *, in_channels, num_hiddens, num_residual_hiddens,
                 num_residual_layers, pool=False):
        h = num_hiddens
        layers = [
            nn.Conv2d(in_channels, h // 2, 4, stride=2, padding=1),
            nn.BatchNorm2d(h // 2), nn.ReLU(inplace=True),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1),
            nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, padding=1),
        ]
        if pool:
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        layers.append(ResidualStack(channels=h, hiddens=num_residual_hiddens,
                                    num_layers=num_residual_layers))
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """(B, D, s, s) -> (B, out_channels, s * 2**upsamples, ...); channels halve per step."""

    def __init__(self, *, embedding_dim, num_hiddens, num_residual_hiddens,
                 num_residual_layers, out_channels, upsamples):
        channels = num_hiddens
        layers = [
            nn.Conv2d(embedding_dim, channels, 3, padding=1),
            ResidualStack(channels=channels, hiddens=num_residual_hiddens,
                          num_layers=num_residual_layers),
        ]
        for _ in range(upsamples - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers.append(nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1))
        super().__init__(*layers)


def make_encoder(modality, *, num_hiddens, num_residual_hiddens, num_residual_layers):
    spec = _MODALITY_SPEC[modality]
    return Encoder(in_channels=spec['channels'], pool=spec['pool'], num_hiddens=num_hiddens,
                   num_residual_hiddens=num_residual_hiddens,
                   num_residual_layers=num_residual_layers)


def make_decoder(modality, *, embedding_dim, num_hiddens, num_residual_hiddens,
                 num_residual_layers):
    spec = _MODALITY_SPEC[modality]
    return Decoder(embedding_dim=embedding_dim, num_hiddens=num_hiddens,
                   num_residual_hiddens=num_residual_hiddens,
                   num_residual_layers=num_residual_layers,
                   out_channels=spec['channels'], upsamples=spec['upsamples'])


# ----------------------------------------------------------------------------
# Mask threshold functions: raw mask -> mask, gradient straight through to raw


class _StraightThrough(torch.autograd.Function):
    """Forward: hard = rule(raw); backward: d hard / d raw taken as identity."""

    @staticmethod
    def forward(ctx, raw, rule):
        return rule(raw)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def binarizer(raw, threshold=DEFAULT_THRESHOLD):
    """1 where raw > threshold, else 0 (1 = shared channel)."""
    return _StraightThrough.apply(raw, lambda m: (m > threshold).to(m.dtype))


def _ternary(m, threshold):
    return (m > threshold).to(m.dtype) - (m < 0).to(m.dtype)


def ternarizer(raw, threshold=DEFAULT_THRESHOLD):
    """-1 where raw < 0, 1 where raw > threshold, else 0."""
    return _StraightThrough.apply(raw, lambda m: _ternary(m, threshold))


def attention(raw, threshold=DEFAULT_THRESHOLD):
    """The raw values themselves (a soft channel gate); threshold unused."""
    return raw


def randomizer(raw, threshold=DEFAULT_THRESHOLD):
    """A fresh Bernoulli(0.5) {0, 1} mask each call, train and eval alike:
    the 'masking is not dropout' control. threshold unused."""
    return _StraightThrough.apply(raw, lambda m: torch.bernoulli(torch.full_like(m, 0.5)))


THRESHOLD_FUNCTIONS = {'binarizer': binarizer, 'ternarizer': ternarizer,
                       'attention': attention, 'randomizer': randomizer}


def compute_mask_ratios(mask, embedding_dim):
    """Ratios of a thresholded mask with 2D entries (first D = image), in %.

    private_k / shared_k: zero / non-zero entries of modality k's half, as % of
    all 2D channels; complementarity = 100 * min(shared) / max(shared), 0 if both 0.
    """
    flat = mask.detach().reshape(-1)
    assert flat.numel() == 2 * embedding_dim, (
        f'mask has {flat.numel()} entries, expected {2 * embedding_dim}')
    total = flat.numel()
    ratios = {}
    for k, half in enumerate((flat[:embedding_dim], flat[embedding_dim:]), start=1):
        shared = int((half != 0).sum())
        ratios[f'private{k}'] = 100.0 * (half.numel() - shared) / total
        ratios[f'shared{k}'] = 100.0 * shared / total
    high = max(ratios['shared1'], ratios['shared2'])
    low = min(ratios['shared1'], ratios['shared2'])
    ratios['complementarity'] = 100.0 * low / high if high > 0 else 0.0
    return ratios


# ----------------------------------------------------------------------------
# Task solvers


class MaskedSolver(nn.Module):
    """Holds the (2D, 1, 1) channel mask and applies it to both modalities' codes.

    First D entries gate the image channels, last D the audio channels. With
    masked=False the mask parameter does not exist and codes pass unchanged.
    Keywords (the mask options, MASK_KEYS): mode, masked, mask_init, mask_scale,
    threshold_fn, threshold (None: DEFAULT_THRESHOLD).
    """

    def __init__(self, *, mode, embedding_dim, masked, mask_init, mask_scale,
                 threshold_fn, threshold):
        super().__init__()
        check_choice('mode', mode, MODES)
        check_choice('mask_init', mask_init, MASK_INITS)
        check_choice('threshold_fn', threshold_fn, THRESHOLD_FNS)
        self.mode = mode
        self.embedding_dim = embedding_dim
        self.mask_init = mask_init
        self.mask_scale = mask_scale
        self.threshold_fn = threshold_fn
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        if masked:
            self.mask = nn.Parameter(torch.empty(2 * embedding_dim, 1, 1))
            self.reset_mask()
        else:
            self.register_parameter('mask', None)

    @property
    def in_modalities(self):
        return used_modalities(self.mode)

    def thresholded_mask(self):
        """(2D, 1, 1) mask after the threshold function, differentiable to raw."""
        if self.mask is None:
            return None
        return THRESHOLD_FUNCTIONS[self.threshold_fn](self.mask, self.threshold)

    def reset_mask(self):
        """Re-initialise in place: '1s' fills mask_scale, 'uniform' draws U(-s, s)."""
        if self.mask is None:
            return
        with torch.no_grad():
            if self.mask_init == '1s':
                self.mask.fill_(self.mask_scale)
            else:
                self.mask.uniform_(-self.mask_scale, self.mask_scale)

    def get_mask(self):
        """Copy of the raw mask, shape (2D,), or None."""
        return None if self.mask is None else self.mask.detach().reshape(-1).clone()

    def set_mask(self, values):
        """Copy 2D values into the raw mask in place (the parameter stays the same)."""
        if self.mask is None:
            raise ValueError('this solver has no mask (base_type 1, 2 or 4)')
        with torch.no_grad():
            values = torch.as_tensor(values, dtype=self.mask.dtype)
            self.mask.copy_(values.reshape(self.mask.shape))

    def shared_channels(self):
        """(2D, 1, 1) float, 1 where a channel counts as shared, else 0; or None.

        The thresholded mask's non-zeros, except for 'attention', whose forward
        multiplies by the raw values: like the released get_private_shared_ratio,
        its channels are counted with the binarizer rule (raw > threshold).
        """
        if self.mask is None:
            return None
        if self.threshold_fn == 'attention':
            mask = binarizer(self.mask, self.threshold)
        else:
            mask = self.thresholded_mask()
        return (mask.detach() != 0).to(mask.dtype)

    def mask_ratios(self):
        shared = self.shared_channels()
        if shared is None:
            return None
        return compute_mask_ratios(shared, self.embedding_dim)

    def mask_regularization(self):
        return None if self.mask is None else self.mask.sum()

    def masked_parts(self, q_image, q_audio):
        """The mode's modalities, each (B, D, *S) times its half of the mask: a dict."""
        mask = self.thresholded_mask()
        codes = {'image': q_image, 'audio': q_audio}
        halves = {'image': slice(0, self.embedding_dim),
                  'audio': slice(self.embedding_dim, None)}
        parts = {}
        for modality in self.in_modalities:
            x = codes[modality]
            assert x is not None, f'mode {self.mode!r} needs the {modality} codes'
            if mask is not None:
                # (D, 1, 1) -> (1, D, 1, ...) to broadcast over (B, D, *S)
                gate = mask[halves[modality]].reshape(1, -1, *[1] * (x.dim() - 2))
                x = x * gate
            parts[modality] = x
        return parts

    def masked_codes(self, q_image, q_audio):
        """Mask, keep the mode's modalities, concat on dim 1: (B, D or 2D, *S)."""
        return torch.cat(list(self.masked_parts(q_image, q_audio).values()), dim=1)


def _mlp_head(in_features, num_classes, dropout):
    """(B, ...) -> flatten -> fc 256, BN, ReLU, dropout -> fc num_classes."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )


class TaskSolver(MaskedSolver):
    """Emotion classifier on masked codes: (B, D, 32, 32) x 2 -> logits (B, C).

    Masked concat (B, n*D, 32, 32) -> conv/2 -> (B, D/2, 16, 16) -> conv/2
    -> (B, D/2, 8, 8) -> residual stack -> flatten (D/2*64) -> fc 256 -> fc C.
    """

    def __init__(self, *, embedding_dim, num_residual_layers, num_residual_hiddens,
                 num_classes, latent_size=LATENT_SIZE, dropout=DROPOUT, **mask):
        super().__init__(embedding_dim=embedding_dim, **mask)
        # As released: the stack has D/2 channels (the released num_hiddens / 4, equal
        # whenever that code runs) and num_residual_hiddens // 4 hidden channels.
        half = embedding_dim // 2
        in_channels = embedding_dim * len(self.in_modalities)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=2, padding=1),
            nn.Dropout(dropout),
            ResidualStack(channels=half, hiddens=num_residual_hiddens // 4,
                          num_layers=num_residual_layers),
        )
        # Two stride-2 convs: latent_size / 4 per side (the released code hard-codes
        # 2048 = 32 * 8 * 8, so it runs only at embedding_dim 64).
        flat = half * (-(-latent_size // 4)) ** 2
        self.classifier = _mlp_head(flat, num_classes, dropout)

    def forward(self, q_image, q_audio):
        return self.classifier(self.features(self.masked_codes(q_image, q_audio)))


# ----------------------------------------------------------------------------
# Models


class ModelBase(nn.Module):
    """Mask and codebook accessors shared by every model.

    Subclasses may hold a `solver` (a MaskedSolver) and `quantizers` (a
    ModuleDict keyed 'image'/'audio'), directly or inside a `backbone`.
    """

    def _solver(self):
        return getattr(self, 'solver', None)

    def mask_ratios(self):
        """dict(private1, shared1, private2, shared2, complementarity) in %, or None."""
        solver = self._solver()
        return None if solver is None else solver.mask_ratios()

    def mask_regularization(self):
        """Sum of the raw mask (scalar tensor with grad), or None without a mask."""
        solver = self._solver()
        return None if solver is None else solver.mask_regularization()

    def get_mask(self):
        """Raw mask (2D,) copy, or None."""
        solver = self._solver()
        return None if solver is None else solver.get_mask()

    def set_mask(self, values):
        solver = self._solver()
        if solver is None:
            raise ValueError(f'{type(self).__name__} has no mask')
        solver.set_mask(values)

    def reset_mask(self):
        solver = self._solver()
        if solver is not None:
            solver.reset_mask()

    def _quantizers(self):
        quantizers = getattr(self, 'quantizers', None)
        backbone = getattr(self, 'backbone', None)
        if quantizers is None and backbone is not None:
            quantizers = getattr(backbone, 'quantizers', None)
        return quantizers

    def codebooks(self):
        """(image codebook (K, D) or None, audio codebook (K, D) or None), detached."""
        quantizers = self._quantizers()
        return tuple(
            quantizers[m].codebook.detach()
            if quantizers is not None and m in quantizers else None
            for m in MODALITIES)


class ModelVQVAE(ModelBase):
    """Encoders + pre-VQ convs (+ quantizers + decoders) for the given modalities.

    forward(image (B, 3, 128, 128), audio (B, 1, 256, 256)) -> ModelOutput with
    quantized_* (B, D, 32, 32), recon_*, vq_loss*, perplexity_*, indices_*.
    With quantize=False only encoders and pre-VQ convs exist; quantized_* then
    holds the pre-VQ map (base_type 1 and 3).
    """

    def __init__(self, *, num_hiddens, num_residual_hiddens, num_residual_layers,
                 embedding_dim, num_embeddings, commitment_cost, decay, quantize=True,
                 modalities=MODALITIES):
        super().__init__()
        for modality in modalities:
            check_choice('modality', modality, MODALITIES)
        self.modalities = tuple(modalities)
        self.quantize = quantize
        arch = {'num_hiddens': num_hiddens, 'num_residual_hiddens': num_residual_hiddens,
                'num_residual_layers': num_residual_layers}
        self.encoders = nn.ModuleDict(
            {m: make_encoder(m, **arch) for m in self.modalities})
        self.pre_vq = nn.ModuleDict(
            {m: nn.Conv2d(num_hiddens, embedding_dim, 1) for m in self.modalities})
        self.quantizers = self.decoders = None
        if quantize:
            self.quantizers = nn.ModuleDict({m: make_quantizer(
                num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                commitment_cost=commitment_cost, decay=decay) for m in self.modalities})
            self.decoders = nn.ModuleDict({m: make_decoder(
                m, embedding_dim=embedding_dim, **arch) for m in self.modalities})

    def forward(self, image, audio, decode=True):
        """decode=False skips the decoders (recon_* None): for callers that only
        need the codes, e.g. a frozen VQ-VAE feeding the two-stage solver."""
        inputs = {'image': image, 'audio': audio}
        fields, losses = {}, []
        for m in self.modalities:
            z = self.pre_vq[m](self.encoders[m](inputs[m]))  # (B, D, 32, 32)
            if not self.quantize:
                fields[f'quantized_{m}'] = z
                continue
            vq = self.quantizers[m](z)
            losses.append(vq.loss)
            fields.update({f'quantized_{m}': vq.quantized, f'vq_loss_{m}': vq.loss,
                           f'perplexity_{m}': vq.perplexity, f'indices_{m}': vq.indices})
            if decode:
                fields[f'recon_{m}'] = self.decoders[m](vq.quantized)
        if losses:
            fields['vq_loss'] = sum(losses)
        return ModelOutput(**fields)

    def decode(self, q_image, q_audio):
        """Codes (B, D, 32, 32) -> (recon_image, recon_audio); None where absent."""
        assert self.quantize, 'decode needs the decoders (quantize=True)'
        codes = {'image': q_image, 'audio': q_audio}
        return tuple(self.decoders[m](codes[m])
                     if m in self.modalities and codes[m] is not None else None
                     for m in MODALITIES)


class SolverModel(ModelBase):
    """backbone (ModelVQVAE) + solver (TaskSolver): the base_type 0-3 models."""

    def __init__(self, *, quantize, num_hiddens, num_residual_hiddens, num_residual_layers,
                 embedding_dim, num_embeddings, commitment_cost, decay, num_classes, **mask):
        super().__init__()
        # Decoders train both encoders whatever the mode; without them an unused
        # modality would get no gradient, so it is not built.
        modalities = MODALITIES if quantize else used_modalities(mask['mode'])
        self.backbone = ModelVQVAE(
            num_hiddens=num_hiddens, num_residual_hiddens=num_residual_hiddens,
            num_residual_layers=num_residual_layers, embedding_dim=embedding_dim,
            num_embeddings=num_embeddings, commitment_cost=commitment_cost,
            decay=decay, quantize=quantize, modalities=modalities)
        self.solver = TaskSolver(
            embedding_dim=embedding_dim, num_residual_layers=num_residual_layers,
            num_residual_hiddens=num_residual_hiddens, num_classes=num_classes, **mask)

    def forward(self, image, audio):
        out = self.backbone(image, audio)
        logits = self.solver(out.quantized_image, out.quantized_audio)
        return out._replace(logits=logits)


class Model(SolverModel):
    """CM-VQVAE (base_type 0): two VQ-VAEs + masked TaskSolver.

    Keyword arguments: the VQ-VAE widths (VQVAE_KEYS), num_classes and the mask
    options (MASK_KEYS but masked); build_model takes them from a config.
    """

    base_type = 0

    def __init__(self, **kwargs):
        super().__init__(quantize=True, masked=True, **kwargs)


class ModelBaseline(SolverModel):
    """Ablations: base_type 1 encoders + pre-VQ + unmasked solver; 2 whole VQ-VAE
    + unmasked solver; 3 encoders + pre-VQ + masked solver. Same keywords as Model."""

    def __init__(self, *, base_type, **kwargs):
        check_choice('base_type', base_type, (1, 2, 3))
        super().__init__(quantize=base_type == 2, masked=base_type == 3, **kwargs)
        self.base_type = base_type


class ModelComparison(ModelBase):
    """base_type 4: ResNet18 per modality (untrained) -> 512-d each -> fc head."""

    base_type = 4

    def __init__(self, *, mode, num_classes, dropout=DROPOUT):
        super().__init__()
        self.mode = mode
        self.nets = nn.ModuleDict({m: _resnet18(m) for m in used_modalities(mode)})
        self.classifier = _mlp_head(512 * len(self.nets), num_classes, dropout)

    def forward(self, image, audio):
        inputs = {'image': image, 'audio': audio}
        feats = [net(inputs[m]) for m, net in self.nets.items()]  # (B, 512) each
        return ModelOutput(logits=self.classifier(torch.cat(feats, dim=1)))


def _resnet18(modality):
    """torchvision ResNet18 without fc: (B, C, H, W) -> (B, 512) pooled features."""
    import torchvision  # here, not on top: its import (~1 s) is needed for base_type 4 only
    net = torchvision.models.resnet18(weights=None)
    if modality == 'audio':
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class ModelSolver(ModelBase):
    """Two-stage, stage 2: TaskSolver on a frozen ModelVQVAE's quantized maps.

    forward(quantized_image, quantized_audio), each (B, D, 32, 32) -> ModelOutput.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.solver = TaskSolver(**kwargs)

    def forward(self, quantized_image, quantized_audio):
        logits = self.solver(quantized_image, quantized_audio)
        return ModelOutput(logits=logits, quantized_image=quantized_image,
                           quantized_audio=quantized_audio)


class ModelTwoStage(ModelBase):
    """Two-stage, both stages: a frozen ModelVQVAE (backbone) feeding a ModelSolver.

    forward(image, audio) -> ModelOutput. The VQ-VAE stays in eval mode (fixed
    BatchNorm statistics and codebooks) and gets no gradient. Its decoders run
    only outside training (validation, test, the saved reconstructions):
    training steps need just the codes.
    """

    def __init__(self, vqvae, solver):
        super().__init__()
        self.backbone, self.solver = vqvae.requires_grad_(False), solver

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, image, audio):
        with torch.no_grad():
            codes = self.backbone(image, audio, decode=not self.training)  # (B, D, 32, 32)
        out = self.solver(codes.quantized_image, codes.quantized_audio)
        return out._replace(recon_image=codes.recon_image, recon_audio=codes.recon_audio,
                            perplexity_image=codes.perplexity_image,
                            perplexity_audio=codes.perplexity_audio)


class Masker(nn.Module):
    """Select shared (mask != 0) and/or private (mask == 0) code channels.

    keep: 'all' (every channel), 'shared', 'private', or 'mix': sample i keeps its
    own shared channels and takes the private channels of sample i - 1 (sample 0
    those of the last one), a roll by +1 along the batch as in the released code.
    """

    def __init__(self, *, embedding_dim, keep='shared'):
        super().__init__()
        check_choice('keep', keep, PROBE_KEEPS)
        self.embedding_dim, self.keep = embedding_dim, keep

    def _select(self, x, half):
        """x (B, D, *S), half (D,) shared-channel mask -> x with channels dropped/mixed."""
        view = (1, -1, *[1] * (x.dim() - 2))
        shared = (half.detach() != 0).to(x.dtype).reshape(view)
        private_src = torch.roll(x, shifts=1, dims=0) if self.keep == 'mix' else x
        keep_shared = self.keep in ('all', 'shared', 'mix')
        keep_private = self.keep in ('all', 'private', 'mix')
        return x * shared * keep_shared + private_src * (1 - shared) * keep_private

    def forward(self, q_image, q_audio, mask):
        """mask: (2D, ...) with the image half first; non-zero = shared channel."""
        flat = mask.reshape(-1)
        d = self.embedding_dim
        return self._select(q_image, flat[:d]), self._select(q_audio, flat[d:])


class ModelProbe(Model):
    """A Model whose decoders see only shared, only private or neighbour-mixed codes.

    Holds exactly Model's parameters, so a trained Model's state_dict loads into
    it. Extra keyword: keep ('all', 'shared', 'private', 'mix'; see Masker).
    Shared channels are those mask_ratios counts as shared. Logits come from the
    unmasked path, reconstructions from the Masker's codes.
    """

    def __init__(self, *, keep='shared', **kwargs):
        super().__init__(**kwargs)
        self.masker = Masker(embedding_dim=self.solver.embedding_dim, keep=keep)

    def forward(self, image, audio):
        out = super().forward(image, audio)
        q_image, q_audio = self.masker(out.quantized_image, out.quantized_audio,
                                       self.solver.shared_channels())
        recon_image, recon_audio = self.backbone.decode(q_image, q_audio)
        return out._replace(recon_image=recon_image, recon_audio=recon_audio,
                            quantized_image=q_image, quantized_audio=q_audio)


# ----------------------------------------------------------------------------
# Builders from a config mapping

VQVAE_KEYS = ('num_hiddens', 'num_residual_hiddens', 'num_residual_layers', 'embedding_dim',
              'num_embeddings', 'commitment_cost', 'decay')
MASK_KEYS = ('mode', 'mask_init', 'mask_scale', 'threshold_fn', 'threshold')


def _pick(cfg, keys):
    return {k: cfg[k] for k in keys}


def build_model(cfg):
    """The model of cfg['base_type'] (0-4). cfg: main.py's settings plus num_classes
    (cmvq.config.model_config, which has checked them); RML_feat's models are
    model_feat.py's."""
    base_type, num_classes = cfg['base_type'], cfg['num_classes']
    if base_type == 4:
        return ModelComparison(mode=cfg['mode'], num_classes=num_classes)
    kwargs = {**_pick(cfg, VQVAE_KEYS), **_pick(cfg, MASK_KEYS), 'num_classes': num_classes}
    if base_type == 0:
        return Model(**kwargs)
    return ModelBaseline(base_type=base_type, **kwargs)


def build_vqvae(cfg):
    """Two-stage, stage 1: both modalities' VQ-VAEs, trained on reconstruction."""
    return ModelVQVAE(**_pick(cfg, VQVAE_KEYS))


def build_solver(cfg):
    """Two-stage, stage 2: the TaskSolver (masked for base_type 0, not for 2)."""
    check_choice('base_type', cfg['base_type'], (0, 2))
    return ModelSolver(masked=cfg['base_type'] == 0, num_classes=cfg['num_classes'],
                       **_pick(cfg, ('embedding_dim', 'num_residual_layers',
                                     'num_residual_hiddens', *MASK_KEYS)))


def build_probe(cfg, *, keep='shared'):
    """ModelProbe with Model's architecture (load a base_type 0 state_dict into it).

    keep: 'all', 'shared', 'private' or 'mix' (own shared + previous sample's private).
    """
    check_choice('base_type', cfg['base_type'], (0,))
    return ModelProbe(keep=keep, num_classes=cfg['num_classes'], **_pick(cfg, VQVAE_KEYS),
                      **_pick(cfg, MASK_KEYS))


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
