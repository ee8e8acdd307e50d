"""CREMA-D data pipeline: split planning, split configs, items, the decode-once cache."""
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import datasets
from cmvq import media
from cmvq import cache, cremad
from cmvq.splits import validate_splits
from conftest import REPO
from read_variances import read_variances

FAULTY = set(cremad.FAULTY)
SPLITS = ('train', 'val', 'test')


def expected_labels(name, demographics):
    """The 8 labels of a clip, spelled out independently of read_cremad."""
    actor, sentence, emotion, level = name.split('_')
    row = demographics.loc[int(actor)]
    age = min(max(row.Age // 10 - 2, 0), 4)
    return [int(actor) - 1001, datasets.SENTENCES.index(sentence),
            datasets.EMOTIONS.index(emotion), datasets.LEVELS.index(level), age,
            int(row.Sex == 'Female'), datasets.RACES.index(row.Race),
            int(row.Ethnicity == 'Hispanic')]


def load(folder, name):
    with open(Path(folder) / name, 'rb') as f:
        return pickle.load(f)


def write_config(folder, split, paths, labels):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f'{split}_videos.pkl', 'wb') as f:
        pickle.dump(list(paths), f)
    with open(folder / f'{split}_labels.pkl', 'wb') as f:
        pickle.dump(labels, f)


def twin_config(twin, folder, names, split='test'):
    """A split config of the twin clips ``names`` in ``folder``."""
    demographics = cremad.read_demographics(twin)
    paths = [str(twin / 'VideoFlash' / f'{n}.flv') for n in names]
    write_config(folder, split, paths, cremad.encode_labels(names, demographics))
    return folder


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='session')
def config(twin, tmp_path_factory, cache_dir):
    """The twin's seed-0 clip split, built once (its train cache is shared by the tests)."""
    out = tmp_path_factory.mktemp('config') / 'data_cremad'
    cremad.build_splits(twin, out, seed=0, cache_dir=cache_dir, workers=2, progress=False)
    return out


@pytest.fixture(scope='session')
def full_listing(shared):
    names = list(pd.read_csv(shared / 'crema-d' / 'SentenceFilenames.csv').Filename)
    return names, cremad.read_demographics(shared / 'crema-d')


# ----------------------------------------------------------------------------- planning

def test_full_listing_gives_published_sizes_minus_faulty(full_listing):
    names, demographics = full_listing
    kept, _ = cremad.plan_splits(names, demographics, seed=0)
    assert [len(kept[s]) for s in SPLITS] == [5954, 744, 744]
    splits, dropped = cremad.plan_splits(names, demographics, seed=0, drop=FAULTY)
    assert sorted(dropped) == sorted(FAULTY)
    for s in SPLITS:
        assert splits[s] == [n for n in kept[s] if n not in FAULTY]
    assert sum(len(splits[s]) for s in SPLITS) == 7442 - 4


def test_labels_match_names_and_demographics(shared, full_listing):
    names, demographics = full_listing
    table = pd.read_csv(shared / 'crema-d' / 'VideoDemographics.csv').set_index('ActorID')
    labels = cremad.encode_labels(names, demographics)
    for i, name in enumerate(names):
        assert [x[i] for x in labels] == expected_labels(name, table), name


@pytest.mark.parametrize('split_by', ['clip', 'actor'])
def test_plan_is_seeded(full_listing, split_by):
    names, demographics = full_listing
    plan = [cremad.plan_splits(names, demographics, seed=s, split_by=split_by)[0]
            for s in (0, 0, 1)]
    assert plan[0] == plan[1]
    assert plan[0] != plan[2]
    assert sorted(sum(plan[2].values(), [])) == sorted(names)


def test_actor_split_is_disjoint(full_listing):
    names, demographics = full_listing
    splits, _ = cremad.plan_splits(names, demographics, seed=3, split_by='actor')
    actors = {s: {n[:4] for n in splits[s]} for s in SPLITS}
    assert not actors['train'] & actors['val']
    assert not actors['train'] & actors['test']
    assert not actors['val'] & actors['test']
    assert [len(actors[s]) for s in SPLITS] == [73, 9, 9]


