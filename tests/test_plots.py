"""The run's figures: what each draws (checked on the matplotlib figure before saving)."""
import numpy as np
import pytest

from cmvq import plots


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """Figures the plot functions make, by file name, instead of PNGs."""
    made = {}

    def keep(fig, path):
        made[path.name] = fig
    monkeypatch.setattr(plots, '_save', keep)
    return made


def arrays(n=10, silent_from=200):
    """Batch-like originals and reconstructions; log-mel bands >= silent_from at the floor."""
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 128, 128), dtype=np.float32)
    specs = np.full((n, 1, 256, 256), -80.0, np.float32)
    specs[:, :, :silent_from] = rng.uniform(-60, 0, (n, 1, silent_from, 256))
    return {1: (images, images * 0.9), 2: (specs, specs + 1.0)}


def test_reconstructions_show_eight_items_without_the_silent_bands(figures, tmp_path):
    plots.plot_reconstructions(tmp_path, arrays())
    fig = figures['reconstructions.png']
    assert len(fig.axes) == 4 * 8
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert all(im.shape[:2] == (128, 128) for im in images[:16])      # frames, recon frames
    assert all(im.shape == (200, 256) for im in images[16:])          # log-mels: 200 bands
    assert all(im.min() > -80 for im in images[16:24])                # no floor rows drawn


def test_audible_bands():
    assert plots.audible_bands(arrays(n=2, silent_from=217)[2][0]) == 217
    assert plots.audible_bands(arrays(n=2, silent_from=256)[2][0]) == 256


def test_recon_perplexity_axes_are_labelled(figures, tmp_path):
    history = {'epoch_seconds': [1.0, 1.0],
               'train': {f'{q}{k}': [1.0, 0.5, 0.4, 0.3] for q in ('recon_error', 'perplexity')
                         for k in (1, 2)},
               'val': {f'{q}{k}': [0.5, 0.3] for q in ('recon_error', 'perplexity')
                       for k in (1, 2)}}
    plots.plot_recon_perplexity(tmp_path, history, 'mse/var')
    left, right = figures['recon_perplexity.png'].axes
    assert left.get_ylabel() == 'MSE / training variance'
    assert right.get_ylabel().startswith('perplexity')
    plots.plot_recon_perplexity(tmp_path, history)
    assert figures['recon_perplexity.png'].axes[0].get_ylabel() == 'MSE'


def test_mask_plot_draws_private_and_shared_ratios(figures, tmp_path):
    ratios = {'private1': 30.0, 'shared1': 20.0, 'private2': 25.0, 'shared2': 25.0,
              'complementarity': 80.0}
    plots.plot_mask(tmp_path, [ratios, ratios], np.linspace(-1, 1, 16), 8, 5e-3)
    history_axes = figures['mask.png'].axes[0]
    labels = [line.get_label() for line in history_axes.lines]
    assert set(labels) == set(ratios)
    assert [list(line.get_ydata()) for line in history_axes.lines
            if line.get_label() == 'private2'] == [[25.0, 25.0]]
