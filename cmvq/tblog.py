"""TensorBoard logging of a run (main.py's `tensorboard=True`): results/<run>/tb/.

    tensorboard --logdir results/20261121-101500/tb

Per epoch: the mean of every training quantity (train/...), every validation
quantity (val/...), the mask ratios (mask/...) and the raw mask values (a
histogram), and original vs reconstructed frames and log-mels of the first
validation items (recon/...).
"""
from pathlib import Path

import numpy as np
import torch


class TensorBoardLog:
    """An on_epoch hook for experiment.fit writing with torch's SummaryWriter."""

    def __init__(self, run_dir, val_loader, runtime, num=4):
        from torch.utils.tensorboard import SummaryWriter  # loads tensorboard (~1 s): on use
        self.writer = SummaryWriter(str(Path(run_dir) / 'tb'))
        self.runtime = runtime
        image, audio, *_ = next(iter(val_loader))
        self.batch = (image[:num], audio[:num])  # (n, 3, 128, 128), (n, 1, 256, 256)

    def __call__(self, epoch, train, val, model):
        for key, values in train.items():
            self.writer.add_scalar(f'train/{key}', float(np.mean(values)), epoch)
        for key, value in val.items():
            if isinstance(value, float):
                self.writer.add_scalar(f'val/{key}', value, epoch)
        for key, value in (val.get('mask') or {}).items():
            self.writer.add_scalar(f'mask/{key}', value, epoch)
        mask = model.get_mask()
        if mask is not None:
            self.writer.add_histogram('mask/raw', mask.detach().float().cpu().reshape(-1), epoch)
        self._reconstructions(epoch, model)
        self.writer.flush()

    @torch.no_grad()
    def _reconstructions(self, epoch, model):
        """Originals above reconstructions; log-mels scaled to [0, 1] per item."""
        was_training = model.training
        model.eval()
        image, audio, _ = self.runtime.to_device(self.batch)
        # a forked RNG: a 'randomizer' mask draw here must not shift training's draws
        devices = [self.runtime.device] if self.runtime.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices), self.runtime.autocast():
            out = model(image, audio)
        model.train(was_training)
        for name, original, recon in (('image', image, out.recon_image),
                                      ('audio', audio, out.recon_audio)):
            if recon is None:
                continue
            pair = torch.cat([original.float(), recon.float()]).cpu()
            if name == 'audio':
                low = pair.amin(dim=(1, 2, 3), keepdim=True)
                high = pair.amax(dim=(1, 2, 3), keepdim=True)
                pair = (pair - low) / (high - low).clamp_min(1e-6)
            self.writer.add_images(f'recon/{name}', pair.clamp(0, 1), epoch)

    def close(self):
        self.writer.close()
