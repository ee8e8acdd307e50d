"""probe.py: reconstruction variants, mix pairing, linear probes with a known answer,
errors, determinism, and one end-to-end probe of a tiny trained run."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
import model as models
from tools import probe
from conftest import PAPER, REPO, tool_args
from cmvq.errors import UserError

TINY = {**PAPER, 'num_hiddens': 8, 'num_residual_hiddens': 4,
        'embedding_dim': 4, 'num_embeddings': 8}
PROBE_CFG = {'embedding_dim': 4, 'probe_C': 1.0, 'probe_alpha': 1.0, 'probe_seed': 0,
             'bootstrap': 200}


class CPU:
    """The Runtime a test needs: no autocast, tensors stay put."""
    device = torch.device('cpu')

    @staticmethod
    def autocast():
        return torch.autocast('cpu', enabled=False)


# ----------------------------------------------------------------------------- variants

@pytest.fixture(scope='module')
def tiny_probe():
    torch.manual_seed(0)
    net = models.build_probe(TINY).eval()
    shared = torch.tensor([1., 0., 1., 0., 0., 1., 1., 0.])  # image 0, 2; audio 1, 2
    return net, shared


def test_every_variant_decodes_both_modalities(tiny_probe):
    net, shared = tiny_probe
    image, audio = torch.rand(3, 3, 128, 128), torch.randn(3, 1, 256, 256)
    rows = probe.decoders_of(PROBE_CFG, net, {'shared': net.backbone})
    recon = probe.decode_rows(rows, net.backbone, shared, image, audio, CPU)
    assert list(recon) == [*probe.VARIANTS.values(), 'shared only, tuned decoders']
    for recon_image, recon_audio in recon.values():
        assert recon_image.shape == (3, 3, 128, 128)
        assert recon_audio.shape == (3, 1, 256, 256)


def test_mixed_codes_pair_sample_i_with_sample_i_minus_1(tiny_probe):
    """Channel c of sample i: its own where shared, sample i-1's where private
    (sample 0 takes the last sample's)."""
    _, shared = tiny_probe
    codes = torch.arange(4.).reshape(4, 1, 1, 1).expand(4, 4, 2, 2)  # value = sample index
    masker = models.Masker(embedding_dim=4, keep='mix')
    q_image, q_audio = masker(codes, codes + 10, shared)
    for i in range(4):
        for c, keep in enumerate(shared[:4]):
            assert q_image[i, c, 0, 0] == (i if keep else (i - 1) % 4)
        for c, keep in enumerate(shared[4:]):
            assert q_audio[i, c, 0, 0] == 10 + (i if keep else (i - 1) % 4)


def test_mixed_reconstruction_decodes_the_mixed_codes(tiny_probe):
    net, shared = tiny_probe
    image, audio = torch.rand(3, 3, 128, 128), torch.randn(3, 1, 256, 256)
    rows = probe.decoders_of(PROBE_CFG, net, {})
    mixed = probe.decode_rows(rows, net.backbone, shared, image, audio, CPU)[
        probe.VARIANTS['mix']]
    with torch.no_grad():
        q = net.backbone(image, audio, decode=False).quantized_image
        gate = shared[:4].reshape(1, 4, 1, 1)
        expected = net.backbone.decoders['image'](q * gate + q[[2, 0, 1]] * (1 - gate))
    assert torch.allclose(mixed[0], expected, atol=1e-5)


@pytest.mark.parametrize('fn, expected', [
    ('binarizer', [False, False, True, False]), ('ternarizer', [True, False, True, False]),
    ('attention', [False, False, True, False]), ('randomizer', [False, False, True, False])])
def test_shared_channels_follow_the_threshold_rule(fn, expected):
    """model.py's rule (attention: binarizer rule on the raw values); the randomizer,
    whose every call draws a new mask, is read with the binarizer rule too."""
    solver = models.TaskSolver(embedding_dim=4, num_residual_layers=1, num_residual_hiddens=4,
                               num_classes=6, mode='multimodal', masked=True, mask_init='1s',
                               mask_scale=1e-2, threshold_fn=fn, threshold=None)
    solver.set_mask(torch.tensor([-0.5, 0.001, 0.2, 0.005] * 2))
    assert probe.shared_channels(solver).tolist() == expected * 2


# ----------------------------------------------------------------------------- probes

def synthetic_case(n_train=240, n_test=120, seed=0):
    """Pooled codes of 2D = 8 channels: the 'emotion' class lives in channels 0 and 4
    (marked shared), an 'actor' class and a continuous 'skin' factor in channels 1
    and 5 (private); the rest is noise."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    emotion, actor = rng.integers(0, 3, n), rng.integers(0, 4, n)
    skin = rng.normal(size=n)
    x = rng.normal(size=(n, 8))
    x[:, 0] += 5 * emotion
    x[:, 4] -= 2 * emotion
    x[:, 1] += 5 * actor
    x[:, 5] += 5 * skin
    features = {'train': x[:n_train], 'test': x[n_train:]}
    labels = [probe.Label(name, kind, probe.label_role(name), v[:n_train], v[n_train:])
              for name, kind, v in (('emotion', 'class', emotion), ('actor', 'class', actor),
                                    ('skin_r', 'continuous', skin))]
    shared = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)
    return features, labels, shared


def test_the_probe_finds_which_channels_carry_each_label():
    features, labels, shared = synthetic_case()
    subsets = probe.channel_subsets(shared, 4, np.ones(8, bool))
    result = probe.run_probes(labels, features, subsets, PROBE_CFG)
    emotion, actor, skin = result['emotion'], result['actor'], result['skin_r']
    assert emotion['subsets']['shared']['score'] > 0.9
    assert emotion['subsets']['private']['score'] < 0.55      # chance ~ 1/3
    assert emotion['claim']['found'] == 'shared' and emotion['claim']['agrees'] is True
    assert emotion['claim']['verdict'] == 'as claimed: more decodable from shared'
    assert actor['subsets']['private']['score'] > 0.9
    assert actor['claim']['found'] == 'private' and actor['claim']['agrees'] is True
    assert skin['kind'] == 'continuous' and skin['subsets']['private']['score'] > 0.9
    assert abs(skin['subsets']['shared']['score']) < 0.1
    assert skin['subsets']['image_shared']['channels'] == 1
    for part in emotion['subsets'].values():
        assert part['low'] <= part['score'] <= part['high']


def test_the_learned_split_is_compared_with_random_same_size_splits():
    features, labels, shared = synthetic_case()
    splits = probe.random_splits(shared, 4, 6, seed=0)
    assert all(s[:4].sum() == 1 and s[4:].sum() == 1 for s in splits)
    assert len({s.tobytes() for s in splits}) > 1
    present = np.ones(8, bool)
    controls = [probe.channel_subsets(s, 4, present) for s in splits]
    result = probe.run_probes(labels[:1], features, probe.channel_subsets(shared, 4, present),
                              PROBE_CFG, controls)
    claim = result['emotion']['claim']
    assert claim['random']['count'] == 6 and claim['random']['beyond'] == 'above'
    assert claim['random']['min'] < claim['diff']
    assert claim['verdict'].endswith('; above the range of 6 random same-size splits')


def test_a_wrongly_placed_label_gets_the_opposite_verdict():
    features, labels, shared = synthetic_case()
    subsets = probe.channel_subsets(~shared, 4, np.ones(8, bool))   # swap the sets
    result = probe.run_probes(labels, features, subsets, PROBE_CFG)
    assert result['emotion']['claim']['agrees'] is False
    assert result['emotion']['claim']['verdict'].startswith('against the claim')


def test_an_empty_shared_set_is_reported_not_crashed_on():
    features, labels, _ = synthetic_case(n_train=60, n_test=30)
    subsets = probe.channel_subsets(np.zeros(8, bool), 4, np.ones(8, bool))
    result = probe.run_probes(labels, features, subsets, PROBE_CFG)
    for r in result.values():
        assert r['subsets']['shared'] == {'empty': True}
        assert r['subsets']['image_shared'] == {'empty': True}
        assert r['claim'] == {'verdict': 'not scored: the shared set is empty', 'agrees': None}
    report = {'labels': result}
    assert 'empty' in probe.decodability_table(report)
    assert 'not scored' in probe.claim_table(report)


def test_a_constant_label_is_skipped():
    features, labels, shared = synthetic_case(n_train=60, n_test=30)
    flat = probe.Label('gain_db', 'continuous', 'emotion-irrelevant', np.zeros(60),
                       np.zeros(30))
    subsets = probe.channel_subsets(shared, 4, np.ones(8, bool))
    result = probe.run_probes([flat], features, subsets, PROBE_CFG)
    assert result['gain_db']['skipped'] == 'constant in train and test'


def test_roles_of_labels():
    assert probe.label_role('emotion') == probe.label_role('voice_pitch_st') \
        == 'emotion-relevant'
    for name in ('actor', 'skin_g', 'pitch_shift_st', 'race', 'user', 'actor_f0_hz'):
        assert probe.label_role(name) == 'emotion-irrelevant'
    assert probe.label_role('f0_hz') == 'mixed'


def test_rml_labels_and_a_twin_table_found_by_subject_and_name(tmp_path):
    """RML plugs in by the dataset name: RML_probe's label columns, and the twin's
    ground_truth.csv rows named SUBJECT/NAME."""
    from types import SimpleNamespace
    (tmp_path / 'ground_truth.csv').write_text(
        'name,subject,light,skin_class\ns1/ha1,s1,0.9,light\ns2/sa1,s2,1.1,dark\n')
    paths = [str(tmp_path / 's1' / 'ha1.avi'), str(tmp_path / 's2' / 'sa1.avi')]
    dataset = SimpleNamespace(paths=paths, labels=np.array([[0, 1, 2, 0], [1, 3, 0, 1]]))
    assert probe.LABEL_SOURCES['RML'][0] == 'RML_probe'
    labels = probe.LABEL_SOURCES['RML'][1](dataset)
    assert list(labels) == ['emotion', 'skin', 'pitch', 'user', 'light']
    assert labels['user'][0].tolist() == [0, 1] and labels['user'][1] == 'class'
    assert labels['light'][0].tolist() == [0.9, 1.1] and labels['light'][1] == 'continuous'
    assert [probe.label_role(n) for n in ('skin', 'pitch', 'user')] == \
        ['emotion-irrelevant'] * 3


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    return tmp_path_factory.mktemp('probe_results')


@pytest.fixture(scope='module')
def tiny_run(tiny_splits, results):
    """A one-epoch run of the proposed model on the tiny twin: its folder."""
    main.main(tiny_splits(results, '--num_epoch=1'))
    return sorted(results.glob('2*'))[-1]


def probe_args(tiny_splits, results, run_dir, *extra):
    return tool_args(tiny_splits(results, f'--timestamp={run_dir.name}')) + ['--bootstrap=50',
                                                                          *extra]


def test_probe_of_a_tiny_run_writes_everything_and_is_deterministic(tiny_splits, results,
                                                                     tiny_run):
    argv = probe_args(tiny_splits, results, tiny_run, '--probe_epochs=1', '--probe_items=3')
    out, report = probe.run(argv)
    assert out.parent == tiny_run and out.name.startswith('probe-')
    for name in ('probe.json', 'probe.md', 'decodability.png', 'recon_image.png',
                 'recon_audio.png'):
        assert (out / name).is_file(), name
    saved = json.loads((out / 'probe.json').read_text())
    assert set(saved['reconstruction']['mse']) == {
        *probe.VARIANTS.values(), 'shared only, tuned decoders',
        'private only, tuned decoders'}
    labels = saved['labels']
    assert {'emotion', 'actor', 'gender', 'sentence', 'pitch_shift_st', 'skin_r'} <= set(labels)
    assert labels['emotion']['kind'] == 'class' and labels['light']['kind'] == 'continuous'
    assert 'Probe of the saved model' in (tiny_run / 'log.txt').read_text()
    again, _ = probe.run(argv)
    assert again != out
    assert (again / 'probe.json').read_text() == (out / 'probe.json').read_text()
    assert (again / 'probe.md').read_text() == (out / 'probe.md').read_text()


@pytest.mark.parametrize('script, extra', [
    ('main', ['--base_type=3']),
    ('main_separate', ['--num_epoch_vae=1', '--num_epoch_solver=1'])])
def test_base_type_3_and_two_stage_runs_are_probed(tiny_splits, tmp_path, script, extra):
    """base_type 3: pre-VQ codes, no decoders, so no reconstructions; a two-stage run:
    its two checkpoints."""
    import main_separate
    entry = main.main if script == 'main' else main_separate.run
    entry(tiny_splits(tmp_path, '--num_epoch=1', *extra))
    run_dir = sorted(tmp_path.glob('2*'))[-1]
    out, report = probe.run(probe_args(tiny_splits, tmp_path, run_dir,
                                       '--probe_permutations=0'))
    assert (report['reconstruction'] is None) == (script == 'main')
    assert (out / 'recon_image.png').is_file() == (script == 'main_separate')
    assert report['labels']['emotion']['kind'] == 'class'


def fake_run(results, name, **change):
    """A run folder with a config.json and, unless change is empty, an (empty)
    model.pt: enough for the checks made before any work."""
    run_dir = results / name
    run_dir.mkdir(parents=True)
    (run_dir / 'config.json').write_text(json.dumps({**main.header(), **change}))
    if change:
        (run_dir / 'model.pt').write_bytes(b'')
    return run_dir


@pytest.mark.parametrize('name, change, message', [
    ('20000101-000002', {'base_type': 2}, 'base_type 2 (no mask); the probe needs a masked run'),
    ('20000101-000004', {'base_type': 4}, 'base_type 4 (no mask)'),
    ('20000101-000000', {}, 'has no checkpoint (it never trained)'),
])
def test_runs_that_cannot_be_probed_exit_with_one_line(tiny_splits, results, name, change,
                                                       message):
    run_dir = fake_run(results, name, **change)
    before = sorted(run_dir.iterdir())
    with pytest.raises(UserError, match=re.escape(message)):
        probe.run(probe_args(tiny_splits, results, run_dir))
    assert sorted(run_dir.iterdir()) == before


def test_missing_or_unknown_timestamp_exits(tiny_splits, results):
    with pytest.raises(UserError, match='needs --timestamp'):
        probe.run(tool_args(tiny_splits(results)))
    with pytest.raises(UserError, match='20990101-000000.* does not exist'):
        probe.run(tool_args(tiny_splits(results, '--timestamp=20990101-000000')))
    with pytest.raises(UserError, match='probe_epochs=-1'):
        probe.run(tool_args(tiny_splits(results, '--timestamp=20990101-000000'))
                  + ['--probe_epochs=-1'])


def test_the_script_prints_a_user_error_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'tools.probe',
                           f'--results_dir={tmp_path / "results"}'],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f'probe.py: needs --timestamp=<a run folder of {tmp_path / "results"}/>']
    assert not (tmp_path / 'results').exists()
