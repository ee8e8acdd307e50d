"""CM-VQVAE on pre-extracted features (dataset 'RML_feat'): ModelFeat and its solver.

Inputs are feature sequences per clip: image (B, Ti, Fi), e.g. 16 frames of VGG-16
fc7, and audio (B, Ta, Fa), e.g. 64 frames of one wav2vec 2.0 layer
(prepare/make_features.py). The mask, quantizers and model accessors are
model.py's.
"""
import torch
from torch import nn

from model import (DROPOUT, MASK_KEYS, MODALITIES, MaskedSolver, ModelBase, ModelOutput,
                   check_choice, make_quantizer)

FEATURE_FRAMES = 16            # time frames the feature TaskSolver models (released)


def frame_indices(length, num):
    """num indices spread evenly over 0..length-1, both ends kept: round(i * (length-1) /
    (num-1)) as the released code rounds (Python's round); num=1 takes the middle."""
    if num == 1:
        return [(length - 1) // 2]
    step = (length - 1) / (num - 1)
    return [round(step * i) for i in range(num)]


def subsample_features(features, num=FEATURE_FRAMES):
    """(B, T, F) -> (B, num, F): num time frames spread evenly over T (the released
    subsample_features takes the 64 audio frames to 16). T < num repeats frames."""
    return features[:, frame_indices(features.shape[1], num)]


class _FrameProjection(nn.Sequential):
    """Per time frame: (fc, BatchNorm over (batch, time), ReLU, dropout) per width.

    (B, T, F) -> (B, T, widths[-1]); the BatchNorm sees (B, C, T), as in the
    released TaskSolver_Feat."""

    def __init__(self, in_features, widths, dropout):
        layers = []
        for width in widths:
            layers += [nn.Linear(in_features, width), _TimeBatchNorm(width),
                       nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = width
        super().__init__(*layers)


class _TimeBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d on (B, T, C) features: normalises each channel over batch and time."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class TaskSolverFeat(MaskedSolver):
    """The released TaskSolver_Feat on masked per-frame codes: logits (B, C).

    q_image (B, D, Ti), q_audio (B, D, Ta) -> masked -> frames (B, T, D), each
    modality subsampled to num_frames (audio 64 -> 16; image 16 stays) ->
    per-frame projections: image fc D->1024->512, audio fc D->512 (each fc with
    BatchNorm, ReLU, dropout) -> concat per frame (B, 16, 512 * n) -> LSTM 256 ->
    last step -> BatchNorm, ReLU, dropout -> fc C. 'image-only'/'audio-only' keep
    that modality's branch alone.
    """

    def __init__(self, *, embedding_dim, num_classes, num_frames=FEATURE_FRAMES,
                 image_widths=(1024, 512), audio_widths=(512,), lstm_size=256,
                 dropout=DROPOUT, **mask):
        super().__init__(embedding_dim=embedding_dim, **mask)
        self.num_frames = num_frames
        widths = {'image': image_widths, 'audio': audio_widths}
        self.projections = nn.ModuleDict({m: _FrameProjection(embedding_dim, widths[m], dropout)
                                          for m in self.in_modalities})
        fused = sum(widths[m][-1] for m in self.in_modalities)
        self.lstm = nn.LSTM(fused, lstm_size, batch_first=True)
        self.classifier = nn.Sequential(nn.BatchNorm1d(lstm_size), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(lstm_size, num_classes))

    def forward(self, q_image, q_audio):
        frames = []
        for modality, x in self.masked_parts(q_image, q_audio).items():
            x = subsample_features(x.transpose(1, 2), self.num_frames)  # (B, 16, D)
            frames.append(self.projections[modality](x))               # (B, 16, width)
        output, _ = self.lstm(torch.cat(frames, dim=2))                # (B, 16, lstm)
        return self.classifier(output[:, -1])



class ModelFeat(ModelBase):
    """CM-VQVAE on pre-extracted features: image (B, Ti, Fi), audio (B, Ta, Fa).

    Per modality and frame: MLP F -> D, VQ, MLP D -> F (reconstruction); then
    TaskSolverFeat (mask, per-frame projections, LSTM, fc). quantized_* are (B, D, T).

    The released Model_Feat has no encoder or decoder: it views the 65,536 raw
    values of a clip (16 x 4096 image, 64 x 1024 audio) as a 64 x 32 x 32 map, so
    its codes mix values of different frames, its mask gates blocks of frames
    rather than code channels, and its "reconstruction" is the quantized input
    itself. The per-frame encoder here gives D code channels per frame for any
    feature size, so the mask gates code channels as in Model.
    """

    def __init__(self, *, image_features, audio_features, embedding_dim, num_embeddings,
                 commitment_cost, decay, num_classes, hidden_size=128,
                 num_frames=FEATURE_FRAMES, **mask):
        super().__init__()
        sizes = {'image': image_features, 'audio': audio_features}
        self.encoders = nn.ModuleDict({m: _frame_mlp(sizes[m], hidden_size, embedding_dim)
                                       for m in MODALITIES})
        self.quantizers = nn.ModuleDict({m: make_quantizer(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim,
            commitment_cost=commitment_cost, decay=decay) for m in MODALITIES})
        self.decoders = nn.ModuleDict({m: _frame_mlp(embedding_dim, hidden_size, sizes[m])
                                       for m in MODALITIES})
        self.solver = TaskSolverFeat(embedding_dim=embedding_dim, num_frames=num_frames,
                                     num_classes=num_classes, **mask)

    def forward(self, image, audio):
        inputs = {'image': image, 'audio': audio}
        fields, losses = {}, []
        for m in MODALITIES:
            z = self.encoders[m](inputs[m]).transpose(1, 2)  # (B, D, T)
            vq = self.quantizers[m](z)
            losses.append(vq.loss)
            recon = self.decoders[m](vq.quantized.transpose(1, 2))  # (B, T, F)
            fields.update({f'quantized_{m}': vq.quantized, f'vq_loss_{m}': vq.loss,
                           f'perplexity_{m}': vq.perplexity, f'indices_{m}': vq.indices,
                           f'recon_{m}': recon})
        logits = self.solver(fields['quantized_image'], fields['quantized_audio'])
        return ModelOutput(logits=logits, vq_loss=sum(losses), **fields)


def _frame_mlp(in_features, hidden, out_features):
    """Per-frame MLP on (..., in_features) -> (..., out_features)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


def build_model_feat(cfg):
    """ModelFeat of cfg (base_type 0: masked, 2: unmasked); cfg as model.build_model's,
    plus image_features and audio_features (the feature sizes)."""
    check_choice('base_type', cfg['base_type'], (0, 2))
    return ModelFeat(image_features=cfg['image_features'], audio_features=cfg['audio_features'],
                     num_classes=cfg['num_classes'], masked=cfg['base_type'] == 0,
                     **{k: cfg[k] for k in (*MASK_KEYS, 'embedding_dim', 'num_embeddings',
                                            'commitment_cost', 'decay')})