def test_stats_match_published_format(shared):
    folder = shared / 'cm-vqvae-split'
    for s in SPLITS:
        text = cremad.format_stats(load(folder, f'{s}_labels.pkl'), s)
        assert text == (folder / f'{s}_stats.txt').read_text()


# ----------------------------------------------------------------------------- split configs

def test_build_splits_writes_aligned_configs(config, twin):
    record = json.loads((config / 'split.json').read_text())
    names = cremad.read_names(twin)
    total = 0
    for s in SPLITS:
        paths, labels = datasets.load_split(config, s)
        datasets.check_aligned(paths, labels, s)
        assert all(Path(p).is_file() for p in paths)
        assert len(paths) == record['sizes'][s] > 0
        assert (config / f'{s}_stats.txt').read_text().startswith('\n* actor\n')
        total += len(paths)
    dropped = record['dropped']['faulty'] + record['dropped']['missing']
    assert total + len(dropped) == len(set(names))
    image_var, audio_var = read_variances(config)
    assert isinstance(image_var, float) and 0 < image_var < 0.25
    assert audio_var > 1
    assert image_var == record['image_var']


def test_same_seed_same_files_other_seed_differs(config, twin, tmp_path, cache_dir):
    build = dict(cache_dir=cache_dir, workers=2, progress=False)
    cremad.build_splits(twin, tmp_path / 'a', seed=0, **build)
    cremad.build_splits(twin, tmp_path / 'b', seed=1, **build)
    for s in SPLITS:
        for kind in ('videos', 'labels'):
            name = f'{s}_{kind}.pkl'
            assert (tmp_path / 'a' / name).read_bytes() == (config / name).read_bytes()
    assert load(tmp_path / 'a', 'train_videos.pkl') != load(tmp_path / 'b', 'train_videos.pkl')
    for name in ('train_image_var.pkl', 'train_audio_var.pkl'):
        assert load(tmp_path / 'a', name) == load(config, name)


def test_actor_split_of_twin(twin, tmp_path):
    record = cremad.build_splits(twin, tmp_path / 'a', split_by='actor', cache=False,
                                      workers=1, progress=False)
    actors = [{p.split('/')[-1][:4] for p in load(tmp_path / 'a', f'{s}_videos.pkl')}
              for s in SPLITS]
    assert all(actors) and not (actors[0] & actors[1] or actors[0] & actors[2]
                                or actors[1] & actors[2])
    assert record['split_by'] == 'actor'


def test_variances_with_and_without_cache_agree(config, twin, tmp_path):
    paths = {'train': datasets.load_split(config, 'train')[0][:6]}
    *_, cached = validate_splits(paths, cache_dir=tmp_path, workers=1, progress=False)
    *_, decoded = validate_splits(paths, cache=False, workers=2, progress=False)
    np.testing.assert_allclose(cached, decoded, rtol=1e-9)


def test_refuses_to_overwrite(config, twin):
    before = (config / 'train_videos.pkl').read_bytes()
    with pytest.raises(FileExistsError, match='overwrite'):
        cremad.build_splits(twin, config, seed=5, cache=False, progress=False)
    assert (config / 'train_videos.pkl').read_bytes() == before


def test_read_variances_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='train_image_var.pkl'):
        read_variances(tmp_path)


def test_cli_rejects_bad_value():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, 'read_cremad.py', '--split_by=speaker'],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0 and "'clip', 'actor'" in run.stderr


# ----------------------------------------------------------------------------- published split

def test_published_labels_are_aligned(shared):
    folder = shared / 'cm-vqvae-split'
    table = pd.read_csv(shared / 'crema-d' / 'VideoDemographics.csv').set_index('ActorID')
    for s in SPLITS:
        paths, labels = datasets.load_split(folder, s)
        datasets.check_aligned(paths, labels, s)
        for i in range(0, len(paths), 7):
            assert [x[i] for x in labels] == expected_labels(Path(paths[i]).stem, table)


