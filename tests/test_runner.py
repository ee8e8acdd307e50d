"""main.py / main_separate.py end to end on a tiny twin: files, metrics, re-evaluation."""
import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cmvq.train
import main
import main_separate
from cmvq import cremad, errors, outputs, two_stage
from cmvq.experiment import resolve_run
from cmvq.loaders import (DeviceLoader, held_bytes, make_datasets, make_loader,
                          resolve_data_on_gpu)
from cmvq.runs import Log
from cmvq.runtime import Runtime
from cmvq.train import NonFiniteLoss
from conftest import REPO, check_ablation_run

# Tiny widths: the tests check behaviour, not accuracy.
TINY_MODEL = ['--num_hiddens=16', '--num_residual_hiddens=4', '--embedding_dim=8',
              '--num_embeddings=16', '--batch_size=16', '--num_workers=0']
SEED_FILES = ['log.txt', 'model.pt', 'train_class_error.pkl', 'val_class_error.pkl',
              *[f'{s}_res_{q}{k}.pkl' for s in ('train', 'val')
                for q in ('perplexity', 'recon_error') for k in (1, 2)],
              *[f'valid_{q}{k}.pkl' for q in ('originals', 'reconstructions') for k in (1, 2)],
              'weight1.pkl', 'weight2.pkl']
EXTRA_FILES = ['config.json', 'environment.json', 'metrics.json', 'history.json',
               'curves.png', 'recon_perplexity.png', 'mask.png', 'confusion_matrix.png',
               'reconstructions.png']


@pytest.fixture(scope='module')
def workdir(twin, tmp_path_factory):
    """Split configs of the tiny twin and a cache, shared by this module's runs, which
    leave both as they are (a test that changes the splits changes a copy)."""
    path = tmp_path_factory.mktemp('runner')
    cremad.build_splits(twin, path / 'data', seed=0, workers=2,
                             cache_dir=path / 'cache', progress=False)
    return path


def args(workdir, *extra, results=None):
    """main.py arguments on the shared splits and cache; results: the results folder
    (default: the shared one, which holds the module's run)."""
    return [f'--data_path={workdir / "data"}', f'--cache_dir={workdir / "cache"}',
            f'--results_dir={results or workdir / "results"}', *TINY_MODEL, *extra]


def only_run(results):
    """The one run folder in results."""
    (run_dir,) = (p for p in results.iterdir() if p.is_dir())
    return run_dir


def copy_run(run_dir, results):
    """A copy of run_dir in results, for a test that adds to a run or its folder."""
    return Path(shutil.copytree(run_dir, results / run_dir.name))


@pytest.fixture(scope='module')
def run(workdir):
    """One two-epoch run of the proposed model: (run folder, its test metrics); it is
    the only run in workdir/results."""
    test = main.main(args(workdir, '--num_epoch=2'))
    return only_run(workdir / 'results'), test


def test_run_leaves_every_file(run):
    run_dir, _ = run
    missing = [f for f in SEED_FILES + EXTRA_FILES if not (run_dir / f).is_file()]
    assert not missing
    assert not list(run_dir.glob('.*.tmp*')), 'temporary files left behind'


def test_pickles_load_with_expected_contents(run, workdir):
    run_dir, _ = run

    def load(name):
        return pickle.loads((run_dir / name).read_bytes())
    history = json.loads((run_dir / 'history.json').read_text())
    assert len(load('val_class_error.pkl')) == 2          # one value per epoch
    for split in ('train', 'val'):                        # train: one value per iteration
        assert load(f'{split}_class_error.pkl') == history[split]['class_error'], split
    # As released: CPU torch tensors; the last test batch (7 test clips, batch 16).
    for name, shape in (('valid_originals1', (7, 3, 128, 128)),
                        ('valid_reconstructions2', (7, 1, 256, 256)), ('weight1', (16, 8))):
        value = load(f'{name}.pkl')
        assert isinstance(value, torch.Tensor) and value.device.type == 'cpu', name
        assert value.shape == shape, name
    # the codebooks of the checkpoint, the inputs of the test split's last (only) batch
    state = torch.load(run_dir / 'model.pt', map_location='cpu', weights_only=True)['model']
    test = make_datasets(resolve_run(main.header(), args(workdir)), splits=('test',))['test']
    items = [test[i] for i in range(len(test))]
    for k, modality in enumerate(('image', 'audio'), start=1):
        assert torch.equal(load(f'weight{k}.pkl'),
                           state[f'backbone.quantizers.{modality}.embedding']), modality
        assert torch.equal(load(f'valid_originals{k}.pkl'),
                           torch.stack([item[k - 1] for item in items])), modality


