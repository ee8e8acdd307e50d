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

from cmvq import atomic  # noqa: E402


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


def plot_curves(run_dir, history, name='curves.png'):
    """curves.png: classification loss (train per iteration, val per epoch), val accuracy.
    A two-stage run also writes its VQ-VAE stage's total loss as curves_vae.png."""
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
    _save(fig, Path(run_dir) / name)


def plot_recon_perplexity(run_dir, history, recon_loss='mse'):
    """recon_perplexity.png: reconstruction error and codebook perplexity per modality.

    recon_loss: the run's setting ('mse' or 'mse/var'), which names the left y-axis."""
    train, val = history['train'], history['val']
    epochs = np.arange(1, len(history['epoch_seconds']) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    recon_unit = 'MSE / training variance' if recon_loss == 'mse/var' else 'MSE'
    for ax, base, title, ylabel in (
            (axes[0], 'recon_error', 'reconstruction error', recon_unit),
            (axes[1], 'perplexity', 'codebook perplexity', 'perplexity (codes in use)')):
        for k, name in ((1, 'image'), (2, 'audio')):
            key = f'{base}{k}'
            if key in train:
                smooth = _smooth(train[key], 10)
                ax.plot(_per_epoch(smooth, len(epochs)), smooth, label=f'train {name}')
            if key in val:
                ax.plot(epochs, val[key], 'o-', label=f'val {name}')
        ax.set(xlabel='epoch', ylabel=ylabel, title=title)
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
        # colour = modality, line style = kind; the four % add up to 100
        for key, style in (('shared1', 'o-C0'), ('private1', 'o--C0'), ('shared2', 's-C1'),
                           ('private2', 's--C1'), ('complementarity', '^:C7')):
            axes[0].plot(epochs, [m[key] for m in ratios], style, label=key)
        axes[0].set(xlabel='epoch', ylabel='% of all latent channels',
                    title='mask ratios (1 image, 2 audio)')
        axes[0].legend(fontsize=8)
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


def plot_reconstructions(run_dir, arrays, num=8):
    """reconstructions.png: original vs reconstructed face frames and log-mels of the
    first `num` items.

    arrays: {1: (images (N, 3, H, W), recon or None), 2: (specs (N, 1, F, T), recon or None)};
    RML_feat's feature sequences (N, T, F) draw as features x time maps.
    The top mel bands of CREMA-D-like audio hold no energy (the FLVs' MP3 encoder
    low-passes it: ~11 kHz at the twin's 64 kbit/s), so they sit at the log-mel's
    dB floor and would draw as a black band; only the bands below are drawn.
    """
    images, recon_images = arrays[1]
    specs, recon_specs = arrays[2]
    n = min(len(images), num)
    if specs.ndim == 3:  # feature sequences
        bands, names = None, ('image features', 'audio features')
    else:
        bands = audible_bands(specs[:n])
        names = ('frame', f'log-mel (the {specs.shape[2] - bands} silent top bands not drawn)')
    fig, axes = plt.subplots(4, n, figsize=(2 * n, 8), squeeze=False)
    rows = ((images, names[0]), (recon_images, 'recon'), (specs, names[1]),
            (recon_specs, 'recon'))
    for r, (data, title) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.axis('off')
            if data is None:
                continue
            if data.ndim == 3:  # (T, F) features: one column per time frame
                ax.imshow(data[i].T, origin='lower', aspect='auto', cmap='magma')
            elif data.shape[1] == 3:
                ax.imshow(np.clip(data[i].transpose(1, 2, 0), 0, 1))
            else:
                ax.imshow(data[i, 0, :bands], origin='lower', aspect='auto', cmap='magma',
                          vmin=specs[i].min(), vmax=specs[i].max())
            if i == 0:
                ax.set_title(title, fontsize=9, loc='left')
    _save(fig, Path(run_dir) / 'reconstructions.png')


def audible_bands(specs):
    """Number of low mel bands of specs (N, 1, F, T) that rise above each item's dB
    floor (its minimum) somewhere; the bands above are silent in every item."""
    floor = specs.min(axis=(1, 2, 3), keepdims=True)
    loud = (specs > floor + 1e-3).any(axis=(0, 1, 3))            # (F,)
    return int(np.flatnonzero(loud)[-1]) + 1 if loud.any() else specs.shape[2]


def plot_variants(path, rows, title):
    """One modality's reconstruction variants: a row per variant, a column per item.

    rows: {row title: array (N, C, H, W)}, the first row the originals (its value
    range scales every log-mel in its column). C == 3: RGB frames, C == 1: log-mels.
    """
    names = list(rows)
    originals = rows[names[0]]
    n = len(originals)
    fig, axes = plt.subplots(len(names), n, figsize=(1.8 * n, 1.9 * len(names)),
                             squeeze=False)
    for r, name in enumerate(names):
        for i in range(n):
            ax = axes[r, i]
            ax.axis('off')
            data = rows[name][i]
            if data.shape[0] == 3:
                ax.imshow(np.clip(data.transpose(1, 2, 0), 0, 1))
            else:
                ax.imshow(data[0], origin='lower', aspect='auto', cmap='magma',
                          vmin=originals[i].min(), vmax=originals[i].max())
            if i == 0:
                ax.set_title(name, fontsize=9, loc='left')
    fig.suptitle(title, fontsize=10)
    _save(fig, Path(path))


def plot_decodability(path, values, labels, columns, title):
    """Heatmap of decodability (rows labels, columns channel subsets); NaN = not scored.

    values: (len(labels), len(columns)) array of skill: (accuracy - chance) / (1 -
    chance) for classes, R^2 for continuous factors; 0 = chance, 1 = perfect.
    """
    values = np.asarray(values, float)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 3, 0.28 * len(labels) + 1.5))
    cmap = plt.get_cmap('viridis').copy()
    cmap.set_bad('lightgrey')  # NaN: an empty subset or a skipped label
    image = ax.imshow(np.ma.masked_invalid(np.clip(values, -0.2, 1)), cmap=cmap, vmin=-0.2,
                      vmax=1, aspect='auto')
    for i, j in np.ndindex(values.shape):
        text = '-' if np.isnan(values[i, j]) else f'{values[i, j]:.2f}'
        ax.text(j, i, text, ha='center', va='center', fontsize=7,
                color='black' if values[i, j] > 0.5 else 'white')
    ax.set(xticks=range(len(columns)), yticks=range(len(labels)), title=title)
    ax.set_xticklabels(columns, rotation=30, ha='right', fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    fig.colorbar(image, ax=ax, label='skill (0 chance, 1 perfect)')
    _save(fig, Path(path))


def plot_sweep(path, names, metrics):
    """A sweep's bar plot: per setting, the mean of each metric with +-sd error bars.

    metrics: {metric name: [(mean, sd) per setting]} with values in [0, 1].
    """
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(names))
    for i, (metric, values) in enumerate(metrics.items()):
        means = 100 * np.array([m for m, _ in values])
        sds = 100 * np.nan_to_num(np.array([s for _, s in values]))
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, means, width, yerr=sds, capsize=3,
               label=metric)
    ax.set_xticks(x, names, rotation=20, ha='right', fontsize=8)
    ax.set(ylabel='%', title='test metrics per setting (mean +- sd over seeds)')
    ax.legend()
    _save(fig, Path(path))


