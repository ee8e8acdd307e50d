"""Nothing silent: every dataset is checked before its run folder exists; a changed split,
a damaged checkpoint, a full disk, a signal or a dead torchrun rank ends in one line
that names the file, value or rank, and nothing is lost or left behind."""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cmvq.runs
import cmvq.train
import datasets
import main
import main_separate
from cmvq import atomic, configurator, media, preflight
from cmvq.errors import NoSpaceError, UserError
from cmvq.runs import Log
from cmvq.twins import emo as synth_emo
from conftest import REPO, TINY_RUN, fake_run
from prepare import make_features, read_emo, read_rml
from tools import sweep

TINY_WIDTHS = [a for a in TINY_RUN if a.split('=')[0] not in ('--batch_size', '--num_workers')]


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj))


def copy_data(argv, tmp_path):
    """A copy of the split folder of argv (its --data_path): the new folder."""
    data = tmp_path / 'data'
    shutil.copytree(next(a for a in argv if a.startswith('--data_path=')).split('=', 1)[1],
                    data)
    return data


def refused(argv, words, script=main.main):
    """script(argv) stops with a one-line UserError matching words; returns its line."""
    with pytest.raises(UserError, match=words) as error:
        script(argv)
    assert '\n' not in str(error.value)
    return str(error.value)


# ----------------------------------------------------------------------------- every dataset

def rml_args(rml_data, results, *extra):
    data, cache = rml_data
    return [f'--data_path={data}', f'--cache_dir={cache}', f'--results_dir={results}',
            '--dataset=RML', '--num_epoch=1', '--batch_size=6', '--num_workers=0',
            *TINY_WIDTHS, *extra]


def test_a_split_folder_of_another_dataset_is_named(tiny_splits, rml_data, tmp_path):
    results = tmp_path / 'results'
    cremad = tiny_splits(results)[0]
    refused([*rml_args(rml_data, results), cremad], r"is a CREMA-D folder \(python3 "
            r"read_cremad.py\), not a RML one: give dataset='CREMA-D'")
    refused([*rml_args(rml_data, results), '--dataset=EmoVoxCeleb'],
            r'is a RML folder \(python3 -m prepare.read_rml\), not a EmoVoxCeleb one')
    assert not results.exists()