def test_config_and_log_record_the_run(run):
    run_dir, _ = run
    cfg = json.loads((run_dir / 'config.json').read_text())
    assert cfg['num_epoch'] == 2 and cfg['embedding_dim'] == 8
    env = json.loads((run_dir / 'environment.json').read_text())
    assert '--num_epoch=2' in env['argv'] and 'torch' in env['versions']
    log = (run_dir / 'log.txt').read_text()
    assert log.index('Message:') < log.index('Epoch 1/2') < log.index('Epoch 2/2') \
        < log.index('Test: accuracy')
    assert cfg['recon_loss'] == 'mse'
    assert "Loss (recon_loss='mse'): MSE(image recon) + MSE(audio recon) +" in log


def test_metrics_agree_with_confusion_matrix(run):
    run_dir, test = run
    metrics = json.loads((run_dir / 'metrics.json').read_text())['test']
    cm = np.array(metrics['confusion_matrix'])
    assert cm.sum() == metrics['num_samples'] == 7
    assert metrics['accuracy'] == pytest.approx(np.trace(cm) / cm.sum())
    rows = cm.sum(1)
    for i, acc in enumerate(metrics['per_class_accuracy'].values()):
        assert acc == pytest.approx(cm[i, i] / rows[i] if rows[i] else 0.0)
    assert set(metrics['mask']) == {'private1', 'shared1', 'private2', 'shared2',
                                    'complementarity'}
    assert metrics['accuracy'] == test['accuracy']


def test_evaluating_the_timestamp_reproduces_the_test(run, workdir, tmp_path):
    run_dir, test = run
    run_dir = copy_run(run_dir, tmp_path)
    # A different header (width, mode) must not matter: the saved config rebuilds the model.
    check_ablation_run(run_dir, test, args(workdir, '--embedding_dim=32', '--mode=audio-only',
                                           results=tmp_path))
    assert (run_dir / 'log.txt').read_text().count('Evaluation of the saved model') == 1
    (saved,) = run_dir.glob('eval-*.json')
    assert json.loads(saved.read_text())['test']['accuracy'] == test['accuracy']


def test_unknown_timestamp_lists_available_runs(run, workdir):
    run_dir, _ = run
    with pytest.raises(errors.UserError, match=run_dir.name):
        main.main(args(workdir, '--timestamp=20000101-000000'))


@pytest.mark.parametrize('extra', [['--base_type=1'], ['--base_type=2'], ['--base_type=3'],
                                   ['--base_type=4'], ['--mode=image-only'],
                                   ['--mode=audio-only', '--decay=0.0']])
def test_each_variant_trains_one_epoch(workdir, tmp_path, extra):
    test = main.main(args(workdir, '--num_epoch=1', *extra, results=tmp_path))
    assert test['num_samples'] == 7 and 0 <= test['accuracy'] <= 1
    check_ablation_run(only_run(tmp_path), test, args(workdir, results=tmp_path))


@pytest.mark.parametrize('bad, message', [
    ('--mode=video-only', "allowed: 'multimodal', 'image-only', 'audio-only'"),
    ('--threshold_fn=sigmoid', "'binarizer', 'ternarizer', 'attention', 'randomizer'"),
    ('--num_epochs=3', "unknown config key 'num_epochs'"),
    ('--balanced=True', 'allowed: False'),
    ('--base_type=5', 'allowed: 0, 1, 2, 3, 4'),
])
def test_invalid_override_exits_and_writes_nothing(tmp_path, bad, message):
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'),
                           f'--results_dir={tmp_path / "results"}', bad],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / 'results').exists()


def test_reevaluations_continue_the_log_numbering(run, workdir, tmp_path):
    run_dir = copy_run(run[0], tmp_path)
    for _ in range(2):
        main.main(args(workdir, f'--timestamp={run_dir.name}', results=tmp_path))
    lines = (run_dir / 'log.txt').read_text().splitlines()
    assert sum('Evaluation of the saved model' in line for line in lines) == 2
    assert [line[:6] for line in lines] == [f'[{n:04d}]' for n in range(1, len(lines) + 1)]