def plot_robustness(path, results):
    """robustness.png: test accuracy against corruption strength, one panel per kind,
    with the clean accuracy and the modality's removals as horizontal lines.

    results: robustness.json's list of {modality, corruption, level, accuracy}.
    """
    clean = next(r['accuracy'] for r in results if r['corruption'] == 'clean')
    graded = [(m, c) for m, c in dict.fromkeys((r['modality'], r['corruption'])
                                               for r in results if r['level'] is not None)]
    fig, axes = plt.subplots(1, len(graded), figsize=(4.5 * len(graded), 3.8), squeeze=False)
    for ax, (modality, corruption) in zip(axes[0], graded, strict=True):
        points = [(r['level'], r['accuracy']) for r in results
                  if (r['modality'], r['corruption']) == (modality, corruption)]
        ax.plot(*zip(*points, strict=True), 'o-', label=f'{modality} {corruption.split()[0]}')
        ax.axhline(clean, color='black', ls='-', lw=0.8, label='clean')
        for r in results:
            if r['modality'] == modality and r['level'] is None:
                ax.axhline(r['accuracy'], ls='--', lw=0.8, color='tab:red'
                           if 'zeros' in r['corruption'] else 'tab:purple',
                           label=f'{modality} {r["corruption"]}')
        if corruption.startswith('SNR'):
            ax.invert_xaxis()  # stronger noise to the right, as in the other panels
        ax.set(xlabel=f'{modality} {corruption}', ylabel='test accuracy', ylim=(0, 1.02))
        ax.legend(fontsize=7)
    _save(fig, Path(path))