def test_remap_path():
    path = '../../datasets/CREMA-D/CREMA-D/VideoFlash/1035_IWW_FEA_XX.flv'
    expected = '/data/CREMA-D/VideoFlash/1035_IWW_FEA_XX.flv'
    assert datasets.remap_path(path, '/data/CREMA-D') == expected
    with pytest.raises(ValueError, match='VideoFlash'):
        datasets.remap_path('clips/1035_IWW_FEA_XX.flv', '/data')


def test_published_subset_loads_with_root(shared, twin, tmp_path, cache_dir):
    present = {p.stem for p in (twin / 'VideoFlash').glob('*.flv')}
    for s in SPLITS:
        paths, labels = datasets.load_split(shared / 'cm-vqvae-split', s)
        keep = [i for i, p in enumerate(paths) if Path(p).stem in present][:3]
        write_config(tmp_path, s, [paths[i] for i in keep], [[x[i] for i in keep] for x in labels])
    ds = datasets.CREMADDataset(tmp_path, 'test', root=twin, cache=False)
    assert ds.paths[0].startswith(str(twin))
    assert len(ds) > 0 and ds[0][0].shape == (3, 128, 128)
    with pytest.raises(media.MediaError, match='VideoFlash'):  # the stored paths don't exist
        datasets.CREMADDataset(tmp_path, 'test', cache_dir=cache_dir, progress=False)


def test_misaligned_labels_are_rejected(twin, tmp_path):
    names = ['1001_DFA_ANG_XX', '1001_DFA_HAP_XX']
    folder = twin_config(twin, tmp_path, names)
    paths, labels = datasets.load_split(folder, 'test')
    write_config(folder, 'test', paths[::-1], labels)
    with pytest.raises(ValueError, match='1001_DFA_HAP_XX'):
        datasets.CREMADDataset(folder, 'test', cache=False)
    write_config(folder, 'test', paths[:1], labels)
    with pytest.raises(ValueError, match='1 paths but 2'):
        datasets.CREMADDataset(folder, 'test', cache=False)


def test_unknown_datasets_are_named():
    with pytest.raises(ValueError, match='EmoVoxCeleb'):
        datasets.get_dataset('IEMOCAP', 'x', 'train')
    assert datasets.NUM_CLASSES['CREMA-D'] == 6


# ----------------------------------------------------------------------------- items

@pytest.fixture(scope='session')
def train_sets(config, cache_dir):
    """Training split of the twin: cached and uncached."""
    kw = dict(cache_dir=cache_dir, progress=False, workers=2)
    return (datasets.CREMADDataset(config, 'train', **kw),
            datasets.CREMADDataset(config, 'train', cache=False, **kw))


