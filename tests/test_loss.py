"""compute_loss: the terms it sums, for both recon_loss options."""
import pytest
import torch
import torch.nn.functional as F

from cmvq.loaders import make_loader

from cmvq.loss import compute_loss

from cmvq.runtime import Runtime
import model as models

VARIANCES = (0.02, 400.0)  # image pixels, log-mel dB: far from 1, so a division shows


class _Masked:
    """Stands in for a model: only mask_regularization is asked for."""

    def __init__(self, mask):
        self.mask = mask

    def mask_regularization(self):
        return None if self.mask is None else self.mask.sum()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image, audio = torch.rand(2, 3, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    out = models.ModelOutput(
        logits=torch.randn(2, 6, generator=g), vq_loss=torch.tensor(0.7),
        recon_image=torch.rand(2, 3, 8, 8, generator=g),
        recon_audio=torch.randn(2, 1, 8, 8, generator=g))
    return out, image, audio, torch.tensor([1, 4])


@pytest.mark.parametrize('recon_loss', ['mse', 'mse/var'])
@pytest.mark.parametrize('regularization', [True, False])
def test_compute_loss_sums_the_released_terms(recon_loss, regularization):
    out, image, audio, emotion = _batch()
    mask = torch.full((8, 1, 1), 0.01)
    loss, parts = compute_loss(out, image, audio, emotion, VARIANCES, _Masked(mask),
                                  regularization, recon_loss)
    scale = VARIANCES if recon_loss == 'mse/var' else (1.0, 1.0)
    expected = {
        'recon_error1': F.mse_loss(out.recon_image, image) / scale[0],
        'recon_error2': F.mse_loss(out.recon_audio, audio) / scale[1],
        'class_error': F.cross_entropy(out.logits, emotion),
        'vq_loss': torch.tensor(0.7)}
    if regularization:
        expected['mask_regularization'] = torch.tensor(1e-4 * 8 * 0.01)
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key], value, msg=key)
    torch.testing.assert_close(loss, sum(expected.values()))


def test_default_loss_is_plain_mse():
    import main
    assert main.recon_loss == 'mse'
    out, image, audio, emotion = _batch(1)
    _, parts = compute_loss(out, image, audio, emotion, VARIANCES, _Masked(None), True,
                               'mse')
    torch.testing.assert_close(parts['recon_error1'], F.mse_loss(out.recon_image, image))
    assert 'mask_regularization' not in parts  # no mask: nothing to regularize


def test_missing_outputs_are_skipped_and_bad_option_rejected():
    _, image, audio, emotion = _batch()
    logits = torch.zeros(2, 6)
    loss, parts = compute_loss(models.ModelOutput(logits=logits), image, audio, emotion,
                                  VARIANCES, _Masked(None), True, 'mse')
    assert set(parts) == {'class_error'}
    torch.testing.assert_close(loss, torch.log(torch.tensor(6.0)))
    with pytest.raises(AssertionError, match="recon_loss='var'"):
        compute_loss(models.ModelOutput(logits=logits), image, audio, emotion,
                        VARIANCES, _Masked(None), True, 'var')


class _Items:
    """A dataset of n items; keys may be (epoch, index) as EpochSampler yields them."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return torch.zeros(1)


@pytest.mark.parametrize(('n', 'sizes'), [(34, [16, 16, 2]), (33, [16, 16]), (16, [16]),
                                          (5, [5])])
def test_training_loader_keeps_the_last_partial_batch_unless_it_has_one_item(n, sizes):
    import main
    cfg = {**main.header(), 'batch_size': 16, 'num_workers': 0, 'data_on_gpu': False}
    runtime = Runtime({**cfg, 'device': 'cpu'})
    loader = make_loader(_Items(n), cfg, runtime, train=True)
    assert [len(b) for b in loader] == sizes
    evaluation = make_loader(_Items(33), cfg, runtime, train=False)
    assert [len(b) for b in evaluation] == [16, 16, 1]