def test_a_vanished_rml_clip_names_the_rml_builder(rml_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(rml_data[0], data)
    paths = pickle.loads((data / 'test_videos.pkl').read_bytes())
    Path(paths[0]).rename(tmp_path / 'moved.avi')
    try:
        line = refused(rml_args(rml_data, tmp_path / 'results', f'--data_path={data}'),
                       r'1 of 6 clips are missing .*rebuild the split configs with python3 -m '
                       'prepare.read_rml')
    finally:
        (tmp_path / 'moved.avi').rename(paths[0])
    assert 'CREMA-D' not in line and 'read_cremad' not in line
    assert not (tmp_path / 'results').exists()


def feature_folder(path, sizes=(3, 1, 1), layers=2):
    """A small make_features.py folder (RML_feat), written directly."""
    path.mkdir()
    for split, n in zip(('train', 'val', 'test'), sizes, strict=True):
        np.save(path / f'{split}_image.npy', np.ones((n, 16, 4), np.float16))
        np.save(path / f'{split}_audio.npy', np.ones((n, layers, 64, 3), np.float16))
        dump(path / f'{split}_videos.pkl', [f's1/ha{k}.avi' for k in range(n)])
        dump(path / f'{split}_labels.pkl', [k % 6 for k in range(n)])
    dump(path / 'train_image_var.pkl', 0.5)
    dump(path / 'train_audio_var.pkl', [0.5] * layers)
    (path / 'features.json').write_text(json.dumps({
        'num_layers': layers, 'image_features': 4, 'audio_features': 3,
        'audio_bundle': 'WAV2VEC2_BASE'}))
    return path


def test_a_truncated_feature_array_is_named_before_the_run(tmp_path):
    data = feature_folder(tmp_path / 'feat')
    argv = [f'--data_path={data}', '--dataset=RML_feat', '--layer=2',
            f'--results_dir={tmp_path / "results"}', *TINY_WIDTHS]
    cfg = main.header() | {'dataset': 'RML_feat', 'data_path': str(data), 'layer': 2,
                           'results_dir': str(tmp_path / 'results')}
    preflight.preflight(cfg)  # the intact folder passes
    audio = data / 'test_audio.npy'
    audio.write_bytes(audio.read_bytes()[:300])
    refused(argv, r'test_audio.npy cannot be read as an array .*rebuild .* with python3 -m '
                  'prepare.make_features')
    np.save(audio, np.ones((2, 2, 64, 3), np.float16))
    refused(argv, r'test_audio.npy holds an array of shape \(2, 2, 64, 3\), expected '
                  r'\(1, 2, \?, 3\) \(1 labels\)')
    assert not (tmp_path / 'results').exists()


def emo_tree(root, tracks=6, frames=4):
    """EmoVoxCeleb-layout tracks of tiny grey frames and 0.5 s of audio."""
    for k in range(tracks):
        synth_emo.write_track(root, f'id1000{k % 3}/video{k}/00001',
                              np.full((frames, 16, 16, 3), 20 * k, np.uint8),
                              np.sin(np.arange(8000) / 9) / 2, np.eye(8)[np.arange(frames)])
    return root


def test_read_emo_decodes_frames_and_audio_and_drops_bad_tracks(tmp_path):
    root = emo_tree(tmp_path / 'EmoVoxCeleb')
    plan = read_emo.plan_splits(read_emo.list_tracks(root))
    frame_bad, audio_bad = plan['train'][:2]
    (root / 'frames' / frame_bad / '000003.jpg').write_bytes(b'')   # a zero-byte frame
    media.write_wav(root / 'wav' / f'{audio_bad}.wav', np.zeros(28))  # 28 samples
    record = read_emo.build_splits(root, tmp_path / 'data', progress=False)
    bad = record['dropped']['bad']
    assert sorted(bad) == sorted([frame_bad, audio_bad])
    assert '000003.jpg: cannot decode image' in bad[frame_bad]
    assert 'too short: 0.002 s of audio, minimum 0.5 s' in bad[audio_bad]
    assert record['sizes'] == {'train': len(plan['train']) - 2, 'val': 1, 'test': 1}
    split = json.loads((tmp_path / 'data' / 'split.json').read_text())
    assert split['dropped'] == record['dropped']
    # every test track bad: the build stops before writing, naming them
    for key in plan['test']:
        for jpg in (root / 'frames' / key).glob('*.jpg'):
            jpg.write_bytes(b'')
    with pytest.raises(UserError, match=r'no usable tracks for split\(s\) test .*cannot decode'):
        read_emo.build_splits(root, tmp_path / 'again', progress=False)
    assert not (tmp_path / 'again').exists()


def test_missing_emo_frames_are_named_before_the_run(tmp_path):
    root = emo_tree(tmp_path / 'EmoVoxCeleb')
    read_emo.build_splits(root, tmp_path / 'data', progress=False)
    test = datasets.load_emo_split(tmp_path / 'data', 'test')
    (Path(test['image'][0][0]) / '000002.jpg').unlink()
    refused([f'--data_path={tmp_path / "data"}', '--dataset=EmoVoxCeleb',
             f'--results_dir={tmp_path / "results"}', *TINY_WIDTHS],
            r"split 'test': .*00001: 1 of its 4 frames are missing \(000002.jpg, ...\); .*"
            'python3 -m prepare.read_emo')
    assert not (tmp_path / 'results').exists()


def test_rml_listing_takes_any_case_and_refuses_other_subjects(rml_twin, tmp_path):
    root = tmp_path / 'RML'
    (root / 's1').mkdir(parents=True)
    shutil.copy(rml_twin / 's1' / 'ha1.avi', root / 's1' / 'ha1.AVI')
    shutil.copy(rml_twin / 's1' / 'sa1.avi', root / 's1' / 'sa2.Avi')
    assert read_rml.list_clips(root) == {'s1/ha1': str(root / 's1' / 'ha1.AVI'),
                                         's1/sa2': str(root / 's1' / 'sa2.Avi')}
    for subject in ('s0', 's9'):
        (root / subject).mkdir()
        shutil.copy(rml_twin / 's1' / 'ha1.avi', root / subject / 'an1.avi')
        with pytest.raises(UserError, match=f'subject folder {subject} is outside s1..s8'):
            read_rml.list_clips(root)
        shutil.rmtree(root / subject)


def test_an_rml_clip_at_10_fps_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(media, 'VIDEO_FPS', 10)
    path = tmp_path / 'ha1.avi'
    media.write_avi(path, np.zeros((12, 240, 320, 3), np.uint8), np.zeros(22050))
    monkeypatch.undo()
    with pytest.raises(media.MediaError, match='frame rate 10 fps, expected 30'):
        datasets.RMLDecoder()(path)
    with pytest.raises(media.MediaError, match='1 of 1 clips cannot be used: .*frame rate 10'):
        datasets.check_clips([path], size=None, fps=datasets.RML_FPS)


# ----------------------------------------------------------------------------- pretrained source

@pytest.mark.parametrize('damage, words', [
    ('truncate', r'model.pt cannot be read as a checkpoint: it is not a whole torch.save '
                 r'archive \(truncated, or another format\)'),
    ('base_type 4', r'\(base_type 4\) holds none of the modules a transfer copies')])
def test_the_pretrained_source_is_checked_before_the_run(rml_data, tiny_splits, tmp_path,
                                                         damage, words):
    results = tmp_path / 'results'
    extra = ['--base_type=4'] if damage == 'base_type 4' else []
    source = fake_run([*tiny_splits(results), *extra])
    if damage == 'truncate':
        model = source / 'model.pt'
        model.write_bytes(model.read_bytes()[:1000])
    refused(rml_args(rml_data, results, '--pretrained=True',
                     f'--pretrained_timestamp={source.name}'), words)
    assert [p.name for p in results.iterdir()] == [source.name]


# ----------------------------------------------------------------------------- splits that changed

@pytest.fixture(scope='module')
def stopped(tiny_splits, tmp_path_factory):
    """A run stopped by SIGTERM after its one epoch was saved: (folder, main.py argv)."""
    base = tmp_path_factory.mktemp('stopped')
    argv = [*tiny_splits(base / 'results', '--num_epoch=1')]
    save_state = cmvq.train.save_state

    def then_sigterm(*args):
        save_state(*args)
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cmvq.train, 'save_state', then_sigterm)
        with pytest.raises(SystemExit) as error:
            main.main(argv)
    assert error.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    (run,) = (base / 'results').iterdir()
    return run, argv