def assert_items_equal(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_item_shapes_dtypes_ranges(train_sets):
    ds = train_sets[0]
    image, spec, *labels = ds[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0
    assert spec.shape == (1, 256, 256) and spec.dtype == torch.float32
    assert torch.isfinite(spec).all() and spec.std() > 0
    assert all(type(x) is int for x in labels)
    emotion, race, gender, sentence = labels
    _, sent, emo, _ = datasets.parse_name(ds.paths[0])
    assert (emotion, sentence) == (emo, sent)
    assert (race, gender) == tuple(ds.labels[0, [datasets.RACE, datasets.GENDER]])


def test_arrays(train_sets):
    ds = train_sets[0]
    arrays = ds.arrays()
    width = 2 * ds.frame_jitter + 1
    assert arrays['frames'].shape == (len(ds), width, 128, 128, 3)
    assert arrays['frames'].dtype == np.uint8
    assert arrays['specs'].shape == (len(ds), 256, 256)
    assert arrays['labels'].shape == (len(ds), 8) and arrays['labels'].dtype == np.int64
    with pytest.raises(RuntimeError, match='cache'):
        train_sets[1].arrays()


def test_cached_item_equals_uncached(train_sets):
    cached, uncached = train_sets
    for i in (0, len(cached) - 1):
        for epoch in (0, 1):
            assert_items_equal(cached[epoch, i], uncached[epoch, i])


def test_training_frames_depend_on_seed_epoch_and_index_only(train_sets, config, cache_dir):
    ds = train_sets[0]
    torch.manual_seed(0)
    first = [ds[epoch, 0][0] for epoch in range(8)]
    assert any(not torch.equal(first[0], x) for x in first[1:])  # a new frame per epoch
    torch.manual_seed(1)                                          # global RNG: irrelevant
    assert all(torch.equal(a, ds[epoch, 0][0]) for epoch, a in enumerate(first))
    assert torch.equal(ds[0][0], ds[0, 0][0])
    other = datasets.CREMADDataset(config, 'train', cache_dir=cache_dir, progress=False, seed=1)
    assert any(not torch.equal(other[epoch, 0][0], a) for epoch, a in enumerate(first))


def test_epoch_sampler_order_is_seeded_per_epoch():
    sampler = datasets.EpochSampler(10, seed=3)
    orders = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    assert sorted(i for _, i in orders[1]) == list(range(10))
    assert {e for e, _ in orders[1]} == {2}
    assert [i for _, i in datasets.EpochSampler(4, shuffle=False)] == [0, 1, 2, 3]
    inner = torch.utils.data.DistributedSampler(range(10), num_replicas=2, rank=1, seed=3)
    wrapped = datasets.EpochSampler(10, sampler=inner)
    wrapped.set_epoch(4)
    assert inner.epoch == 4 and len(wrapped) == 5 and {e for e, _ in wrapped} == {4}


def test_evaluation_items_are_fixed(config, twin, tmp_path):
    ds = datasets.CREMADDataset(config, 'val', cache_dir=tmp_path, progress=False, workers=1)
    uncached = datasets.CREMADDataset(config, 'val', cache=False)
    assert not ds.train
    for i in range(len(ds)):
        torch.manual_seed(i)
        a = ds[i]
        assert_items_equal(a, ds[i])
        assert_items_equal(a, uncached[i])
    frames, *_ = media.read_flv(ds.paths[0])
    expected = media.face_crop(frames[media.centre_index(len(frames))])
    assert torch.equal(ds[0][0], datasets.to_image(expected))


def assert_readers_agree(path, audio_too=True):
    """PyAV and moviepy: identical frames at the same index, audio within 1e-4."""
    frames, audio, fps, rate = media.read_flv(path)
    frames2, audio2, fps2, rate2 = media.read_flv(path, backend='moviepy')
    assert (fps, rate) == (fps2, rate2)
    # moviepy estimates the frame count from the duration and may add a last frame
    t = min(len(frames), len(frames2))
    assert abs(len(frames) - len(frames2)) <= 1
    assert np.array_equal(frames[:t], frames2[:t])
    if audio_too:
        n = min(audio.shape[1], audio2.shape[1])
        assert n > 0.9 * max(audio.shape[1], audio2.shape[1])
        np.testing.assert_allclose(audio[:, :n], audio2[:, :n], atol=1e-4)


def test_pyav_and_moviepy_agree(tmp_path):
    t = np.arange(40)[:, None, None, None]
    frames = np.broadcast_to((t * 5 + np.arange(480)[None, None, :, None]) % 256,
                             (40, 360, 480, 3)).astype(np.uint8)
    audio = 0.3 * np.sin(2 * np.pi * 220 * np.arange(40 * 1470) / media.AUDIO_RATE)
    media.write_flv(tmp_path / 'clip.flv', frames, audio)
    assert_readers_agree(tmp_path / 'clip.flv')


def test_pyav_and_moviepy_frames_agree_on_twin(twin):
    assert_readers_agree(twin / 'VideoFlash' / '1001_DFA_ANG_XX.flv', audio_too=False)


@pytest.fixture(scope='module')
def full_length_clips(tmp_path_factory):
    """Six CREMA-D-length twin clips (moviepy's audio reader fails on clips under
    ~1 s, like the tiny twin's; CREMA-D's shortest clip is longer)."""
    from cmvq.twins import cremad as synth_cremad
    root = tmp_path_factory.mktemp('full') / 'CREMA-D'
    synth_cremad.generate(root=root, num_actors=1, sentences='DFA', seed=1, progress=False)
    return sorted((root / 'VideoFlash').glob('*.flv'))


def test_pyav_and_moviepy_agree_on_full_length_twin_clips(full_length_clips):
    """Frames and audio of CREMA-D-length clips."""
    for path in full_length_clips[:2]:
        assert_readers_agree(path)


def released_recipe(path):
    """The released CREMADDataset's log-mel, written out independently: moviepy's
    audio of the clip, mono mean, librosa mel (n_fft 2048, win 512, hop 353, 256
    mels), power to dB; fewer than 256 frames are reflect-padded with the odd frame
    at the start, more are centre-cropped with the odd frame left at the end.
    Returns (spectrogram (256, 256), frames before fitting)."""
    import librosa
    from moviepy import VideoFileClip
    with VideoFileClip(str(path)) as clip:
        mono = clip.audio.to_soundarray().T.mean(axis=0)
    spec = librosa.power_to_db(librosa.feature.melspectrogram(
        y=mono, sr=44100, n_fft=2048, win_length=512, hop_length=353, n_mels=256))
    n = spec.shape[1]
    if n < 256:
        after = (256 - n) // 2
        spec = np.pad(spec, ((0, 0), (256 - n - after, after)), 'reflect')
    else:
        start = (n - 256) // 2
        spec = spec[:, start:start + 256]
    return spec, n


def test_pyav_item_equals_moviepy_item_equals_the_released_recipe(full_length_clips):
    pads = set()
    for path in full_length_clips:
        reference, n = released_recipe(path)
        pads.add((256 - n) % 2 if n < 256 else 'crop')
        _, pyav = datasets.decode_clip(path, 0, 'pyav')
        _, moviepy = datasets.decode_clip(path, 0, 'moviepy')
        np.testing.assert_array_equal(pyav, moviepy)  # same samples, same features
        np.testing.assert_allclose(moviepy, reference, rtol=0, atol=1e-3)
    assert {0, 1} <= pads, 'the clips should pad both even and odd frame counts'


def test_short_clip_window_repeats_edge_frames():
    assert list(datasets.window_indices(5, 3)) == [0, 0, 1, 2, 3, 4, 4]
    assert list(datasets.window_indices(40, 2)) == [18, 19, 20, 21, 22]


# ----------------------------------------------------------------------------- errors and cache

def test_corrupt_clip_is_named(twin, tmp_path):
    flv = tmp_path / 'CREMA-D' / 'VideoFlash' / '1001_DFA_SAD_XX.flv'
    flv.parent.mkdir(parents=True)
    data = (twin / 'VideoFlash' / flv.name).read_bytes()
    flv.write_bytes(data[:13] + bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)))
    folder = twin_config(twin, tmp_path / 'config', ['1001_DFA_SAD_XX'])
    cache = tmp_path / 'cache'
    with pytest.raises(media.MediaError, match=str(flv)):
        datasets.CREMADDataset(folder, 'test', root=flv.parents[1], cache_dir=cache,
                               workers=1, progress=False)
    assert not any(p.is_dir() for p in cache.iterdir())  # no partial cache left behind
    ds = datasets.CREMADDataset(folder, 'test', root=flv.parents[1], cache=False)
    with pytest.raises(media.MediaError, match=str(flv)):
        ds[0]


