"""The research workflow on a tiny trained run: per-group metrics, robustness,
prediction of single clips, resume."""
import json
import shutil

import numpy as np
import pytest

import cmvq.train
import datasets
import main
from cmvq import groups
from cmvq.errors import UserError
from conftest import tool_args


@pytest.fixture(scope='module')
def trained(tiny_splits, tmp_path_factory):
    """One two-epoch run of the proposed model: (run folder, main.py arguments)."""
    results = tmp_path_factory.mktemp('workflow') / 'results'
    argv = tiny_splits(results)
    main.main([*argv, '--num_epoch=2'])
    return next(results.iterdir()), argv


def test_group_metrics_count_every_test_clip(trained):
    run_dir, _ = trained
    cfg = json.loads((run_dir / 'config.json').read_text())
    test = json.loads((run_dir / 'metrics.json').read_text())['test']
    labels = datasets.CREMADDataset(cfg['data_path'], 'test', cache=False).labels
    by = test['groups']
    for group, (column, names) in groups.GROUPS.items():
        counts = {groups._value_name(v, names): int(n)
                  for v, n in zip(*np.unique(labels[:, column], return_counts=True),
                                  strict=True)}
        assert {k: g['n'] for k, g in by[group].items()} == counts
        assert sum(g['n'] * g['accuracy'] for g in by[group].values()) == pytest.approx(
            test['accuracy'] * test['num_samples'])
    assert np.sum(list(by['confusion_by_gender'].values()), axis=0).tolist() == \
        test['confusion_matrix']
    assert 'human' not in by                        # a twin: no human reference
    assert 'by gender:' in (run_dir / 'log.txt').read_text()


def test_human_rates_of_real_clip_names(shared, tmp_path):
    root = tmp_path / 'CREMA-D'
    (root / 'processedResults').mkdir(parents=True)
    shutil.copy(shared / 'crema-d' / 'summaryTable.csv', root / 'processedResults')
    # summaryTable.csv: 1001_IEO_NEU_XX voice N, face N, multimodal N;
    # 1001_IEO_HAP_LO voice N, face H, multimodal H
    paths = [str(root / 'VideoFlash' / f'{n}.flv') for n in ('1001_IEO_NEU_XX',
                                                             '1001_IEO_HAP_LO')]
    rates = groups.human_rates(paths)
    assert rates['n'] == 2
    assert (rates['audio'], rates['video'], rates['audio-visual']) == (0.5, 1.0, 1.0)
    assert groups._vote_credit('N:S', 'S') == 0.5 and groups._vote_credit('N:S', 'A') == 0
    (root / groups.SYNTH_MARKER).write_text('{}')   # a twin's names are not real clips
    assert groups.human_rates(paths) is None


def test_robustness_is_deterministic_and_complete(trained, monkeypatch):
    from cmvq import robustness
    run_dir, argv = trained
    monkeypatch.setattr(robustness, 'IMAGE_NOISE', (0.2,))
    monkeypatch.setattr(robustness, 'IMAGE_BLUR', (2.0,))
    monkeypatch.setattr(robustness, 'AUDIO_SNR_DB', (0,))
    first = main.main([*argv, f'--timestamp={run_dir.name}', '--robustness=True'])
    results = first['results']
    assert [(r['modality'], r['corruption']) for r in results] == [
        ('none', 'clean'), ('image', 'removed (zeros)'), ('image', 'removed (train mean)'),
        ('audio', 'removed (zeros)'), ('audio', 'removed (train mean)'),
        ('image', 'noise sd'), ('image', 'blur sd px'), ('audio', 'SNR dB')]
    test = json.loads((run_dir / 'metrics.json').read_text())['test']
    assert results[0]['accuracy'] == test['accuracy']
    assert json.loads((run_dir / 'robustness.json').read_text())['results'] == results
    assert (run_dir / 'robustness.png').is_file()
    again = main.main([*argv, f'--timestamp={run_dir.name}', '--robustness=True'])
    assert again['results'] == results


