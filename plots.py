"""PNG figures of a run: curves, reconstruction/perplexity, mask, confusion, samples.

Every function takes the run folder and plain Python/numpy data (what the run's
pickles and history.json hold), so figures can be redrawn from a finished run.
"""
import io
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import atomic  # noqa: E402


def _save(fig, path):
    """Render to memory, then write atomically: a crash never leaves half a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def _smooth(values, width):
    values = np.asarray(values, float)
    if len(values) < width or width < 2:
        return values
    return np.convolve(values, np.ones(width) / width, mode='valid')


def _per_epoch(values, num_epochs):
    """x positions in epochs for a per-iteration list."""
    return np.linspace(0, num_epochs, len(values), endpoint=False) + num_epochs / max(
        len(values), 1)


def plot_curves(run_dir, history):
    """curves.png: classification loss (train per iteration, val per epoch), val accuracy."""
    val, train = history['val'], history['train']
    epochs = np.arange(1, len(history['epoch_seconds']) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (('class_error', 'classification loss'), ('loss', 'total loss')):
        if key in train:
            smooth = _smooth(train[key], 10)
            axes[0].plot(_per_epoch(smooth, len(epochs)), smooth, label=f'train {label}')
        if key in val:
            axes[0].plot(epochs, val[key], 'o-', label=f'val {label}')
    axes[0].set(xlabel='epoch', ylabel='loss', title='losses', yscale='log')
    axes[0].legend()
    if 'accuracy' in val:
        axes[1].plot(epochs, 100 * np.asarray(val['accuracy']), 'o-', label='val accuracy')
        axes[1].axhline(100 / 6, color='grey', ls='--', label='chance')
        axes[1].set(xlabel='epoch', ylabel='%', title='validation accuracy')
        axes[1].legend()
    _save(fig, Path(run_dir) / 'curves.png')


def plot_recon_perplexity(run_dir, history):
    """recon_perplexity.png: reconstruction error and codebook perplexity per modality."""
    train, val = history['train'], history['val']
    epochs = np.arange(1, len(history['epoch_seconds']) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, base, title in ((axes[0], 'recon_error', 'reconstruction error (MSE / var)'),
                            (axes[1], 'perplexity', 'codebook perplexity')):
        for k, name in ((1, 'image'), (2, 'audio')):
            key = f'{base}{k}'
            if key in train:
                smooth = _smooth(train[key], 10)
                ax.plot(_per_epoch(smooth, len(epochs)), smooth, label=f'train {name}')
            if key in val:
                ax.plot(epochs, val[key], 'o-', label=f'val {name}')
        ax.set(xlabel='epoch', title=title)
        if ax.lines:
            ax.legend()
    axes[0].set_yscale('log') if axes[0].lines else None
    _save(fig, Path(run_dir) / 'recon_perplexity.png')


def plot_mask(run_dir, mask_history, raw_mask, embedding_dim, threshold=None):
    """mask.png: private/shared ratios over epochs and the final raw mask values
    (with the binarizer's threshold: channels above it are kept, i.e. shared)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ratios = [m for m in mask_history if m]
    if ratios:
        epochs = np.arange(1, len(ratios) + 1)
        for key in ('shared1', 'shared2', 'complementarity'):
            axes[0].plot(epochs, [m[key] for m in ratios], 'o-', label=key)
        axes[0].set(xlabel='epoch', ylabel='%', title='mask ratios (1 image, 2 audio)')
        axes[0].legend()
    if raw_mask is not None:
        raw = np.asarray(raw_mask).reshape(-1)
        colours = ['tab:blue'] * embedding_dim + ['tab:orange'] * (len(raw) - embedding_dim)
        axes[1].bar(np.arange(len(raw)), raw, color=colours)
        if threshold is not None:
            axes[1].axhline(threshold, color='grey', ls='--', label=f'threshold {threshold:g}')
            axes[1].legend()
        axes[1].set(xlabel='latent channel (blue image, orange audio)', ylabel='raw mask',
                    title='learned mask')
    _save(fig, Path(run_dir) / 'mask.png')


def plot_confusion(run_dir, confusion, names, name='confusion_matrix.png'):
    """Confusion matrix (rows truth, columns prediction), counts and row %."""
    cm = np.asarray(confusion)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, f'{cm[i, j]}\n{100 * rates[i, j]:.0f}%', ha='center', va='center',
                fontsize=8, color='white' if rates[i, j] > 0.5 else 'black')
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names,
           yticklabels=names, xlabel='predicted', ylabel='true', title='test confusion')
    _save(fig, Path(run_dir) / name)


def plot_reconstructions(run_dir, arrays):
    """reconstructions.png: original vs reconstructed face frames and log-mels.

    arrays: {1: (images (N, 3, H, W), recon or None), 2: (specs (N, 1, F, T), recon or None)}
    """
    images, recon_images = arrays[1]
    specs, recon_specs = arrays[2]
    n = min(len(images), 6)
    fig, axes = plt.subplots(4, n, figsize=(2 * n, 8), squeeze=False)
    rows = ((images, 'frame'), (recon_images, 'recon frame'),
            (specs, 'log-mel'), (recon_specs, 'recon log-mel'))
    for r, (data, title) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.axis('off')
            if data is None:
                continue
            if data.shape[1] == 3:
                ax.imshow(np.clip(data[i].transpose(1, 2, 0), 0, 1))
            else:
                ax.imshow(data[i, 0], origin='lower', aspect='auto', cmap='magma',
                          vmin=specs[i].min(), vmax=specs[i].max())
            if i == 0:
                ax.set_title(title, fontsize=9, loc='left')
    _save(fig, Path(run_dir) / 'reconstructions.png')
