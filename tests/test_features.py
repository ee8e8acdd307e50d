"""RML_feat: make_features.py's folder, RMLFeatDataset's layer selection, main.py end to end.

The models are small randomly initialised ones built by make_features' own code
path (a 4-layer wav2vec2_model, an untrained resnet18): no weights download here.
"""
import pickle

import numpy as np
import pytest
import torch

import datasets
from prepare import make_features
from cmvq.errors import BadValueError, ExistsError, MissingError
from read_variances import read_variances

TINY = dict(image_model='resnet18', image_weights=None, image_size=32, audio_weights=None,
            audio_size='tiny', progress=False)


@pytest.fixture(scope='module')
def feat(tmp_path_factory):
    """(read_rml.py split folder, feature folder) of a one-subject RML twin (6 clips)."""
    from prepare import read_rml
    from cmvq.twins import rml as synth_rml
    base = tmp_path_factory.mktemp('feat')
    synth_rml.generate(base / 'RML', num_subjects=1, clips_per_emotion=1, duration_scale=0.4,
                       workers=1, progress=False)
    data = base / 'data_rml'
    read_rml.build_splits(base / 'RML', data, cache_dir=base / 'cache', workers=1,
                          progress=False)
    make_features.extract(data, base / 'feat', **TINY)
    return data, base / 'feat'


def test_feature_folder(feat):
    data, folder = feat
    info = datasets.feature_info(folder)
    assert info['sizes'] == {'train': 4, 'val': 1, 'test': 1}
    assert (info['image_features'], info['audio_features'], info['num_layers']) == (512, 32, 4)
    image = np.load(folder / 'train_image.npy', mmap_mode='r')
    audio = np.load(folder / 'train_audio.npy', mmap_mode='r')
    assert image.shape == (4, 16, 512) and audio.shape == (4, 4, 64, 32)
    assert image.dtype == audio.dtype == np.float16 and np.isfinite(audio).all()
    for name in ('videos', 'labels'):  # the index: one row per clip of the source split
        with open(folder / f'test_{name}.pkl', 'rb') as f, open(data / f'test_{name}.pkl',
                                                                 'rb') as g:
            assert pickle.load(f) == pickle.load(g)
    assert read_variances(folder, layer=2)[1] == info['audio_var'][1]
    with pytest.raises(BadValueError, match='per-layer'):
        read_variances(folder)


def test_layer_selection(feat):
    _, folder = feat
    audio = np.load(folder / 'val_audio.npy')
    items = {k: datasets.RMLFeatDataset(folder, 'val', layer=k)[0] for k in (1, 4)}
    image, audio1, emotion = items[1]
    assert image.shape == (16, 512) and audio1.shape == (64, 32)
    assert image.dtype == audio1.dtype == torch.float32 and isinstance(emotion, int)
    assert torch.equal(items[4][1], torch.from_numpy(audio[0, 3].astype(np.float32)))
    assert not torch.equal(audio1, items[4][1])
    for bad in (0, 5):
        with pytest.raises(BadValueError, match=r'1\.\.4'):
            datasets.RMLFeatDataset(folder, 'val', layer=bad)


def test_audio_model_is_a_wav2vec2_model_with_every_layer():
    net = make_features.AudioModel('HUBERT_LARGE', None, 'tiny')
    import torchaudio
    assert isinstance(net.net, torchaudio.models.Wav2Vec2Model)
    layers = net(torch.randn(1, 16000))
    assert layers.shape == (4, 49, 32)  # 4 layers, 50 frames a second
    with pytest.raises(BadValueError, match='audio_weights=None'):
        make_features.AudioModel('WAV2VEC2_LARGE', 'download', 'tiny')
    with pytest.raises(BadValueError, match='WAV2VEC2_LARGE'):
        make_features.AudioModel('TACOTRON2_WAVERNN_CHAR_LJSPEECH', None, 'tiny')
    image_net, size = make_features.build_image_model('vgg16', None)
    assert size == 4096  # fc7: the released 4096 image features per frame


def test_extract_refuses_before_work(feat, tmp_path):
    data, folder = feat
    with pytest.raises(ExistsError, match='feat_path'):
        make_features.extract(data, folder, **TINY)
    with pytest.raises(MissingError, match='train_videos.pkl'):
        make_features.extract(tmp_path, tmp_path / 'out', **TINY)
    assert not (tmp_path / 'out').exists()


def test_main_trains_and_tests_on_features(feat, tmp_path):
    import main
    import main_separate
    from cmvq.configurator import ConfigError
    _, folder = feat
    args = [f'--data_path={folder}', '--dataset=RML_feat', f'--results_dir={tmp_path}',
            '--embedding_dim=8', '--num_embeddings=16', '--batch_size=4', '--num_workers=0']
    test = main.main([*args, '--num_epoch=1', '--layer=2'])
    assert set(test['per_class_accuracy']) == set(datasets.RML_EMOTIONS)
    run = next(tmp_path.iterdir())
    assert 'ModelFeat' in (run / 'log.txt').read_text()
    assert (run / 'reconstructions.png').is_file()
    with pytest.raises(BadValueError, match='layer=9: .* holds 4 audio layers'):
        main.main([*args, '--layer=9'])
    with pytest.raises(ConfigError, match='two-stage'):
        main_separate.run([*args, '--layer=2'])
