"""The straightforward base_type 0 that tools/bench.py times the project's Model against.

`ReferenceModel` is the same architecture written the way the original and the classic
VQ-VAE notebook do it: plain nn.Sequential stacks, VQ through an explicit (N, K)
distance matrix, a one-hot encodings matrix, codes gathered by one-hot @ codebook, EMA
statistics and perplexity from that one-hot matrix, and a straight-through mask written
inline. Its EMA state lives in buffers, like the project's, so both have exactly the
same trainable parameters (build_reference asserts it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as models

PAPER_PARAMETERS = 1_935_306  # model.build_model of main.py's header (decay 0.99)


class RefResidual(nn.Module):
    def __init__(self, h, r):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm2d(h), nn.ReLU(), nn.Conv2d(h, r, 3, 1, 1, bias=False),
            nn.BatchNorm2d(r), nn.ReLU(), nn.Conv2d(r, h, 1, bias=False))

    def forward(self, x):
        return x + self.block(x)


def ref_stack(h, r, n):
    return [RefResidual(h, r) for _ in range(n)] + [nn.BatchNorm2d(h), nn.ReLU()]


def ref_encoder(c, h, r, n, pool):
    layers = [nn.Conv2d(c, h // 2, 4, 2, 1), nn.BatchNorm2d(h // 2), nn.ReLU(),
              nn.Conv2d(h // 2, h, 4, 2, 1), nn.BatchNorm2d(h), nn.ReLU(),
              nn.Conv2d(h, h, 3, 1, 1)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(3, 2, 1)] if pool else []),
                         *ref_stack(h, r, n))


def ref_decoder(d, h, r, n, c, upsamples):
    layers = [nn.Conv2d(d, h, 3, 1, 1), *ref_stack(h, r, n)]
    for _ in range(upsamples - 1):
        layers += [nn.ConvTranspose2d(h, h // 2, 4, 2, 1), nn.BatchNorm2d(h // 2), nn.ReLU()]
        h //= 2
    return nn.Sequential(*layers, nn.ConvTranspose2d(h, c, 4, 2, 1))


class RefVQEMA(nn.Module):
    """The classic notebook's EMA quantizer (one-hot encodings), state in buffers."""

    def __init__(self, k, d, beta, decay, eps=1e-5):
        super().__init__()
        self.k, self.beta, self.decay, self.eps = k, beta, decay, eps
        self.register_buffer('embedding', torch.randn(k, d))
        self.register_buffer('ema_cluster_size', torch.zeros(k))
        self.register_buffer('ema_w', torch.randn(k, d))

    def forward(self, z):
        x = z.permute(0, 2, 3, 1).contiguous()
        flat = x.view(-1, x.shape[-1])
        distances = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(self.embedding ** 2, 1)
                     - 2 * torch.matmul(flat, self.embedding.t()))
        encodings = torch.zeros(flat.shape[0], self.k, device=z.device)
        encodings.scatter_(1, torch.argmin(distances, dim=1).unsqueeze(1), 1)
        quantized = torch.matmul(encodings, self.embedding).view(x.shape)
        if self.training:
            with torch.no_grad():
                size = self.ema_cluster_size * self.decay + (1 - self.decay) * encodings.sum(0)
                total = size.sum()
                self.ema_cluster_size = (size + self.eps) / (total + self.k * self.eps) * total
                dw = torch.matmul(encodings.t(), flat)
                self.ema_w = self.ema_w * self.decay + (1 - self.decay) * dw
                self.embedding = self.ema_w / self.ema_cluster_size.unsqueeze(1)
        loss = self.beta * F.mse_loss(quantized.detach(), x)
        quantized = x + (quantized - x).detach()
        avg = encodings.mean(0)
        perplexity = torch.exp(-torch.sum(avg * torch.log(avg + 1e-10)))
        return loss, quantized.permute(0, 3, 1, 2).contiguous(), perplexity


class ReferenceModel(nn.Module):
    """Straightforward base_type 0 (multimodal, EMA codebook, binarizer mask); see the
    module docstring. forward returns a model.ModelOutput, so compute_loss and
    run_epoch treat it like the project's Model."""

    def __init__(self, cfg):
        super().__init__()
        h, r, n = cfg['num_hiddens'], cfg['num_residual_hiddens'], cfg['num_residual_layers']
        d, k = cfg['embedding_dim'], cfg['num_embeddings']
        self.threshold = models.DEFAULT_THRESHOLD if cfg['threshold'] is None else cfg['threshold']
        self.enc1, self.enc2 = ref_encoder(3, h, r, n, False), ref_encoder(1, h, r, n, True)
        self.pre1, self.pre2 = nn.Conv2d(h, d, 1), nn.Conv2d(h, d, 1)
        self.vq1, self.vq2 = (RefVQEMA(k, d, cfg['commitment_cost'], cfg['decay'])
                              for _ in range(2))
        self.dec1, self.dec2 = ref_decoder(d, h, r, n, 3, 2), ref_decoder(d, h, r, n, 1, 3)
        self.mask = nn.Parameter(torch.full((2 * d, 1, 1), cfg['mask_scale']))
        half = d // 2
        self.solver = nn.Sequential(
            nn.Conv2d(2 * d, half, 3, 2, 1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, 2, 1), nn.Dropout(0.5), *ref_stack(half, r // 4, n),
            nn.Flatten(), nn.Linear(half * 64, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(256, cfg['num_classes']))

    def forward(self, image, audio):
        loss1, q1, p1 = self.vq1(self.pre1(self.enc1(image)))
        loss2, q2, p2 = self.vq2(self.pre2(self.enc2(audio)))
        hard = (self.mask > self.threshold).float()
        mask = self.mask + (hard - self.mask).detach()  # straight-through binarizer
        logits = self.solver(torch.cat([q1, q2], dim=1) * mask)
        return models.ModelOutput(logits=logits, vq_loss=loss1 + loss2,
                                  recon_image=self.dec1(q1), recon_audio=self.dec2(q2),
                                  perplexity_image=p1, perplexity_audio=p2)

    def mask_regularization(self):
        return self.mask.sum()


def build_reference(model_cfg):
    """ReferenceModel of model_cfg, checked to train the same parameters as build_model."""
    reference_net = ReferenceModel(model_cfg)
    ours = models.count_parameters(models.build_model({**model_cfg, 'base_type': 0}))
    theirs = models.count_parameters(reference_net)
    assert theirs == ours, f'reference has {theirs:,} trainable parameters, Model has {ours:,}'
    return reference_net