def test_corruptions_are_seeded_per_clip(trained):
    from cmvq import robustness
    run_dir, _ = trained
    cfg = json.loads((run_dir / 'config.json').read_text())
    test = datasets.CREMADDataset(cfg['data_path'], 'test', cache=False)
    for condition in (('audio', 'SNR dB', 10), ('image', 'noise sd', 0.1)):
        a, b = (robustness.Corrupted(test, condition, seed=0)[1] for _ in range(2))
        other = robustness.Corrupted(test, condition, seed=1)[1]
        k = 0 if condition[0] == 'image' else 1
        assert a[k].equal(b[k]) and not a[k].equal(other[k]) and not a[k].equal(test[1][k])
        assert a[1 - k].equal(test[1][1 - k])       # the other modality is untouched
    clean = test[1][1]
    noisy = robustness.Corrupted(test, ('audio', 'SNR dB', 20), seed=0)[1][1]
    # the decode path gives the cached log-mel exactly when no noise is added
    exact = robustness.Corrupted(test, ('audio', 'SNR dB', 200), seed=0)[1][1]
    assert (noisy - clean).abs().mean() > 0 and (exact - clean).abs().max() < 1e-3


def test_predict_good_and_bad_clips(trained, tmp_path, capsys):
    from tools import predict
    run_dir, argv = trained
    cfg = json.loads((run_dir / 'config.json').read_text())
    test = datasets.CREMADDataset(cfg['data_path'], 'test', cache=False)
    folder = tmp_path / 'clips'
    folder.mkdir()
    for p in test.paths[:2]:
        shutil.copy(p, folder)
    (folder / 'broken.mp4').write_bytes(b'not a video')
    (folder / 'notes.txt').write_text('not a clip')  # not a clip extension: ignored
    out = predict.run([*tool_args(argv), f'--timestamp={run_dir.name}', str(folder),
                       *test.paths[2:]])
    result = json.loads(out.read_text())
    assert [s['clip'] for s in result['skipped']] == [str(folder / 'broken.mp4')]
    assert 'broken.mp4' in capsys.readouterr().err
    preds = result['predictions']
    assert len(preds) == len(test)
    for p in preds:
        probs = p['probabilities']
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert p['emotion'] == max(probs, key=probs.get)
    # the run's own evaluation item: the predictions reproduce the test accuracy
    metrics = json.loads((run_dir / 'metrics.json').read_text())['test']
    truth = [datasets.EMOTIONS[datasets.parse_name(p['clip'])[2]] for p in preds]
    accuracy = np.mean([p['emotion'] == t for p, t in zip(preds, truth, strict=True)])
    assert accuracy == pytest.approx(metrics['accuracy'])


def test_predict_with_no_readable_clip_fails(trained, tmp_path):
    from tools import predict
    run_dir, argv = trained
    (tmp_path / 'bad.flv').write_bytes(b'')
    before = sorted(run_dir.iterdir())
    with pytest.raises(UserError, match='no clip could be read'):
        predict.run([*tool_args(argv), f'--timestamp={run_dir.name}', str(tmp_path / 'bad.flv')])
    assert sorted(run_dir.iterdir()) == before  # no predict-*.json of nothing


def test_resumed_run_equals_the_uninterrupted_one(trained, tmp_path, monkeypatch):
    import torch

    run_dir, argv = trained
    # TensorBoard on (a machine setting): it must not change the result either
    argv = [*argv, f'--results_dir={tmp_path}', '--tensorboard=True']
    save_state = cmvq.train.save_state

    def killed_after_epoch_1(path, model, optimizer, loaders, epoch, *rest):
        save_state(path, model, optimizer, loaders, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt('killed after epoch 1')
    monkeypatch.setattr(cmvq.train, 'save_state', killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        main.main([*argv, '--num_epoch=2'])
    monkeypatch.setattr(cmvq.train, 'save_state', save_state)
    (killed,) = tmp_path.iterdir()
    assert (killed / 'last.pt').is_file() and not (killed / 'metrics.json').exists()
    test = main.main([*argv, f'--resume={killed.name}'])
    reference = json.loads((run_dir / 'metrics.json').read_text())['test']
    for key in ('accuracy', 'macro_f1', 'confusion_matrix', 'class_error', 'mask', 'groups'):
        assert test[key] == reference[key], key
    history = json.loads((killed / 'history.json').read_text())
    assert history['val'] == json.loads((run_dir / 'history.json').read_text())['val']
    mine, theirs = (torch.load(d / 'model.pt')['model'] for d in (killed, run_dir))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert 'Resumed from' in (killed / 'log.txt').read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(killed / 'tb')).Reload()
    assert [e.step for e in board.Scalars('val/accuracy')] == [1, 2]
    assert 'recon/image' in board.Tags()['images'] and 'mask/raw' in board.Tags()['histograms']
    with pytest.raises(UserError, match='finished'):
        main.main([*argv, f'--resume={killed.name}'])
