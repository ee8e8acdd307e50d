"""Checkpoints of the released CM-VQVAE code: cmvq.released.load_released reproduces the
released outputs, and convert_released.py turns a released run folder into one
that main.py --timestamp evaluates."""
import json

import pytest
import torch

from tools import convert_released
import model as M
from cmvq.released import load_released
from conftest import PAPER

FIXTURES = ('model_ema', 'model_plain', 'baseline2')
OUTPUTS = ('logits', 'recon_image', 'recon_audio', 'vq_loss_image', 'vq_loss_audio',
           'perplexity_image', 'perplexity_audio')


@pytest.fixture(scope='module')
def orig(shared):
    """../shared/cm-vqvae-orig: checkpoints saved by the released code."""
    return shared / 'cm-vqvae-orig'


def released(orig, name):
    """(project model built from the fixture's config, released state dict, io dict)."""
    info = json.loads((orig / 'index.json').read_text())[name]
    net = M.build_model({**info['config'], 'num_classes': 6})
    state = torch.load(orig / f'{name}.pt', map_location='cpu')
    assert list(state) == info['state_dict_keys']
    return net, state, torch.load(orig / f'{name}.io.pt', map_location='cpu')


@pytest.mark.parametrize('name', FIXTURES)
def test_released_checkpoints_reproduce_the_released_outputs(orig, name):
    net, state, io = released(orig, name)
    load_released(net, state)
    with torch.no_grad():
        out = net.eval()(io['image'], io['audio'])
    for key in OUTPUTS:
        torch.testing.assert_close(getattr(out, key), io[key], rtol=1e-5, atol=1e-5,
                                   msg=f'{name}: {key}')
    info = json.loads((orig / 'index.json').read_text())[name]
    if net.mask_ratios() is not None:  # released order: private1, private2, shared1, shared2
        r = net.mask_ratios()
        assert [r['private1'], r['private2'], r['shared1'], r['shared2']] == \
            pytest.approx(info['mask_ratios'][:4])


def test_released_ema_state_lands_in_the_buffers(orig):
    net, state, _ = released(orig, 'model_ema')
    load_released(net, state)
    vq = net.backbone.quantizers['audio']
    assert torch.equal(vq.ema_w, state['_vq_vae_audio._ema_w'])
    assert torch.equal(vq.codebook, state['_vq_vae_audio._embedding.weight'])
    assert torch.equal(net.get_mask(), state['_classifier.private_shared_mask'].reshape(-1))


def test_missing_unknown_and_misshaped_keys_are_named(orig):
    net, state, _ = released(orig, 'model_plain')
    with pytest.raises(ValueError, match="lacks '_classifier.private_shared_mask'"):
        load_released(net, {k: v for k, v in state.items() if 'private_shared' not in k})
    with pytest.raises(ValueError, match="unknown key '_extra.weight'"):
        load_released(net, {**state, '_extra.weight': torch.zeros(1)})
    wide = M.build_model({**PAPER, 'num_residual_layers': 1, 'num_embeddings': 64,
                          'num_residual_hiddens': 16, 'decay': 0.0})
    with pytest.raises(ValueError, match=r"'_vq_vae_image._embedding.weight' has shape "
                                         r"\(32, 64\), Model expects \(64, 64\)"):
        load_released(wide, state)


def test_unused_released_modules_of_base_type_1_are_skipped(orig):
    # The released base_type 1 builds the quantizers and decoders it never runs.
    _, state, _ = released(orig, 'baseline2')
    info = json.loads((orig / 'index.json').read_text())['baseline2']
    net = M.build_model({**info['config'], 'base_type': 1, 'num_classes': 6})
    load_released(net, state)
    assert torch.equal(net.backbone.pre_vq['audio'].weight, state['_pre_vq_conv_audio.weight'])


def released_log(config, drop=()):
    """A log.txt in the released main.py's format (CONFIG block as it writes it)."""
    labels = {v: k for k, v in convert_released.CONFIG_LABELS.items()}
    values = {**config, 'dataset': 'CREMAD', 'pretrained': False, 'num_epoch': 2,
              'batch_size': 4, 'learning_rate': 0.001, 'regularization': True}
    lines = ['Proposed method, a released-format fixture', '', 'Model saved in epoch 2:',
             'CONFIG:']
    lines += [f'- {labels[k]}: {v}' for k, v in values.items()
              if k in labels and k not in drop and k != 'data_path']
    return '\n'.join(lines + ['*** INITIAL PRIVATE SHARED SPACE ***', ''])


@pytest.fixture(scope='module')
def released_run(twin, orig, tmp_path_factory):
    """A released run folder (model_ema's weights) and split configs of the tiny twin."""
    from cmvq import cremad
    path = tmp_path_factory.mktemp('released')
    cremad.build_splits(twin, path / 'data', seed=0, workers=2, cache=False,
                             progress=False)
    src = path / 'orig' / '20230315-015820'
    src.mkdir(parents=True)
    (src / 'model.pt').write_bytes((orig / 'model_ema.pt').read_bytes())
    info = json.loads((orig / 'index.json').read_text())['model_ema']
    (src / 'log.txt').write_text(released_log(info['config']))
    return path, src, info


def test_a_converted_released_run_evaluates_deterministically(released_run):
    import main
    path, src, _ = released_run
    run_dir = convert_released.run([f'--src={src}', f'--results_dir={path / "results"}',
                                    f'--data_path={path / "data"}'])
    assert run_dir.name == src.name
    cfg = json.loads((run_dir / 'config.json').read_text())
    assert cfg['dataset'] == 'CREMA-D' and cfg['num_residual_hiddens'] == 16
    assert cfg['recon_loss'] == 'mse' and cfg['decay'] == 0.99
    args = [f'--results_dir={path / "results"}', f'--timestamp={run_dir.name}',
            '--num_workers=0', '--cache=False']
    first, second = main.main(args), main.main(args)
    assert first['num_samples'] > 0
    for key in ('accuracy', 'macro_f1', 'confusion_matrix', 'mask'):
        assert first[key] == second[key]
    assert first['class_error'] == second['class_error']


def test_conversion_checks_before_writing(released_run, tmp_path):
    from cmvq.errors import BadValueError, ExistsError
    path, src, info = released_run
    old = tmp_path / '20230101-000000'
    old.mkdir()
    (old / 'model.pt').write_bytes((src / 'model.pt').read_bytes())
    (old / 'log.txt').write_text(released_log(info['config'], drop=('mode', 'base_type')))
    out = tmp_path / 'results'
    with pytest.raises(BadValueError, match='lacks mode, base_type .* --mode=... --base_type='):
        convert_released.convert(old, out)
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown key '_classifier.private_shared_mask'"):
        convert_released.convert(old, out, mode='multimodal', base_type=2)  # wrong model
    assert not out.exists()
    convert_released.convert(old, out, mode='multimodal', base_type=0)
    with pytest.raises(ExistsError, match='exists'):
        convert_released.convert(old, out, mode='multimodal', base_type=0)