def test_two_stage_end_to_end(run, workdir, tmp_path):
    test = main_separate.run(args(workdir, '--num_epoch_vae=1', '--num_epoch_solver=1',
                                  results=tmp_path))
    run_dir = only_run(tmp_path)
    assert (run_dir / 'model_vae.pt').is_file() and (run_dir / 'model_solver.pt').is_file()
    assert (run_dir / 'metrics.json').is_file() and test['num_samples'] == 7
    # Stage 1's series (recon, perplexity) and stage 2's class errors are both kept.
    for name in ('train_res_recon_error1', 'train_res_perplexity2', 'val_res_recon_error2',
                 'val_res_perplexity1', 'train_class_error', 'val_class_error'):
        assert pickle.loads((run_dir / f'{name}.pkl').read_bytes()), name
    history = json.loads((run_dir / 'history.json').read_text())
    assert len(history['stage1']['val']['recon_error1']) == 1
    assert 'class_error' in history['val'] and (run_dir / 'curves_vae.png').is_file()
    again = main_separate.run(args(workdir, f'--timestamp={run_dir.name}', results=tmp_path))
    assert again['confusion_matrix'] == test['confusion_matrix']
    # Each script evaluates its own runs and names the other for the other's, before
    # touching the run's log.
    log = (run_dir / 'log.txt').read_text()
    with pytest.raises(errors.UserError, match='trained by main_separate.py; evaluate it '
                       f'with python3 main_separate.py --timestamp={run_dir.name}'):
        main.main(args(workdir, f'--timestamp={run_dir.name}', results=tmp_path))
    assert (run_dir / 'log.txt').read_text() == log
    with pytest.raises(errors.UserError, match='trained by main.py'):
        main_separate.run(args(workdir, f'--timestamp={run[0].name}'))


def test_runs_that_never_trained_are_not_offered(run, workdir, tmp_path):
    trained = copy_run(run[0], tmp_path)
    stub = tmp_path / '20000101-000000'  # a run that failed before its checkpoint
    stub.mkdir()
    (stub / 'config.json').write_text('{}')
    with pytest.raises(errors.UserError, match='no checkpoint') as error:
        main.main(args(workdir, f'--timestamp={stub.name}', results=tmp_path))
    available = str(error.value).split('can evaluate: ')[1]
    assert trained.name in available and stub.name not in available


def test_two_stage_epochs_follow_num_epoch_unless_set():
    cfg = two_stage.resolve(main_separate.header(), [str(REPO / 'configs' / 'demo.py')])
    assert cfg['num_epoch'] == 12 and cfg['num_epoch_vae'] == cfg['num_epoch_solver'] == 12
    cfg = two_stage.resolve(main_separate.header(), [str(REPO / 'configs' / 'demo.py'),
                                                     '--num_epoch_vae=3'])
    assert (cfg['num_epoch_vae'], cfg['num_epoch_solver']) == (3, 12)
    assert two_stage.resolve(main_separate.header(), [])['num_epoch_solver'] == main.num_epoch


