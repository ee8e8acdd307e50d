"""Checkpoints of the released CM-VQVAE code: model.load_released reproduces the
released outputs, and convert_released.py turns a released run folder into one
that main.py --timestamp evaluates."""
import json

import pytest
import torch

import model as M
from conftest import SHARED

ORIG = SHARED / 'cm-vqvae-orig'
FIXTURES = ('model_ema', 'model_plain', 'baseline2')
OUTPUTS = ('logits', 'recon_image', 'recon_audio', 'vq_loss_image', 'vq_loss_audio',
           'perplexity_image', 'perplexity_audio')


def released(name):
    """(project model built from the fixture's config, released state dict, io dict)."""
    info = json.loads((ORIG / 'index.json').read_text())[name]
    net = M.build_model({**info['config'], 'num_classes': 6})
    state = torch.load(ORIG / f'{name}.pt', map_location='cpu')
    assert list(state) == info['state_dict_keys']
    return net, state, torch.load(ORIG / f'{name}.io.pt', map_location='cpu')


@pytest.mark.parametrize('name', FIXTURES)
def test_released_checkpoints_reproduce_the_released_outputs(name):
    net, state, io = released(name)
    M.load_released(net, state)
    with torch.no_grad():
        out = net.eval()(io['image'], io['audio'])
    for key in OUTPUTS:
        torch.testing.assert_close(getattr(out, key), io[key], rtol=1e-5, atol=1e-5,
                                   msg=f'{name}: {key}')
    info = json.loads((ORIG / 'index.json').read_text())[name]
    if net.mask_ratios() is not None:  # released order: private1, private2, shared1, shared2
        r = net.mask_ratios()
        assert [r['private1'], r['private2'], r['shared1'], r['shared2']] == \
            pytest.approx(info['mask_ratios'][:4])


def test_released_ema_state_lands_in_the_buffers():
    net, state, _ = released('model_ema')
    M.load_released(net, state)
    vq = net.backbone.quantizers['audio']
    assert torch.equal(vq.ema_w, state['_vq_vae_audio._ema_w'])
    assert torch.equal(vq.codebook, state['_vq_vae_audio._embedding.weight'])
    assert torch.equal(net.get_mask(), state['_classifier.private_shared_mask'].reshape(-1))


def test_missing_unknown_and_misshaped_keys_are_named():
    net, state, _ = released('model_plain')
    with pytest.raises(ValueError, match="lacks '_classifier.private_shared_mask'"):
        M.load_released(net, {k: v for k, v in state.items() if 'private_shared' not in k})
    with pytest.raises(ValueError, match="unknown key '_extra.weight'"):
        M.load_released(net, {**state, '_extra.weight': torch.zeros(1)})
    wide = M.build_model({**M.PAPER_CONFIG, 'num_residual_layers': 1, 'num_embeddings': 64,
                          'num_residual_hiddens': 16, 'decay': 0.0})
    with pytest.raises(ValueError, match=r"'_vq_vae_image._embedding.weight' has shape "
                                         r"\(32, 64\), Model expects \(64, 64\)"):
        M.load_released(wide, state)


def test_unused_released_modules_of_base_type_1_are_skipped():
    # The released base_type 1 builds the quantizers and decoders it never runs.
    _, state, _ = released('baseline2')
    info = json.loads((ORIG / 'index.json').read_text())['baseline2']
    net = M.build_model({**info['config'], 'base_type': 1, 'num_classes': 6})
    M.load_released(net, state)
    assert torch.equal(net.backbone.pre_vq['audio'].weight, state['_pre_vq_conv_audio.weight'])