def copy_run(stopped, tmp_path):
    """A copy of the stopped run in tmp_path/results: (folder, argv there)."""
    run, argv = stopped
    results = tmp_path / 'results'
    shutil.copytree(run, results / run.name)
    return results / run.name, [*argv, f'--results_dir={results}']


def test_sigterm_says_why_the_run_stopped_and_what_last_pt_holds(stopped):
    run, _ = stopped
    last = (run / 'log.txt').read_text().splitlines()[-1]
    assert last.endswith(f'] Run stopped: terminated (SIGTERM); last.pt holds epoch 1: '
                         f'continue with --resume={run.name}')
    assert not (run / 'metrics.json').exists()


def test_resume_refuses_other_settings_and_applies_more_epochs(stopped, tmp_path):
    run, argv = copy_run(stopped, tmp_path)
    log = (run / 'log.txt').read_text()
    refused([*argv, f'--resume={run.name}', '--num_hiddens=32', '--learning_rate=0.5'],
            r"learning_rate=0.5 \(the run has 0.001\), num_hiddens=32 \(the run has 16\): a "
            'resumed run keeps its own settings')
    assert (run / 'log.txt').read_text() == log
    test = main.main([*argv, f'--resume={run.name}', '--num_epoch=2'])
    text = (run / 'log.txt').read_text()
    assert 'Resuming with num_epoch=2 (the run had 1)' in text and 'Epoch 2/2' in text
    assert json.loads((run / 'config.json').read_text())['num_epoch'] == 2
    assert 'split_changed' not in test


def test_resume_refuses_a_changed_split(stopped, tmp_path):
    """The split folder rebuilt after the run started: its training clips now in test."""
    run, argv = copy_run(stopped, tmp_path)
    data = copy_data(argv, tmp_path)
    config = json.loads((run / 'config.json').read_text())
    (run / 'config.json').write_text(json.dumps({**config, 'data_path': str(data)}))
    argv = [*argv, f'--data_path={data}']
    videos, labels = (pickle.loads((data / f'train_{k}.pkl').read_bytes())
                      for k in ('videos', 'labels'))
    dump(data / 'train_videos.pkl', videos[6:])   # its first 6 training clips now test
    dump(data / 'train_labels.pkl', [x[6:] for x in labels])
    dump(data / 'test_videos.pkl', videos[:6])
    dump(data / 'test_labels.pkl', [x[:6] for x in labels])
    refused([*argv, f'--resume={run.name}'], r'the train and test splits of .* changed since '
            r'run .* trained \(6 test clips now, 7 then; 6 of them were in its training split\); '
            r'.*--allow_split_change=True to resume anyway')
    test = main.main([*argv, f'--resume={run.name}', '--allow_split_change=True'])
    assert '6 of them were in its training split' in test['split_changed']
    assert 'resuming anyway' in (run / 'log.txt').read_text()


