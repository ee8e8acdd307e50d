"""EmoVoxCeleb: the layout writer, read_emo.py's checks and splits, the item, the loss."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
from cmvq.config import check_config
from cmvq.errors import UserError
from cmvq.loss import class_criterion, class_targets, compute_loss
from cmvq.twins import emo as synth_emo
from prepare import read_emo


def _tree(root, speakers=3, videos=2, seed=0):
    """A tiny EmoVoxCeleb-layout tree: frame k of a track is a flat grey of value
    10 * k, its logits peak at class k % 8 (so an item's label names its frame)."""
    rng = np.random.default_rng(seed)
    for s in range(speakers):
        for v in range(videos):
            count = 6 + v
            frames = np.zeros((count, 32, 32, 3), np.uint8)
            frames[:] = (10 * np.arange(count))[:, None, None, None]
            logits = np.eye(8, dtype=np.float32)[np.arange(count) % 8] * 5
            synth_emo.write_track(root, f'id1000{s}/video{v}/00001', frames,
                                 rng.normal(0, 0.1, 8000), logits)
    return root


@pytest.fixture(scope='module')
def emo(tmp_path_factory):
    """(tree root, split folder) of 3 speakers x 2 tracks."""
    base = tmp_path_factory.mktemp('emo')
    root = _tree(base / 'EmoVoxCeleb')
    read_emo.build_splits(root, base / 'data', split_by='speaker', progress=False)
    return root, base / 'data'


def test_split_files_follow_the_seed_format(emo):
    _, data = emo
    sizes = {}
    speakers = {}
    for split in read_emo.SPLITS:
        lists = datasets.load_emo_split(data, split)
        sizes[split] = len(lists['index'])
        speakers[split] = {str(folder).split('frames/')[1].split('/')[0]
                           for folder, _ in lists['image']}
        for (_, count), video in zip(lists['image'], lists['index'], strict=True):
            assert lists['labels'][video].shape == (count, 8)
    assert sum(sizes.values()) == 6
    assert not set.intersection(*speakers.values())  # split_by='speaker': disjoint speakers
    with open(data / 'train_image_var.pkl', 'rb') as f:
        assert 0 < pickle.load(f) < 1


def test_item_shapes_and_label_of_the_drawn_frame(emo):
    _, data = emo
    train = datasets.EmoVoxCelebDataset(data, 'train', seed=0)
    image, audio, logits = train[(3, 0)]
    assert image.shape == (3, 128, 128) and audio.shape == (1, 256, 256)
    assert logits.shape == (8,) and logits.dtype == torch.float32
    k = train.frame(3, 0)
    assert int(logits.argmax()) == k % 8                 # the drawn frame's logits
    assert abs(float(image.mean()) * 255 - 10 * k) < 2   # and that frame's pixels
    # training draws: a pure function of (seed, epoch, item), spread over the track
    assert train.frame(3, 0) == datasets.EmoVoxCelebDataset(data, 'train').frame(3, 0)
    assert len({train.frame(e, 0) for e in range(40)}) > 3
    test = datasets.EmoVoxCelebDataset(data, 'test')
    count = test.tracks[0][1]
    assert {test.frame(e, 0) for e in range(5)} == {count // 2}  # evaluation: centre frame


def test_subsample_keeps_every_ceil_nth_item(emo):
    _, data = emo
    full = datasets.EmoVoxCelebDataset(data, 'train')
    assert list(datasets.subsample_items(10, 3)) == [0, 4, 8]
    assert list(datasets.subsample_items(5, None)) == [0, 1, 2, 3, 4]
    assert len(full) == 2
    one = datasets.EmoVoxCelebDataset(data, 'train', subsample=1)  # step ceil(2 / 1) = 2
    assert one.tracks == full.tracks[:1] and one.audio == full.audio[:1]


def test_loss_is_mse_to_the_teacher_and_accuracy_uses_argmax():
    logits, teacher = torch.randn(4, 8), torch.randn(4, 8)
    assert class_criterion('EmoVoxCeleb') is F.mse_loss
    assert class_criterion('CREMA-D') is F.cross_entropy
    assert torch.equal(class_targets(teacher, 'EmoVoxCeleb'), teacher.argmax(1))
    out = type('Out', (), dict(recon_image=None, recon_audio=None, logits=logits,
                               vq_loss=None))
    model = type('M', (), dict(mask_regularization=lambda self: None))()
    loss, parts = compute_loss(out, None, None, teacher, (1, 1), model, False, 'mse',
                                  class_criterion('EmoVoxCeleb'))
    assert torch.allclose(loss, F.mse_loss(logits, teacher))
    assert datasets.CLASS_NAMES['EmoVoxCeleb'][:3] == ('neutral', 'happiness', 'surprise')
    assert datasets.NUM_CLASSES['EmoVoxCeleb'] == 8


def test_read_emo_refuses_malformed_tracks(tmp_path):
    """A malformed track is dropped with its reason; here the only one, so no split
    has a track: the build stops naming it, before anything is written."""
    root = _tree(tmp_path / 'tree', speakers=1, videos=1)
    frames = root / 'frames' / 'id10000' / 'video0' / '00001'
    (frames / '000003.jpg').rename(frames / '000009.jpg')
    with pytest.raises(UserError, match='no usable tracks .*without gaps'):
        read_emo.build_splits(root, tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists()  # checked before anything is written
    (frames / '000009.jpg').rename(frames / '000003.jpg')
    np.save(root / 'logits' / 'id10000' / 'video0' / '00001.npy', np.zeros((2, 8)))
    with pytest.raises(UserError, match='one row per frame'):
        read_emo.build_splits(root, tmp_path / 'out', progress=False)
    with pytest.raises(ValueError, match='logits'):
        synth_emo.write_track(root, 'x/y/z', np.zeros((3, 8, 8, 3), np.uint8), np.zeros(10),
                             np.zeros((2, 8)))
    with pytest.raises(FileNotFoundError, match='EmoVoxCeleb-layout'):
        read_emo.list_tracks(tmp_path / 'nothing')


def test_config_errors():
    cfg = {**_cfg(), 'dataset': 'CREMA-D', 'subsample': 4}
    with pytest.raises(ValueError, match='subsample applies to EmoVoxCeleb only'):
        check_config(cfg)
    with pytest.raises(ValueError, match='data_on_gpu'):
        check_config({**_cfg(), 'data_on_gpu': True})
    check_config({**_cfg(), 'subsample': 4})


def _cfg():
    import main
    return {**main.header(), 'dataset': 'EmoVoxCeleb', 'device': 'cpu'}


# ---------------------------------------------------------------- the twin, end to end

@pytest.fixture(scope='module')
def emo_twin(tmp_path_factory):
    """A tiny synthetic EmoVoxCeleb twin (3 speakers x 2 tracks) and its split folder."""
    base = tmp_path_factory.mktemp('emo_twin')
    synth_emo.generate(base / 'EmoVoxCeleb', num_speakers=3, tracks_per_speaker=2,
                       duration_scale=0.4, workers=1, progress=False)
    read_emo.build_splits(base / 'EmoVoxCeleb', base / 'data', progress=False)
    return base


def test_twin_layout_and_teacher(emo_twin):
    from cmvq.twins import render as synth
    root = emo_twin / 'EmoVoxCeleb'
    rows = synth.read_csv(root / 'ground_truth.csv')
    assert len(rows) == 6 and rows[0]['name'] == 'id10001/video01/00001'
    agree = []
    for row in rows:
        folder, count, wav, logits = read_emo.check_track(root, row['name'])
        assert count == int(row['frames']) and logits.shape == (count, 8)
        assert np.ptp(logits, axis=0).max() > 0                # the logits move per frame
        agree.append((logits.argmax(1) == int(row['label'])).mean())
    assert np.mean(agree) > 0.7  # the teacher mostly sees the rendered expression
    from PIL import Image
    with Image.open(root / 'frames' / rows[0]['name'] / '000001.jpg') as image:
        assert image.size == (224, 224)


def test_main_trains_and_tests_on_the_twin(emo_twin):
    import main
    test = main.main([f'--data_path={emo_twin / "data"}', '--dataset=EmoVoxCeleb',
                      f'--results_dir={emo_twin / "results"}', '--num_epoch=1',
                      '--num_hiddens=16', '--num_residual_hiddens=4', '--embedding_dim=8',
                      '--num_embeddings=16', '--batch_size=4', '--num_workers=0'])
    assert set(test['per_class_accuracy']) == set(datasets.FERPLUS)
    assert test['num_samples'] == len(datasets.EmoVoxCelebDataset(emo_twin / 'data', 'test'))
    run = next((emo_twin / 'results').iterdir())
    log = (run / 'log.txt').read_text()
    assert 'MSE(logits, teacher logits)' in log
    assert (run / 'confusion_matrix.png').is_file()
