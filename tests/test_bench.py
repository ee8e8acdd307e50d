"""bench.py: its measuring pieces on tiny sizes, and the files they write."""
import json

import pytest

import model as models
from cmvq import flops, reference_model
from cmvq.configurator import ConfigError
from tools import bench
from conftest import PAPER, TINY_MODEL, TINY_RUN


@pytest.fixture(scope='module')
def bench_data(twin, tmp_path_factory):
    """Split configs (and the train cache) of the tiny twin."""
    from cmvq import cremad
    out = tmp_path_factory.mktemp('bench')
    cremad.build_splits(root=twin, data_path=out / 'data', workers=2,
                             cache_dir=out / 'cache', progress=False)
    return out / 'data', out / 'cache'


def test_reference_trains_the_paper_models_parameters():
    reference = reference_model.build_reference(dict(PAPER))
    assert models.count_parameters(reference) == reference_model.PAPER_PARAMETERS


def test_original_path_reads_a_full_length_clip(tmp_path):
    # moviepy's audio reader fails on clips under 1 s, so not on the tiny twin's
    from cmvq.twins import cremad as synth_cremad
    root = tmp_path / 'CREMA-D'
    synth_cremad.generate(root=root, num_actors=1, sentences='DFA', duration_scale=1.0,
                          progress=False)
    face, spec = bench.original_item(sorted((root / 'VideoFlash').glob('*.flv'))[0])
    assert face.shape == (128, 128, 3) and spec.shape == (256, 256)


def test_quick_keeps_explicit_overrides():
    cfg = bench.resolve(['--quick=True', '--batch_size=8'])
    assert cfg['batch_size'] == 8 and cfg['train_steps'] == bench.QUICK['train_steps']
    assert bench.resolve([])['base_types'] == (0, 1, 2, 3, 4)
    with pytest.raises(ConfigError, match='base_types=.5,. is not allowed'):
        bench.resolve(['--base_types=(5,)'])


def test_pieces_write_results(bench_data, tmp_path, monkeypatch):
    monkeypatch.setitem(flops.PEAK_SIZES, 'cpu', 256)
    data_path, cache_dir = bench_data
    results = {'argv': ['bench.py', '--test'], 'started': 'now', 'config': bench.resolve([]),
               'machine': bench.machine()}
    results['decode'] = bench.measure_decode(data_path, cache_dir, clips=2, rounds=1,
                                             original=False)
    results['loaders'] = bench.measure_loaders(
        data_path, cache_dir, workers=(0,), items=4, batch_size=2,
        runtime=bench.cpu_runtime(), seed=0)
    results['train'] = bench.measure_train_cpu(
        TINY_MODEL, base_types=(0, 1), reference=True, batch_size=2, warmup=1, steps=1,
        rounds=2, seed=0, grid_base_types=(0,))
    results['peaks'] = bench.measure_peaks(['cpu'])
    bench.add_rates(results['train'], bench.step_costs(TINY_MODEL, (0, 1)), results['peaks'])
    results['profile'] = bench.measure_profile(TINY_MODEL, batch_size=2, steps=1, seed=0)
    text = bench.write_results(tmp_path, results)

    saved = json.loads((tmp_path / 'results.json').read_text())
    assert (tmp_path / 'results.md').read_text() == text
    assert {'argv', 'config', 'machine', 'decode', 'loaders', 'train', 'notes'} <= set(saved)
    assert {'cpu', 'cores', 'torch', 'cuda_device'} <= set(saved['machine'])
    assert {r['method'] for r in saved['decode']} >= {'PyAV item (cache=False)',
                                                      'cached train item', 'cached eval item'}
    assert all(r['median_ms'] > 0 and r['mean_ms'] > 0 for r in saved['decode'])
    assert {r['loader'] for r in saved['loaders']} >= {'raw (PyAV decode)', 'cached'}
    assert all(r['items_per_s'] > 0 for r in saved['loaders'])
    models_timed = [r['model'] for r in saved['train']]
    assert models_timed == ['Model (base_type 0)', 'Model (base_type 1)',
                            *['Model (base_type 0)'] * 3, 'ReferenceModel (straightforward)']
    grid = [(r['precision'], r['channels_last']) for r in saved['train'][2:5]]
    assert grid == [('fp32', True), ('bf16', False), ('bf16', True)]
    assert all(r['samples_per_s'] > 0 and r['peak_mb'] >= 0 for r in saved['train'])
    assert all(r['tflops'] > 0 and 0 < r['peak_percent'] for r in saved['train'])
    assert [(r['device'], r['precision']) for r in saved['peaks']] == [('cpu', 'fp32'),
                                                                      ('cpu', 'bf16')]
    assert 0 < len(saved['profile']) <= 15 and saved['profile'][0]['self_ms_per_step'] > 0
    for title in ('## Per-clip cost', '## Loader throughput', '## Training step',
                  '## Matmul peak', '## Profile of the training step'):
        assert title in text
    assert any('reference' in note for note in saved['notes'])
    assert any('bf16, channels_last True' in note for note in saved['notes'])


def test_step_flops_count_the_paper_step():
    """The paper model's forward is 4.92 GFLOP per sample (torch.utils.flop_counter on
    CUDA, ../shared/gpu/README.md); a training step (forward + backward) about 3x."""
    train, evaluation = flops.step_flops(models.build_model({**PAPER, 'base_type': 0}),
                                         bench.random_batch(2, 0))
    assert evaluation / 1e9 == pytest.approx(4.92, rel=0.01)
    assert 2.5 < train / evaluation < 3.5


def test_full_run_is_main_py_end_to_end(bench_data, tmp_path, monkeypatch):
    """The full section's plumbing on the tiny twin at tiny widths, one epoch."""
    data_path, cache_dir = bench_data
    monkeypatch.setattr(bench, 'prepare_full', lambda cfg: None)
    monkeypatch.setitem(flops.PEAK_SIZES, 'cpu', 256)
    argv = bench.full_argv
    monkeypatch.setattr(bench, 'full_argv', lambda cfg, results: [*argv(cfg, results),
                                                                   *TINY_RUN])
    cfg = {**bench.resolve(['--full_epochs=1']), 'full_data_path': str(data_path),
           'cache_dir': str(cache_dir)}
    row, = bench.measure_full(cfg, tmp_path)
    assert row['epochs'] == 1 and row['train_items'] == 52 and row['device'] == 'cpu'
    assert row['wall_seconds'] > row['epochs_seconds'] > 0
    # a 256-wide matmul is no real peak (the tiny step may beat it under load): the row
    # relates the two rates measured in this run, whatever they are
    assert row['tflops'] > 0 and row['peak_tflops'] > 0
    assert row['peak_percent'] == pytest.approx(100 * row['tflops'] / row['peak_tflops'])
    assert (tmp_path / 'full').is_dir() and 0 <= row['test_accuracy'] <= 1
