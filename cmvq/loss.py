"""The training loss of the released code, and its terms.

MSE(image recon) + MSE(audio recon) + classification + both VQ losses
(+ 1e-4 * sum(raw mask) when regularization). The released main.py reads the
training variances but leaves the division by them commented out: recon_loss='mse'
is that loss; 'mse/var' divides each reconstruction term by its training
variance, as the VQ-VAE notebook the code is based on does.
"""
import torch.nn.functional as F

import datasets

REGULARIZATION_WEIGHT = 1e-4
RECON_LOSSES = ('mse', 'mse/var')


def class_criterion(dataset):
    """The classification term the dataset selects: MSE between the logits and a
    teacher's logits (EmoVoxCeleb, as released), else cross-entropy on class indices."""
    return F.mse_loss if dataset in datasets.SOFT_LABELS else F.cross_entropy


def class_targets(labels, dataset):
    """(B,) class indices: the labels, or the arg-max of a teacher's logits (B, C)."""
    return labels.argmax(1) if dataset in datasets.SOFT_LABELS else labels


def compute_loss(out, image, audio, emotion, variances, model, regularization, recon_loss,
                 criterion=F.cross_entropy):
    """Total loss and its parts (floats for logging) from a ModelOutput.

    MSE(image recon) + MSE(audio recon) + criterion(logits, emotion) + VQ losses
    (+ 1e-4 * sum(raw mask) when regularization); with recon_loss 'mse/var' each
    MSE is divided by its training variance (variances = (image, audio)). Missing
    parts are skipped. criterion: class_criterion(dataset).
    """
    assert recon_loss in RECON_LOSSES, f'recon_loss={recon_loss!r}: one of {RECON_LOSSES}'
    scale = variances if recon_loss == 'mse/var' else (1.0, 1.0)
    parts = {}
    if out.recon_image is not None:
        parts['recon_error1'] = F.mse_loss(out.recon_image.float(), image) / scale[0]
    if out.recon_audio is not None:
        parts['recon_error2'] = F.mse_loss(out.recon_audio.float(), audio) / scale[1]
    if out.logits is not None:
        parts['class_error'] = criterion(out.logits.float(), emotion)
    if out.vq_loss is not None:
        parts['vq_loss'] = out.vq_loss.float()
    reg = model.mask_regularization() if regularization else None
    if reg is not None:
        parts['mask_regularization'] = REGULARIZATION_WEIGHT * reg
    loss = sum(parts.values())
    return loss, parts


def describe_loss(cfg):
    """The training loss of cfg in words, for the log."""
    recon = ('MSE(image recon) + MSE(audio recon)' if cfg['recon_loss'] == 'mse' else
             'MSE(image recon)/var1 + MSE(audio recon)/var2')
    reg = f' + {REGULARIZATION_WEIGHT:g} * sum(mask)' if cfg['regularization'] else ''
    task = ('MSE(logits, teacher logits)' if cfg['dataset'] in datasets.SOFT_LABELS
            else 'cross-entropy')
    return (f"Loss (recon_loss={cfg['recon_loss']!r}): {recon} + {task} + VQ losses"
            f"{reg}; terms a model does not produce are skipped")