def test_device_loader_matches_the_dataset(workdir):
    """The device-resident loader (CUDA's data_on_gpu path, run here on the CPU)
    yields the DataLoader's evaluation batches exactly, and training frames
    from the +-jitter window."""
    cfg = resolve_run(main.header(), args(workdir))
    val = make_datasets(cfg, splits=('val',))['val']
    runtime = Runtime(cfg)
    reference = next(iter(make_loader(val, cfg, runtime, train=False)))
    loader = DeviceLoader(val, batch_size=cfg['batch_size'], train=False,
                             sampler=range(len(val)), drop_last=False, device='cpu', seed=0)
    batch = next(iter(loader))
    assert len(loader) == 1 and len(batch) == len(reference) == 6
    for mine, theirs in zip(batch, reference, strict=True):
        assert torch.equal(mine, theirs)
    # rank 1 of 2 under torchrun: it holds and yields its shard only
    shard = range(1, len(val), 2)
    loader = DeviceLoader(val, batch_size=2, train=False, sampler=shard, drop_last=False,
                          device='cpu', seed=0)
    assert len(loader.frames) == len(shard)
    reference = torch.utils.data.DataLoader(val, batch_size=2, sampler=shard)
    for mine, theirs in zip(loader, reference, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    train = DeviceLoader(val, batch_size=4, train=True, drop_last=True, device='cpu',
                            sampler=torch.randperm(len(val)).tolist(), seed=0)
    frames = torch.from_numpy(np.array(val.arrays()["frames"]))    # (N, W, 128, 128, 3)
    for image, *_ in train:
        assert image.shape == (4, 3, 128, 128)
        # every training image is one of the cached window frames of some clip
        flat = frames.permute(0, 1, 4, 2, 3).reshape(-1, 3, 128, 128).float() / 255
        assert all((flat == img).flatten(1).all(1).any() for img in image)


def test_last_batch_of_the_test_loader_loads_that_batch_only(workdir):
    """The reconstructions' batch: the evaluation loader's last one, read alone."""
    cfg = resolve_run(main.header(), args(workdir, '--batch_size=4'))
    val = make_datasets(cfg, splits=('val',))['val']
    loader = make_loader(val, cfg, Runtime(cfg), train=False)
    reference = collections.deque(loader, maxlen=1)[0]
    read = []
    getitem = type(val).__getitem__
    val.__class__ = type('Counted', (type(val),), {
        '__getitem__': lambda self, i: read.append(i) or getitem(self, i)})
    batch = outputs.last_batch(loader)
    assert read == list(range(len(val)))[-len(reference[0]):]
    assert all(torch.equal(a, b) for a, b in zip(batch, reference, strict=True))


def test_data_on_gpu_auto_needs_cuda_a_cache_and_room(workdir, monkeypatch):
    cfg = resolve_run(main.header(), args(workdir))
    assert cfg['data_on_gpu'] == 'auto'
    data = make_datasets(cfg, splits=('train', 'val'))
    pairs = [(data['train'], True), (data['val'], False)]
    need = sum(held_bytes(dataset, train) for dataset, train in pairs)
    assert need == (len(data['train']) + len(data['val'])) * (31 * 128 * 128 * 3 + 256 * 256 * 4)
    assert resolve_data_on_gpu(cfg, Runtime(cfg), pairs) == (
        False, "data_on_gpu='auto': off (the device is cpu); a DataLoader with 0 workers "
        'reads the cache')
    cuda, free = SimpleNamespace(device=torch.device('cuda', 0)), [2 * need]
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (free[0], 10**12))
    on, line = resolve_data_on_gpu(cfg, cuda, pairs)
    assert on and line.startswith("data_on_gpu='auto': on (the cached arrays take")
    free[0] -= 2
    on, line = resolve_data_on_gpu(cfg, cuda, pairs)
    assert not on and 'more than 50% of the' in line
    assert not resolve_data_on_gpu({**cfg, 'cache': False}, cuda, pairs)[0]
    assert resolve_data_on_gpu({**cfg, 'data_on_gpu': False}, cuda, pairs) == (False, None)


def test_metrics_do_not_depend_on_num_workers(workdir, tmp_path):
    """Training frames come from (seed, epoch, index), not from worker RNG state."""
    runs = [main.main(args(workdir, '--num_epoch=1', '--base_type=1', f'--num_workers={w}',
                           results=tmp_path)) for w in (0, 1, 2)]
    for other in runs[1:]:
        assert other['confusion_matrix'] == runs[0]['confusion_matrix']
        assert other['class_error'] == runs[0]['class_error']


def copy_data(workdir, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(workdir / 'data', data)
    return data


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj))


def spoil_labels(index, value):
    def spoil(data):
        labels = pickle.loads((data / 'test_labels.pkl').read_bytes())
        labels[index][0] = value
        dump(data / 'test_labels.pkl', labels)
    return spoil


def move_clip_to_test(data):
    for kind in ('videos', 'labels'):
        train = pickle.loads((data / f'train_{kind}.pkl').read_bytes())
        test = pickle.loads((data / f'test_{kind}.pkl').read_bytes())
        if kind == 'videos':
            test[0] = train[0]
        else:
            for k in range(8):
                test[k][0] = train[k][0]
        dump(data / f'test_{kind}.pkl', test)


def vanish_clip(data):
    paths = pickle.loads((data / 'train_videos.pkl').read_bytes())
    paths[0] = paths[0].replace('VideoFlash', 'Gone/VideoFlash')
    dump(data / 'train_videos.pkl', paths)