def test_missing_clip_is_named(twin, tmp_path):
    folder = twin_config(twin, tmp_path / 'config', ['1001_DFA_ANG_XX'])
    missing = str(tmp_path / 'elsewhere' / 'VideoFlash' / '1001_DFA_ANG_XX.flv')
    for cached in (True, False):
        with pytest.raises(media.MediaError, match=f'1 of 1 clips are missing.*{missing}'):
            datasets.CREMADDataset(folder, 'test', root=tmp_path / 'elsewhere', cache=cached,
                                   cache_dir=tmp_path)
    ds = datasets.CREMADDataset(folder, 'test', cache=False)
    ds.paths[0] = missing  # vanished after the dataset was made: named when read
    with pytest.raises(media.MediaError, match=missing):
        ds[0]


def test_missing_clips_are_counted_and_the_first_listed(tmp_path):
    paths = [str(tmp_path / 'VideoFlash' / f'1001_DFA_{e}_XX.flv') for e in datasets.EMOTIONS]
    Path(paths[2]).parent.mkdir()
    Path(paths[2]).write_bytes(b'')
    with pytest.raises(media.MediaError) as error:
        cache.check_clips_exist(paths, show=3)
    message = str(error.value)
    assert message.startswith('5 of 6 clips are missing (the first 3: ')
    assert all(p in message for p in paths[:2] + paths[3:4])
    assert paths[2] not in message and paths[4] not in message and '\n' not in message


