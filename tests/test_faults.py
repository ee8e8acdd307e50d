"""Faults a demanding user meets: interrupted writes, races, damaged media, full disks.

Each case must end in one clear error naming the file or value, lose nothing,
and leave no temporary or empty folder behind.
"""
import os
import signal
import socket
import subprocess
import sys

import pytest

import atomic
import read_cremad


def write_files(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


def contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir())


# ----------------------------------------------------------------------------- atomic folders

@pytest.fixture
def old(tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    write_files(folder, a='old a', b='old b')
    return folder


@pytest.mark.parametrize('fault', ['exception', 'sigterm'])
def test_interrupted_overwrite_keeps_the_old_folder(old, fault):
    def fill(tmp):
        write_files(tmp, a='new a')
        if fault == 'sigterm':
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError('disk gone')
    with pytest.raises(SystemExit if fault == 'sigterm' else RuntimeError):
        atomic.write_folder(old, fill, overwrite=True)
    assert contents(old) == {'a': 'old a', 'b': 'old b'}
    assert siblings(old) == ['data']
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_overwrite_swaps_the_whole_folder(old):
    atomic.write_folder(old, lambda tmp: write_files(tmp, a='new a'), overwrite=True)
    assert contents(old) == {'a': 'new a'}
    assert siblings(old) == ['data']


def test_refusal_cannot_be_raced(old, tmp_path):
    target = tmp_path / 'fresh'

    def fill(tmp):  # another writer finishes first, while this one is still writing
        target.mkdir()
        write_files(target, a='theirs')
        write_files(tmp, a='mine')
    with pytest.raises(FileExistsError, match='overwrite'):
        atomic.write_folder(target, fill)
    assert contents(target) == {'a': 'theirs'}
    assert siblings(target) == ['data', 'fresh']
    atomic.write_folder(tmp_path / 'empty', lambda tmp: write_files(tmp, a='x'))
    assert contents(tmp_path / 'empty') == {'a': 'x'}


def test_temp_folders_of_killed_processes_are_removed(old, capsys):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = socket.gethostname()
    stale = old.parent / f'.data.tmp-{host}-{dead.pid}-x1'
    live = old.parent / f'.data.tmp-{host}-{os.getpid()}-x2'
    for folder in (stale, live):
        folder.mkdir()
    assert atomic.remove_stale_temps(old) == [stale]
    assert str(stale) in capsys.readouterr().out
    assert live.is_dir() and not stale.exists()


def test_interrupted_resplit_keeps_the_old_split(twin, tmp_path, monkeypatch):
    out = tmp_path / 'data'
    read_cremad.build_splits(twin, out, seed=0, cache=False, workers=1, progress=False)
    before = contents_bytes(out)

    def write_then_die(path, *args):  # split.json, the last file
        atomic.write_pickle(path.parent / 'train_videos.pkl', ['new'])
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(atomic, 'write_json', write_then_die)
    with pytest.raises(SystemExit):
        read_cremad.build_splits(twin, out, seed=1, cache=False, workers=1, progress=False,
                                 overwrite=True)
    assert contents_bytes(out) == before
    assert siblings(out) == ['data']
    monkeypatch.undo()
    read_cremad.build_splits(twin, out, seed=1, cache=False, workers=1, progress=False,
                             overwrite=True)
    assert contents_bytes(out)['train_videos.pkl'] != before['train_videos.pkl']


def contents_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}