def truncate_clip(data):
    paths = pickle.loads((data / 'train_videos.pkl').read_bytes())
    copy = data / 'VideoFlash' / paths[0].rsplit('/', 1)[1]
    copy.parent.mkdir()
    shutil.copy(paths[0], copy)
    copy.write_bytes(copy.read_bytes()[:copy.stat().st_size // 3])
    paths[0] = str(copy)
    dump(data / 'train_videos.pkl', paths)


# (how the data_path copy is spoiled or which option is bad, words of the one line)
PREFLIGHT = {
    'missing data_path': (shutil.rmtree, 'does not exist'),
    'nan variance': (lambda data: dump(data / 'train_image_var.pkl', float('nan')),
                     'train_image_var.pkl holds nan'),
    'zero variance': (lambda data: dump(data / 'train_audio_var.pkl', 0.0),
                      'train_audio_var.pkl holds 0.0'),
    'negative variance': (lambda data: dump(data / 'train_image_var.pkl', -1.0),
                          'finite number > 0'),
    'missing variance': (lambda data: (data / 'train_audio_var.pkl').unlink(),
                         'train_audio_var.pkl does not exist'),
    'videos.pkl holds a dict': (lambda data: dump(data / 'val_videos.pkl', {'a': 1}),
                                'val_videos.pkl holds a dict'),
    'race -3': (spoil_labels(6, -3), 'race label -3 of item 0'),
    'gender 9': (spoil_labels(5, 9), 'gender label 9 of item 0'),
    'clip in two splits': (move_clip_to_test, '1 clips are in both train and test'),
    'vanished clip': (vanish_clip, '1 of 52 clips are missing'),
    'truncated clip': (truncate_clip, '1 of 66 clips cannot be used: .*truncated'),
    'results_dir=None': ('--results_dir=None', 'results_dir=None is not allowed; allowed: a '
                                               'folder path'),
    'cache_dir under a file': ('--cache_dir=CONFIG/train_videos.pkl/cache', 'is a file'),
    'read-only results_dir': ('READONLY', 'is not writable'),
    'no space for the cache': ('NOSPACE', 'not enough free space for the decode-once cache'),
}


@pytest.mark.parametrize('case', PREFLIGHT)
def test_preflight_fails_in_one_line_and_writes_nothing(workdir, tmp_path, monkeypatch, case):
    spoil, words = PREFLIGHT[case]
    data = copy_data(workdir, tmp_path)
    extra = [f'--data_path={data}', f'--results_dir={tmp_path / "results"}',
             f'--cache_dir={tmp_path / "cache"}']
    if callable(spoil):
        spoil(data)
    elif spoil == 'READONLY':
        access = os.access
        monkeypatch.setattr(os, 'access', lambda p, mode: access(p, mode) and p != tmp_path)
    elif spoil == 'NOSPACE':
        monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(1, 1, 1))
    else:
        extra.append(spoil.replace('CONFIG', str(data)))
    before = sorted(p.name for p in tmp_path.iterdir())
    for script in (main.main, main_separate.run):
        with pytest.raises(errors.UserError, match=words) as error:
            script(args(workdir, *extra))
        assert '\n' not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # no results/, no cache/


def test_preflight_exit_status_and_one_line(workdir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), *args(workdir),
                           '--results_dir=None'], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        'main.py: results_dir=None is not allowed; allowed: a folder path (a non-empty str)']


