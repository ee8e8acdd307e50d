"""One training step of the released code, reproduced: the forward in train mode (dropout
draws included), the released loss and its terms, every parameter's gradient and every
state entry the forward itself changes (BatchNorm statistics, EMA state, codebooks).

The fixtures in ../shared/cm-vqvae-orig/train_step_*.pt were made by the released
model.py on CPU in float32 (its README says how). Tolerances, float32 on CPU:
- loss and its terms, logits, perplexities: rtol 1e-6 (the project sums the two VQ
  terms before adding them, the released code adds them one by one);
- gradients and changed state: max |ours - released| <= 1e-5 * max(1, max |released|)
  per tensor (the EMA code sums are accumulated in another order: index_add instead of
  a one-hot matmul, ~1e-6 relative).
"""
import json

import pytest
import torch

import model as M
from cmvq.released import load_released, released_names
from cmvq.loss import compute_loss

STEPS = ('model_ema', 'model_plain', 'baseline2', 'model_threshold')


def close(ours, theirs, what, rtol=1e-5):
    """max |ours - theirs| within rtol of the reference's scale (at least 1)."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, f'{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}'
    error = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, theirs.abs().max().item() if theirs.numel() else 0.0)
    assert error <= rtol * scale, f'{what}: max error {error:.3g} (scale {scale:.3g})'


@pytest.fixture(scope='module')
def index(shared):
    return json.loads((shared / 'cm-vqvae-orig' / 'index.json').read_text())['train_step']


@pytest.mark.parametrize('name', STEPS)
def test_one_training_step_matches_the_released_code(name, index, shared):
    info = index[name]
    step = torch.load(shared / 'cm-vqvae-orig' / info['file'], map_location='cpu',
                      weights_only=True)
    net = M.build_model({**info['config'], 'num_classes': 6})
    load_released(net, step['state_before'])
    released = released_names(net)  # project key -> released key
    net.train()
    torch.manual_seed(step['forward_seed'])  # the two dropout draws of the TaskSolver
    out = net(step['image'], step['audio'])
    loss, parts = compute_loss(out, step['image'], step['audio'], step['labels'], (1.0, 1.0),
                               net, regularization=True, recon_loss='mse')
    loss.backward()

    ours = {'recon_image': parts['recon_error1'], 'recon_audio': parts['recon_error2'],
            'class': parts['class_error'], 'vq_image': out.vq_loss_image,
            'vq_audio': out.vq_loss_audio,
            'mask_regularization': parts.get('mask_regularization', torch.tensor(0.0))}
    assert set(ours) == set(step['loss_terms'])
    for key, value in step['loss_terms'].items():
        torch.testing.assert_close(ours[key].detach(), value, rtol=1e-6, atol=1e-9,
                                   msg=f'{name}: loss term {key}')
    torch.testing.assert_close(loss.detach(), step['loss'], rtol=1e-6, atol=0)
    for key in ('logits', 'perplexity_image', 'perplexity_audio'):
        torch.testing.assert_close(getattr(out, key).detach(), step[key], rtol=1e-6,
                                   atol=1e-7, msg=f'{name}: {key}')

    grads = {released[k]: p.grad for k, p in net.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(step['grads']), f'{name}: parameters with a gradient'
    for key, grad in step['grads'].items():
        close(grads[key], grad, f'{name}: gradient of {key}')

    state = {released[k]: v for k, v in net.state_dict().items()}
    assert step['changed_by_forward'], name
    for key, value in step['changed_by_forward'].items():
        close(state[key], value, f'{name}: {key} after the forward')