def test_a_damaged_checkpoint_is_one_line_and_writes_nothing(stopped, tmp_path):
    run, argv = copy_run(stopped, tmp_path)
    log = (run / 'log.txt').read_text()
    for name, flag in (('last.pt', f'--resume={run.name}'), ('model.pt', f'--resume={run.name}')):
        good = (run / name).read_bytes()
        (run / name).write_bytes(good[:len(good) // 2])
        refused([*argv, flag], f'{name} cannot be read as a checkpoint')
        (run / name).write_bytes(good)
    (run / 'metrics.json').write_text('{}')  # as if finished: evaluate it
    (run / 'model.pt').write_bytes(b'')
    refused([*argv, f'--timestamp={run.name}'], 'model.pt cannot be read as a checkpoint')
    assert (run / 'log.txt').read_text() == log


def test_sweep_counts_only_runs_of_the_current_split_and_precision(tiny_splits, tmp_path):
    argv = tiny_splits(tmp_path / 'results', '--num_epoch=1', '--amp=off')
    run = fake_run(argv)
    cfg = sweep.resolve_run(main.header(), argv)
    (run / 'metrics.json').write_text('{}')
    assert sweep.find_run(cfg, sweep.saved_runs(tmp_path / 'results')) == run
    env = json.loads((run / 'environment.json').read_text())
    (run / 'environment.json').write_text(json.dumps({'precision': {
        **env['precision'], 'bf16_autocast': True}}))          # a bf16 run: not this setting
    assert sweep.find_run(cfg, sweep.saved_runs(tmp_path / 'results')) is None
    (run / 'environment.json').write_text(json.dumps(env))
    splits = json.loads((run / 'splits.json').read_text())
    splits['test']['sha1'] = '0' * 40                          # trained on another split
    (run / 'splits.json').write_text(json.dumps(splits))
    assert sweep.find_run(cfg, sweep.saved_runs(tmp_path / 'results')) is None


def test_a_killed_sweep_is_resumed_and_leaves_no_empty_folder(stopped, tmp_path, monkeypatch,
                                                              capsys):
    run, argv = copy_run(stopped, tmp_path)
    grid = [*argv, f'--sweep_dir={tmp_path / "sweeps"}']

    def killed(argv, device=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, 'run_in_process', killed)
    with pytest.raises(KeyboardInterrupt):
        sweep.main_sweep(grid)
    assert not (tmp_path / 'sweeps').exists()
    monkeypatch.undo()
    out = sweep.main_sweep(grid)
    assert f'{run} of ' in capsys.readouterr().out
    assert [p.name for p in run.parent.iterdir()] == [run.name]   # resumed, not rerun
    assert (run / 'metrics.json').is_file() and (out / 'table.md').is_file()


# ----------------------------------------------------------------------------- inputs

def test_config_file_values_and_errors(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text('import numpy as np\nfrom pathlib import Path\nseed = np.int64(3)\n'
                    'learning_rate = np.float32(0.5)\ndata_path = Path("data_x")\n'
                    'def helper():\n    return 1\n')
    assert configurator.read_config_file(str(good)) == {'seed': 3, 'learning_rate': 0.5,
                                                        'data_path': 'data_x'}
    cases = {'seed = 3\nmode = {"a": 1}\n': r'mode in config file .*bad.py is a dict',
             'seed = 3\nnum_epoch = (\n': r'config file .*bad.py, line 2: .*never closed',
             'seed = 3\n\nnum_epoch = 1 / 0\n': r'bad.py, line 3: ZeroDivisionError'}
    for text, words in cases.items():
        (tmp_path / 'bad.py').write_text(text)
        refused([str(tmp_path / 'bad.py')], words)


def test_make_features_weights_are_one_line(tmp_path):
    torch.save({'not': torch.zeros(1)}, tmp_path / 'other.pt')
    (tmp_path / 'text.pt').write_text('not a checkpoint')
    for name, words in (('missing.pt', 'missing.pt does not exist'),
                        ('text.pt', 'text.pt cannot be read as a checkpoint'),
                        ('other.pt', r'other.pt does not fit ResNet: 102 missing keys '
                                     r'\(e.g. conv1.weight\); 1 unexpected keys \(e.g. not\)')):
        with pytest.raises(UserError, match=words) as error:
            make_features.build_image_model('resnet18', str(tmp_path / name))
        assert '\n' not in str(error.value)


def test_a_folder_write_removes_what_a_killed_writer_left(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'.feat.tmp-{os.uname().nodename}-{dead.pid}-x'
    stale.mkdir()
    atomic.write_folder(tmp_path / 'feat', lambda tmp: (tmp / 'a').write_text('a'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['feat']
    assert 'temporary folder of a killed process' in capsys.readouterr().out


# ------------------------------------------------------------------ disk, ranks, robustness

def test_no_room_for_the_checkpoints_is_named_before_the_run(tiny_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(1, 1, 10 ** 6))
    refused(tiny_splits(tmp_path / 'results'), r"not enough free space in results_dir=.* for "
            r"the run's checkpoints and outputs: they need 0\.\d\d GB, 0\.00 GB are free")
    assert not (tmp_path / 'results').exists()


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_log(tiny_splits, tmp_path,
                                                                 monkeypatch):
    """ENOSPC while saving last.pt (model.pt was saved): one line naming last.pt, no
    temporary file, the log whole and ending with why."""
    save, calls = torch.save, []

    def full(obj, f):
        calls.append(f)
        if len(calls) == 2:  # the first last.pt
            with open('/dev/full', 'wb') as dev:
                return save(obj, dev)
        return save(obj, f)
    monkeypatch.setattr(cmvq.runs.torch, 'save', full)
    refused(tiny_splits(tmp_path / 'results', '--num_epoch=1'),
            r'disk full while writing .*last.pt \(the file there is unchanged\)')
    (run,) = (tmp_path / 'results').iterdir()
    assert not [p for p in run.iterdir() if p.name.startswith('.')]
    assert (run / 'model.pt').is_file() and not (run / 'last.pt').exists()
    lines = (run / 'log.txt').read_text().splitlines()
    assert [int(line[1:5]) for line in lines] == list(range(1, len(lines) + 1))
    assert lines[-1].endswith('last.pt (the file there is unchanged); free space on that disk')


def test_a_log_line_the_disk_cannot_take_is_cut_off_whole(tmp_path, monkeypatch):
    log = Log(tmp_path / 'log.txt')
    log('first')
    write = os.write

    def half_then_full(fd, data):
        if fd != log.fd:
            return write(fd, data)
        write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'write', half_then_full)
    with pytest.raises(NoSpaceError, match='disk full while appending to .*log.txt'):
        log('second line\nthird line')
    log.error('Run failed: disk full')   # never raises
    monkeypatch.undo()
    log('fourth')
    log.close()
    assert (tmp_path / 'log.txt').read_text() == '[0001] first\n[0002] fourth\n'


def test_a_killed_torchrun_rank_is_named_by_the_others(tiny_splits, tmp_path):
    """Rank 1 is killed (SIGKILL) as training starts: rank 0 ends in one project line
    naming it, in its output and in the run's log, not in a gloo traceback."""
    driver = tmp_path / 'driver.py'
    driver.write_text(
        'import os, signal, sys\n'
        f'sys.path.insert(0, {str(REPO)!r})\n'
        'import cmvq.train, main\n'
        'from cmvq.errors import run_script\n'
        'real = cmvq.train.run_epoch\n'
        'def dying(*args, **kwargs):\n'
        '    if os.environ["RANK"] == "1" and len(args) > 5:\n'
        '        os.kill(os.getpid(), signal.SIGKILL)\n'
        '    return real(*args, **kwargs)\n'
        'cmvq.train.run_epoch = dying\n'
        'sys.argv[0] = "main.py"\n'
        'run_script(main.main)\n')
    results = tmp_path / 'results'
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(driver), *tiny_splits(results, '--num_epoch=1')], capture_output=True, text=True,
        cwd=REPO, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode != 0
    (run,) = results.iterdir()
    last = (run / 'log.txt').read_text().splitlines()[-1]
    assert 'rank 1 of 2 (pid' in last and 'ended first' in last, last
    assert 'Traceback' not in (run / 'log.txt').read_text()


def test_robustness_evaluates_a_two_stage_run(tiny_splits, tmp_path, monkeypatch):
    from cmvq import robustness
    argv = tiny_splits(tmp_path / 'results')
    run = fake_run(argv, two_stage=True)
    refused([*argv, f'--timestamp={run.name}', '--robustness=True'],
            rf'evaluate the run with python3 main.py --timestamp={run.name} --robustness=True',
            script=main_separate.run)
    few = [('none', 'clean', None), ('image', 'removed (zeros)', None),
           ('image', 'noise sd', 0.05), ('audio', 'SNR dB', 20)]  # 4 of the 15: quicker
    assert set(few) <= set(robustness.conditions())
    monkeypatch.setattr(robustness, 'conditions', lambda: few)
    out = main.main([*argv, f'--timestamp={run.name}', '--robustness=True'])
    assert out['num_samples'] == 7 and len(out['results']) == len(few) == 4
    assert (run / 'robustness.json').is_file()
