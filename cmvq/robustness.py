"""Robustness of a saved run to a missing or corrupted modality.

    python3 main.py --timestamp=20261121-101500 --robustness=True

Tests the run's best checkpoint on its test split, clean and under each condition:
  image removed: all zeros, or the training split's mean face crop
  audio removed: all zeros, or the training split's mean log-mel
  image: Gaussian noise of sd IMAGE_NOISE (pixels in [0, 1], clipped), and Gaussian
         blur of sd IMAGE_BLUR pixels
  audio: white Gaussian noise added to the waveform before the log-mel at the SNRs
         AUDIO_SNR_DB (so every clip is decoded again: the cache holds log-mels)
Every draw comes from a generator seeded by (run seed, condition, clip index), so
the result is the same on every call. Writes robustness.json (accuracy and macro-F1
per condition) and robustness.png (accuracy against strength per modality) into the
run folder and appends the table to its log. main.py's machine settings apply.
"""
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

import datasets
from cmvq import plots
from cmvq.configurator import ConfigError
from cmvq.loaders import make_datasets, make_loader, train_variances
from cmvq.runs import load_model, logged, save_json
from cmvq.runtime import Runtime, seed_everything
from cmvq.train import evaluate

IMAGE_NOISE = (0.05, 0.1, 0.2, 0.4)   # sd of additive Gaussian pixel noise, pixels in [0, 1]
IMAGE_BLUR = (1.0, 2.0, 4.0)          # sd in pixels of the Gaussian blur (128x128 crops)
AUDIO_SNR_DB = (20, 10, 0)            # SNR of white noise added to the waveform


def conditions():
    """(modality, corruption, level) of every condition; level None: removal."""
    return ([('none', 'clean', None)]
            + [(m, f'removed ({fill})', None) for m in ('image', 'audio')
               for fill in ('zeros', 'train mean')]
            + [('image', 'noise sd', s) for s in IMAGE_NOISE]
            + [('image', 'blur sd px', s) for s in IMAGE_BLUR]
            + [('audio', 'SNR dB', s) for s in AUDIO_SNR_DB])


class Corrupted(Dataset):
    """A CREMADDataset in evaluation mode with one condition applied to every item.

    Items are the base dataset's (image (3, 128, 128), spectrogram (1, 256, 256),
    labels...), the corrupted modality replaced. means: {'image', 'audio'} tensors
    of the items' shapes (the training split's means), needed for 'train mean'.
    """

    def __init__(self, base, condition, seed, means=None):
        self.base, self.condition, self.means = base, condition, means
        modality, corruption, level = condition
        # one stream per (seed, condition): a stable hash, not Python's salted hash()
        self.key = (seed, zlib.crc32(f'{modality}/{corruption}/{level}'.encode()))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, audio, *labels = self.base[i]
        modality, corruption, level = self.condition
        if corruption == 'removed (zeros)':
            image, audio = _replace(modality, image, audio, torch.zeros_like)
        elif corruption == 'removed (train mean)':
            image, audio = _replace(modality, image, audio, lambda x: self.means[modality])
        elif corruption == 'noise sd':
            noise = torch.from_numpy(self._rng(i).standard_normal(image.shape, np.float32))
            image = (image + level * noise).clamp_(0, 1)
        elif corruption == 'blur sd px':
            # here, not on top: importing torchvision costs every main.py run a second
            import torchvision.transforms.functional as TF
            size = 2 * int(np.ceil(3 * level)) + 1  # +-3 sd
            image = TF.gaussian_blur(image, [size, size], [level, level])
        elif corruption == 'SNR dB':
            audio = self._noisy_spectrogram(i, level)
        return (image, audio, *labels)

    def _rng(self, i):
        return np.random.default_rng((*self.key, i))

    def _noisy_spectrogram(self, i, snr_db):
        """Decode clip i again, add white noise to its mono waveform at snr_db, log-mel."""
        rng = self._rng(i)

        def add_noise(wave, rate):
            power = float(np.mean(wave.astype(np.float64) ** 2))
            sd = np.sqrt(power / 10 ** (snr_db / 10))
            return (wave + sd * rng.standard_normal(wave.shape)).astype(np.float32)
        _, spec = datasets.decode_clip(self.base.paths[i], self.base.frame_jitter,
                                       self.base.backend, offsets=[0],
                                       audio_transform=add_noise)
        return datasets.to_spectrogram(spec)


def _replace(modality, image, audio, fill):
    return (fill(image), audio) if modality == 'image' else (image, fill(audio))


def train_means(cfg, runtime):
    """The training split's mean face crop (3, 128, 128) and log-mel (1, 256, 256),
    over centre frames (the evaluation's frames)."""
    data = make_datasets({**cfg, 'data_on_gpu': False}, splits=('train',))['train']
    data.train = False  # centre frames
    loader = make_loader(data, {**cfg, 'data_on_gpu': False}, runtime, train=False)
    sums, n = None, 0
    for image, audio, *_ in loader:
        batch = (image.double().sum(0), audio.double().sum(0))
        sums = batch if sums is None else (sums[0] + batch[0], sums[1] + batch[1])
        n += len(image)
    return {'image': (sums[0] / n).float(), 'audio': (sums[1] / n).float()}


@logged
def evaluate_robustness(cfg, run_dir, log):
    """Test the saved model under every condition; write robustness.json/.png."""
    if cfg['dataset'] != 'CREMA-D':
        raise ConfigError(f"robustness evaluation is for CREMA-D runs; this run was trained "
                          f"on {cfg['dataset']!r}")
    cfg = {**cfg, 'data_on_gpu': False}  # corrupted items go through a DataLoader
    seed_everything(cfg['seed'])
    runtime = Runtime(cfg)
    test = make_datasets(cfg, splits=('test',))['test']
    net, epoch = load_model(cfg, run_dir, runtime)
    variances = train_variances(cfg)
    means = train_means(cfg, runtime)
    log(f'Robustness of the checkpoint of epoch {epoch} on {len(test)} test clips')
    results = []
    for condition in conditions():
        loader = make_loader(Corrupted(test, condition, cfg['seed'], means), cfg, runtime,
                                train=False)
        metrics = evaluate(net, loader, runtime, variances, cfg,
                              desc=' '.join(map(str, condition)))
        modality, corruption, level = condition
        results.append({'modality': modality, 'corruption': corruption, 'level': level,
                        'accuracy': metrics['accuracy'], 'macro_f1': metrics['macro_f1']})
        log(f'  {modality:5s} {corruption:20s} {"" if level is None else level!s:>5s}: '
            f'accuracy {100 * metrics["accuracy"]:.2f}%, '
            f'macro-F1 {100 * metrics["macro_f1"]:.2f}%')
    out = {'epoch': epoch, 'num_samples': len(test), 'seed': cfg['seed'], 'results': results}
    save_json(run_dir / 'robustness.json', out)
    plots.plot_robustness(run_dir / 'robustness.png', results)
    log(f'Wrote {run_dir / "robustness.json"} and robustness.png')
    return out
