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

from cmvq import atomic, cache, cremad


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
    assert atomic.remove_stale_temps(old.parent, 'data') == [stale]
    assert str(stale) in capsys.readouterr().out
    assert live.is_dir() and not stale.exists()


def test_interrupted_resplit_keeps_the_old_split(twin, tmp_path, monkeypatch):
    out = tmp_path / 'data'
    cremad.build_splits(twin, out, seed=0, cache=False, workers=1, progress=False)
    before = contents_bytes(out)

    def write_then_die(path, *args):  # split.json, the last file
        atomic.write_pickle(path.parent / 'train_videos.pkl', ['new'])
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(atomic, 'write_json', write_then_die)
    with pytest.raises(SystemExit):
        cremad.build_splits(twin, out, seed=1, cache=False, workers=1, progress=False,
                                 overwrite=True)
    assert contents_bytes(out) == before
    assert siblings(out) == ['data']
    monkeypatch.undo()
    cremad.build_splits(twin, out, seed=1, cache=False, workers=1, progress=False,
                             overwrite=True)
    assert contents_bytes(out)['train_videos.pkl'] != before['train_videos.pkl']


def contents_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ----------------------------------------------------------------------------- damaged media

def write_clip(path, *, seconds=1.0, size=(480, 360), audio=True):
    """An FLV like the twin's, of another length or frame size, or without audio."""
    import av
    import numpy as np
    frames = int(seconds * 30)
    with av.open(str(path), 'w', format='flv') as out:
        video = out.add_stream('flv1', rate=30)
        video.width, video.height, video.pix_fmt = *size, 'yuv420p'
        sound = out.add_stream('libmp3lame', rate=44100, layout='stereo') if audio else None
        for t in range(frames):
            image = np.full((size[1], size[0], 3), 8 * t % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format='rgb24')))
        out.mux(video.encode())
        for start in range(0, int(seconds * 44100) if audio else 0, 1152):
            chunk = np.full((2, 1152), 0.1 * (start % 7), np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format='fltp', layout='stereo')
            frame.sample_rate, frame.pts = 44100, start
            out.mux(sound.encode(frame))
        if audio:
            out.mux(sound.encode())