def test_a_nan_loss_stops_the_run_and_reports_nothing(workdir, tmp_path, monkeypatch):
    """The first NaN batch stops the run with the epoch, batch and loss terms; the log
    keeps everything up to it; no metrics."""
    compute, calls = cmvq.train.compute_loss, []

    def poisoned(*a, **k):
        loss, parts = compute(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            parts['recon_error1'] = parts['recon_error1'] * float('nan')
            loss = sum(parts.values())
        return loss, parts
    monkeypatch.setattr(cmvq.train, 'compute_loss', poisoned)
    with pytest.raises(NonFiniteLoss, match=r'in epoch 1 train, batch 3 \(.*recon_error1 nan'):
        main.main(args(workdir, '--num_epoch=1', f'--results_dir={tmp_path / "results"}'))
    run_dir = next((tmp_path / 'results').iterdir())
    assert not (run_dir / 'metrics.json').exists()
    text = (run_dir / 'log.txt').read_text()
    assert 'Config:' in text and 'Run failed' in text and 'non-finite loss' in text


class FailingCompiled(torch.nn.Module):
    """What torch.compile returns in the test below: a step that changes the model's
    state and RNG (the eager forward) and then fails, as compiling once did."""

    def __init__(self, net):
        super().__init__()
        self._orig_mod = net  # torch.compile's OptimizedModule keeps the model there

    def forward(self, *inputs):
        self._orig_mod(*inputs)
        raise RuntimeError('permute(sparse_coo): number of dimensions ...\nTraceback of it')


def test_a_failing_first_compiled_step_falls_back_to_eager(run, workdir, tmp_path, monkeypatch,
                                                           capsys):
    """One log line, no traceback, and the eager run's numbers: the failed attempt's
    changes (BatchNorm statistics, EMA codebooks, dropout draws) are undone."""
    monkeypatch.setattr(torch, 'compile', lambda net, **options: FailingCompiled(net))
    test = main.main(args(workdir, '--num_epoch=2', '--compile=True', results=tmp_path))
    run_dir, eager = only_run(tmp_path), run[0]
    log = (run_dir / 'log.txt').read_text()
    assert log.count('compile=True: the first compiled step failed (RuntimeError: '
                     'permute(sparse_coo): number of dimensions ...); training without '
                     'torch.compile') == 1
    assert 'Traceback' not in log + capsys.readouterr().err
    ours, theirs = (json.loads((d / 'history.json').read_text()) for d in (run_dir, eager))
    assert ours['train'] == theirs['train'] and ours['val'] == theirs['val']
    assert test['confusion_matrix'] == run[1]['confusion_matrix']


def test_reevaluation_refuses_a_changed_test_split(run, workdir, tmp_path):
    """data_path re-split after training, so that the run trained on test clips:
    refused, unless allowed (then the result says so). The run and its data_path are
    copies."""
    data = copy_data(workdir, tmp_path)
    run_dir = copy_run(run[0], tmp_path / 'results')
    cfg = json.loads((run_dir / 'config.json').read_text())
    (run_dir / 'config.json').write_text(json.dumps({**cfg, 'data_path': str(data)}))
    assert json.loads((run_dir / 'splits.json').read_text())['test']['clips'] == 7
    for kind in ('videos', 'labels'):   # the test split is now the first 7 training clips
        train = pickle.loads((data / f'train_{kind}.pkl').read_bytes())
        dump(data / f'train_{kind}.pkl', [x[7:] for x in train] if kind == 'labels'
             else train[7:])
        dump(data / f'test_{kind}.pkl', [x[:7] for x in train] if kind == 'labels'
             else train[:7])
    again = [f'--results_dir={tmp_path / "results"}', f'--cache_dir={tmp_path / "cache"}',
             '--num_workers=0', f'--timestamp={run_dir.name}']
    log_before = (run_dir / 'log.txt').read_text()
    with pytest.raises(errors.BadValueError, match='7 of them were in its training split'):
        main.main(again)
    assert (run_dir / 'log.txt').read_text() == log_before
    test = main.main([*again, '--allow_split_change=True'])
    assert 'changed' in test['split_changed']
    evals = sorted(run_dir.glob('eval-*.json'), key=lambda p: p.stat().st_mtime)
    assert 'split_changed' in json.loads(evals[-1].read_text())['test']
    assert 'ON A CHANGED TEST SPLIT' in (run_dir / 'log.txt').read_text()


def test_eval_files_never_collide(tmp_path):
    from cmvq import atomic
    names = [atomic.write_new(tmp_path / 'eval-1.json', str(k)) for k in range(3)]
    assert [p.name for p in names] == ['eval-1.json', 'eval-1-2.json', 'eval-1-3.json']
    assert [p.read_text() for p in names] == ['0', '1', '2']
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in names)


def _write_log(path, tag, count):
    log = Log(path)
    for k in range(count):
        log(f'{tag} {k} first line\n{tag} {k} second line')
    log.close()


def test_log_lines_of_two_processes_stay_whole_and_numbered(tmp_path):
    import multiprocessing
    import re
    path = tmp_path / 'log.txt'
    procs = [multiprocessing.get_context('fork').Process(target=_write_log,
                                                          args=(path, tag, 300))
             for tag in 'AB']
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * 300 * 2
    pattern = re.compile(r'\[(\d{4})\] ([AB]) (\d+) (first|second) line$')
    matches = [pattern.match(line) for line in lines]
    assert all(matches)
    assert [int(m[1]) for m in matches] == list(range(1, len(lines) + 1))
    for first, second in zip(matches[::2], matches[1::2], strict=True):  # messages whole
        assert (first[2], first[3], first[4], second[4]) == (second[2], second[3], 'first',
                                                               'second')