def test_build_splits_drops_missing_and_faulty(twin, tmp_path):
    root = tmp_path / 'CREMA-D'
    shutil.copytree(twin, root)
    names = cremad.read_names(root)
    gone = names[0]
    (root / 'VideoFlash' / f'{gone}.flv').unlink()
    faulty = (names[1],)
    record = cremad.build_splits(root, tmp_path / 'out', faulty=faulty, cache=False,
                                      workers=1, progress=False)
    assert record['dropped'] == {'faulty': [names[1]], 'missing': [gone], 'bad': {}}
    stored = [p for s in SPLITS for p in load(tmp_path / 'out', f'{s}_videos.pkl')]
    assert len(stored) == len(set(names)) - 2
    assert not {Path(p).stem for p in stored} & {gone, names[1]}


def test_fingerprint_changes_with_files_and_params(twin, tmp_path):
    flv = tmp_path / 'a.flv'
    shutil.copy(twin / 'VideoFlash' / '1001_DFA_ANG_XX.flv', flv)
    params = datasets.cache_params()
    before = cache.fingerprint([flv], params)
    assert cache.fingerprint([flv], params) == before
    stat = os.stat(flv)
    os.utime(flv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = cache.fingerprint([flv], params)
    assert touched != before
    with open(flv, 'ab') as f:
        f.write(b'\0')
    os.utime(flv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.fingerprint([flv], params) not in (before, touched)
    for other in (datasets.cache_params(frame_jitter=3), datasets.cache_params(backend='moviepy')):
        assert cache.fingerprint([flv], other) != cache.fingerprint([flv], params)


def test_cache_is_reused_and_rebuilt_when_stale(twin, tmp_path, capsys):
    flv = tmp_path / 'VideoFlash' / '1001_DFA_ANG_XX.flv'
    flv.parent.mkdir()
    shutil.copy(twin / 'VideoFlash' / flv.name, flv)
    first = datasets.build_cache([flv], tmp_path / 'cache', frame_jitter=2, workers=1,
                                 progress=False)
    frames = np.load(first / 'frames.npy')
    assert datasets.build_cache([flv], tmp_path / 'cache', frame_jitter=2,
                                progress=False) == first
    os.utime(flv)
    os.utime(flv, ns=(os.stat(flv).st_atime_ns, os.stat(flv).st_mtime_ns + 10**9))
    second = datasets.build_cache([flv], tmp_path / 'cache', frame_jitter=2, workers=1,
                                  progress=False)
    assert second != first and (second / 'meta.json').is_file()
    assert np.array_equal(frames, np.load(second / 'frames.npy'))
    # the superseded cache of the same clip is removed, and says so
    assert list((tmp_path / 'cache').iterdir()) == [second]
    assert f'removed {first}' in capsys.readouterr().err