# How each damage is made, and the words of the reason it must give.
DAMAGE = {
    'truncated': ('truncated', lambda path: path.write_bytes(
        path.read_bytes()[:len(path.read_bytes()) * 4 // 10])),
    'no_audio': ('no audio stream', lambda path: write_clip(path, audio=False)),
    'small': ('frame size 240x180', lambda path: write_clip(path, size=(240, 180))),
    'short': ('too short', lambda path: write_clip(path, seconds=0.3)),
}


@pytest.fixture(scope='module')
def damaged(twin, tmp_path_factory):
    """A copy of the twin with one damaged clip per kind in each of the three planned
    splits (seed 0): (root, {name: reason words})."""
    import shutil
    root = tmp_path_factory.mktemp('damaged') / 'CREMA-D'
    shutil.copytree(twin, root)
    names = cremad.read_names(root)
    plan, _ = cremad.plan_splits(names, cremad.read_demographics(root), seed=0,
                                      drop=cremad.FAULTY)
    victims = {}
    for k, (words, damage) in enumerate(DAMAGE.values()):
        for split in ('train', 'val', 'test'):
            name = plan[split][k]
            damage(root / 'VideoFlash' / f'{name}.flv')
            victims[name] = words
    return root, victims


def test_media_errors_name_the_clip_and_the_reason(damaged):
    import datasets
    from cmvq import media
    root, victims = damaged
    for name, words in victims.items():
        path = root / 'VideoFlash' / f'{name}.flv'
        with pytest.raises(media.MediaError, match=words) as error:
            datasets.decode_clip(path)
        assert error.value.path == path and str(path) in str(error.value)


def test_read_cremad_drops_bad_clips_of_every_split(damaged, tmp_path):
    import datasets
    root, victims = damaged
    cache = tmp_path / 'cache'
    record = cremad.build_splits(root, tmp_path / 'data', cache_dir=cache, workers=2,
                                      progress=False)
    bad = record['dropped']['bad']
    assert sorted(bad) == sorted(victims)
    for name, words in victims.items():
        assert words in bad[name]
    kept = [p for s in ('train', 'val', 'test') for p in datasets.load_split(tmp_path / 'data',
                                                                            s)[0]]
    assert not {os.path.basename(p)[:-4] for p in kept} & set(victims)
    # the three caches training will use exist already: one per split, no temporary left
    assert len(list(cache.iterdir())) == 3
    ds = datasets.CREMADDataset(tmp_path / 'data', 'test', cache_dir=cache, progress=False)
    assert ds.cache_path.parent == cache and len(list(cache.iterdir())) == 3


def test_published_split_with_bad_clips_is_named_before_training(damaged, tmp_path):
    """Split files that keep damaged or missing clips: one error naming how many and
    the first few, before any cache or run folder is made."""
    import datasets
    from cmvq import media
    root, victims = damaged
    names = sorted(victims)[:4] + ['1001_DFA_ANG_XX']
    paths = [str(root / 'VideoFlash' / f'{n}.flv') for n in names]
    paths.append(str(root / 'VideoFlash' / '1003_IEO_SAD_HI.flv.gone'))
    with pytest.raises(media.MediaError, match='1 of 6 clips are missing'):
        datasets.build_cache(paths, tmp_path / 'cache', workers=1, progress=False)
    with pytest.raises(media.MediaError, match=r'4 of 5 clips cannot be used: .*\(and 1 more\)'):
        datasets.build_cache(paths[:5], tmp_path / 'cache', workers=2, progress=False)
    assert list((tmp_path / 'cache').iterdir()) == []


# ----------------------------------------------------------------------------- cache housekeeping

@pytest.fixture
def clips(twin, tmp_path):
    """Copies of three twin clips (so tests may damage them)."""
    import shutil
    folder = tmp_path / 'VideoFlash'
    folder.mkdir()
    names = ('1001_DFA_ANG_XX', '1001_DFA_HAP_XX', '1002_DFA_SAD_XX')
    for name in names:
        shutil.copy(twin / 'VideoFlash' / f'{name}.flv', folder)
    return [folder / f'{n}.flv' for n in names]


def build(clips, cache, workers=1):
    import datasets
    return datasets.build_cache(clips, cache, frame_jitter=1, workers=workers, progress=False)


def assert_no_temporaries(cache):
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]


def test_full_disk_is_named_before_decoding(clips, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(OSError, match='not enough free space.*3 clips'):
        build(clips, tmp_path / 'cache')
    assert list((tmp_path / 'cache').iterdir()) == []


@pytest.mark.parametrize('workers', [1, 2])
def test_disk_full_during_the_build_removes_its_folder(clips, tmp_path, monkeypatch, capsys,
                                                       workers):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'posix_fallocate', full)
    with pytest.raises(OSError, match='disk full while building the decode-once cache'):
        build(clips, tmp_path / 'cache', workers)
    assert list((tmp_path / 'cache').iterdir()) == []
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'build stopped (disk full' in err


@pytest.mark.parametrize('fault', ['worker dies', 'sigterm'])
def test_a_dead_worker_or_sigterm_ends_the_build(clips, tmp_path, monkeypatch, capsys, fault):
    """No hang: a worker killed by the kernel (SIGBUS, OOM) ends the build; so does
    SIGTERM to the building process."""
    import datasets
    decode = datasets.decode_clip

    def dying(path, *args, **kwargs):
        if path == clips[1]:
            os.kill(os.getpid(), signal.SIGKILL if fault == 'worker dies' else signal.SIGTERM)
        return decode(path, *args, **kwargs)
    monkeypatch.setattr(datasets, 'decode_clip', dying)
    workers = 2 if fault == 'worker dies' else 1
    with pytest.raises(BaseException) as error:
        build(clips, tmp_path / 'cache', workers)
    assert type(error.value).__name__ == ('BrokenProcessPool' if fault == 'worker dies'
                                          else 'SystemExit')
    assert list((tmp_path / 'cache').iterdir()) == []
    why = 'a decoding worker died' if fault == 'worker dies' else 'terminated, exit status 143'
    assert why in capsys.readouterr().err


def test_leftovers_of_a_killed_build_are_removed(clips, tmp_path):
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    cache = tmp_path / 'cache'
    leftover = cache / f'.0123abc.tmp-{socket.gethostname()}-{proc.pid}-xyz'
    leftover.mkdir(parents=True)
    build(clips, cache)
    assert not leftover.exists()
    assert_no_temporaries(cache)


def test_a_damaged_array_file_is_rebuilt(clips, tmp_path, capsys):
    import numpy as np
    folder = build(clips, tmp_path / 'cache')
    good = np.load(folder / 'frames.npy')
    with open(folder / 'frames.npy', 'r+b') as f:
        f.truncate(os.path.getsize(folder / 'frames.npy') // 2)
    assert build(clips, tmp_path / 'cache') == folder
    assert 'frames.npy has' in capsys.readouterr().err
    assert np.array_equal(np.load(folder / 'frames.npy'), good)


def test_a_clip_rewritten_with_same_size_and_mtime_is_seen(clips):
    import datasets
    params = datasets.cache_params()
    before = cache.fingerprint(clips, params)
    stat = os.stat(clips[0])
    data = bytearray(clips[0].read_bytes())
    data[-100] ^= 0xFF                                   # same size, new content
    clips[0].write_bytes(bytes(data))
    os.utime(clips[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(clips[0]).st_size == stat.st_size
    assert cache.fingerprint(clips, params) != before
