"""The RML family: the twin's layout, the split builder, RMLDataset, modify_modal,
the probe labels and the pretrained transfer."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import datasets
from cmvq.config import model_config
from cmvq.runs import save_json
import main
from cmvq.experiment import resolve_run
import main_separate
from cmvq import media
import model as models
from prepare import read_rml
from cmvq.twins import render as synth
from cmvq.twins import rml as synth_rml
from cmvq import transfer
from cmvq.configurator import ConfigError
from conftest import REPO, TINY_RML, check_ablation_run
from cmvq.errors import UserError
from read_variances import read_variances


def ground_truth(root):
    with open(root / 'ground_truth.csv', newline='') as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- twin

def test_twin_layout_one_folder_per_subject(rml_twin):
    clips = sorted(str(p.relative_to(rml_twin).with_suffix('')) for p in rml_twin.rglob('*.avi'))
    assert clips == sorted(synth_rml.clip_names(3, 1))
    assert sorted(p.name for p in rml_twin.iterdir() if p.is_dir()) == ['s1', 's2', 's3']
    rows = ground_truth(rml_twin)
    assert [r['name'] for r in rows] == synth_rml.clip_names(3, 1)
    assert {r['emotion'] for r in rows} == set(synth_rml.EMOTION_CODES)
    assert {r['language'] for r in rows} == set(synth_rml.LANGUAGES[:3])
    marker = json.loads((rml_twin / synth_rml.MARKER).read_text())
    assert marker['complete'] and marker['clips'] == 18
    assert not list(rml_twin.rglob('*.tmp*'))


@pytest.mark.parametrize('name, height', [('s1/ha1', 480), ('s3/di1', 240)])
def test_avi_format(rml_twin, name, height):
    with av.open(str(rml_twin / f'{name}.avi')) as container:
        assert 'avi' in container.format.name
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.height, video.codec_context.width) == (height, height * 3 // 2)
        assert float(video.average_rate) == 30
        assert sound.codec_context.name == 'pcm_s16le'
        assert sound.codec_context.sample_rate == 22050
        assert len(sound.codec_context.layout.channels) == 1
    frames, audio, fps, rate = media.read_flv(rml_twin / f'{name}.avi')
    assert audio.shape[0] == 1 and abs(audio).max() <= 1 and audio.std() > 1e-3
    row = next(r for r in ground_truth(rml_twin) if r['name'] == name)
    assert len(frames) == int(row['frames'])
    assert abs(audio.shape[1] / rate - float(row['duration_s'])) < 0.05


def test_default_clips_last_3_to_6_seconds():
    rows = synth_rml.subjects(8)
    assert {r['height'] for r in rows} == {240, 480}
    assert len({r['language'] for r in rows}) == 6
    traits = synth_rml.subject_traits(rows[0], 0, 0.5)
    seconds = [synth_rml.clip_factors(n, rows[0], traits, 0, 0.5, 1.0, 10)['duration_s']
               for n in synth_rml.clip_names(1, 15)]
    # tempo is an emotion cue (sadness slow, fear fast): a few clips fall just outside
    assert len(seconds) == 90 and 2.5 <= min(seconds) and max(seconds) <= 7
    assert 3.5 <= np.median(seconds) <= 5.5


def test_twin_is_deterministic_and_reused(rml_twin, tmp_path):
    again = synth_rml.generate(rml_twin, workers=1, progress=False, **TINY_RML)
    assert again['reused']
    one = dict(TINY_RML, num_subjects=1)
    synth_rml.generate(tmp_path / 'a', workers=1, progress=False, **one)
    assert (tmp_path / 'a' / 's1' / 'fe1.avi').read_bytes() == \
        (rml_twin / 's1' / 'fe1.avi').read_bytes()


@pytest.mark.parametrize('kwargs, words', [
    (dict(num_subjects=9), 'num_subjects=9'), (dict(clips_per_emotion=0), 'clips_per_emotion'),
    (dict(nuisance=2), 'nuisance'), (dict(seed=-1), 'seed')])
def test_twin_refuses_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(synth.SynthError, match=words):
        synth_rml.generate(tmp_path / 'x', progress=False, **kwargs)
    assert not (tmp_path / 'x').exists()


def test_twin_refuses_a_foreign_folder(rml_twin, tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(synth.SynthError, match='not a synthetic twin'):
        synth_rml.generate(tmp_path, progress=False, **TINY_RML)
    with pytest.raises(synth.SynthError, match='other parameters'):
        synth_rml.generate(rml_twin, progress=False, **dict(TINY_RML, seed=1))


# ----------------------------------------------------------------------------- splits

def test_by_user_split_holds_out_disjoint_subjects(rml_data, rml_twin):
    data, _ = rml_data
    subjects = {}
    for split in ('train', 'val', 'test'):
        paths, labels = datasets.load_rml_split(data, split)
        subjects[split] = {datasets.rml_subject(p) for p in paths}
        assert labels == [synth_rml.EMOTION_CODES.index(Path(p).stem[:2]) for p in paths]
        assert all(Path(p).is_file() for p in paths)
    assert subjects == {'train': {0}, 'val': {1}, 'test': {2}}
    record = json.loads((data / 'split.json').read_text())
    assert record['sizes'] == {'train': 6, 'val': 6, 'test': 6}
    assert record['subjects'] == {'train': ['s1'], 'val': ['s2'], 'test': ['s3']}
    assert 0 < record['image_var'] < 1 and record['audio_var'] > 0
    assert read_variances(data) == (record['image_var'], record['audio_var'])
    stats = (data / 'val_stats.txt').read_text()
    assert '- Class surprise: 1 samples' in stats and '- Class s2: 6 samples' in stats


def test_clip_split_is_seeded_and_complete():
    names = synth_rml.clip_names(8, 15)
    first = read_rml.plan_rml_splits(names, seed=3)
    assert first == read_rml.plan_rml_splits(list(reversed(names)), seed=3)
    assert first != read_rml.plan_rml_splits(names, seed=4)
    assert [len(first[s]) for s in ('train', 'val', 'test')] == [576, 72, 72]
    assert sorted(sum(first.values(), [])) == sorted(names)
    by_user = read_rml.plan_rml_splits(names, split_by='user')  # default: s7 val, s8 test
    assert {n.split('/')[0] for n in by_user['test']} == {'s8'}
    assert len(by_user['train']) == 6 * 90


@pytest.mark.parametrize('kwargs, words', [
    (dict(split_by='user', val_subjects=('s9',)), 'val_subjects'),
    (dict(split_by='user', val_subjects=('s2',), test_subjects=('s2',)), 'share s2'),
    (dict(split_by='subject'), "split_by='subject'")])
def test_split_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        read_rml.plan_rml_splits(synth_rml.clip_names(3, 1), **kwargs)


def test_builder_refuses_and_names_bad_input(rml_data, rml_twin, tmp_path):
    data, cache = rml_data
    with pytest.raises(FileExistsError, match='already exists'):
        read_rml.build_splits(rml_twin, data, cache_dir=cache, progress=False)
    bad = tmp_path / 'RML' / 's1'
    bad.mkdir(parents=True)
    (bad / 'ha1.avi').write_bytes(b'not a video')
    result = subprocess.run([sys.executable, '-m', 'prepare.read_rml', f'--root={bad.parent}',
                             f'--data_path={tmp_path / "out"}', '--workers=1',
                             f'--cache_dir={tmp_path / "cache"}', '--progress=False'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and 'ha1.avi' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------- items

def test_face_crop_and_audio_geometry():
    frame = np.zeros((240, 360, 3), np.uint8)
    frame[25:215, 85:275] = 200  # exactly the 190-pixel centre square
    assert datasets.rml_face(frame).min() == 200
    big = np.zeros((480, 720, 3), np.uint8)
    big[50:430, 170:550] = 100   # the 380-pixel centre square
    assert datasets.rml_face(big).min() == 100
    audio = np.zeros(22050 * 4, np.float32)
    assert datasets.rml_audio(audio, 22050)[0].shape == (80000,)  # central 2.5 s at 32 kHz
    assert datasets.rml_audio(audio, 22050, 'CREMA-D')[0].shape == (44100 * 4,)


def test_items_shapes_ranges_and_frames(rml_data):
    data, cache = rml_data
    train = datasets.RMLDataset(data, 'train', cache_dir=cache, progress=False, seed=5)
    assert train.frame_jitter == datasets.RML_JITTER
    image, audio, *labels = train[(2, 4)]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
    assert audio.shape == (1, 256, 256) and audio.max() <= 80 and audio.std() > 1
    assert labels == [train.labels[4, 0], -1, -1, -1]
    assert torch.equal(train[(2, 4)][0], image)  # a pure function of (seed, epoch, index)
    offsets = {train._frame_offset(e, 4) for e in range(40)}
    assert len(offsets) > 5 and max(map(abs, offsets)) <= datasets.RML_JITTER
    direct = datasets.RMLDataset(data, 'train', cache=False, seed=5)
    for key in ((2, 4), (0, 1)):
        a, b = train[key], direct[key]
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1]) and a[2:] == b[2:]
    evaluation = datasets.RMLDataset(data, 'val', cache_dir=cache, progress=False)
    assert torch.equal(evaluation[(1, 0)][0], evaluation[(7, 0)][0])  # the centre frame


def test_modify_modal_injects_known_features(rml_data):
    data, cache = rml_data
    plain = datasets.RMLDataset(data, 'test', cache_dir=cache, progress=False)
    mod = datasets.RMLDataset(data, 'test', cache_dir=cache, progress=False,
                              modify_modal=True)
    choices = datasets.modify_choices(len(mod), 0)
    assert np.array_equal(choices, datasets.modify_choices(len(mod), 0))
    colours, shifts = list(datasets.SKIN_COLOURS.values()), datasets.PITCH_SHIFTS
    for i in range(len(mod)):
        image, audio, emotion, skin, pitch, user = mod[i]
        assert (skin, pitch, user) == (choices[i, 0], choices[i, 1], -1)
        assert emotion == plain[i][2]
        face = (plain[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        recoloured = datasets.recolour_skin(face, colours[skin])
        assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round(), recoloured)
        assert not np.array_equal(recoloured, face)
        # pitch: the mel centroid moves the way of the shift
        def centroid(spec):
            power = torch.softmax(spec[0].mean(1), 0)
            return float((power * torch.arange(256)).sum())
        assert (centroid(audio) - centroid(plain[i][1])) * shifts[pitch] > 0


def test_recolour_targets_the_skin_mean():
    face = np.full((128, 128, 3), (128, 160, 128), np.uint8)  # greenish: not skin
    face[32:96, 32:96] = (200, 160, 130)                      # skin
    out = datasets.recolour_skin(face, (100, 60, 40))
    assert np.array_equal(out[0, 0], face[0, 0])
    assert np.abs(out[40, 40].astype(int) - (100, 60, 40)).max() <= 1


def test_probe_labels(rml_data, rml_twin):
    data, cache = rml_data
    probe = datasets.RMLProbeDataset(data, 'val', cache_dir=cache, progress=False)
    rows = {r['name']: r for r in ground_truth(rml_twin)}
    for i, path in enumerate(probe.paths):
        row = rows[f'{Path(path).parent.name}/{Path(path).stem}']
        *_, skin, pitch, user = probe[i]
        assert user == 1  # s2
        assert datasets.RML_SKIN_TONES[skin] == row['skin_class']
        assert datasets.RML_PITCH_CLASSES[pitch] == row['pitch_class']
    mod = datasets.RMLProbeDataset(data, 'val', cache=False, modify_modal=True)
    assert mod.labels[:, 1:3].tolist() == datasets.modify_choices(6, 0).tolist()
    assert set(mod.labels[:, 3]) == {1}


# ----------------------------------------------------------------------------- transfer

TINY_WIDTHS = dict(num_hiddens=16, num_residual_hiddens=4, embedding_dim=8, num_embeddings=16)


def save_source(results, timestamp='20260101-000000', **overrides):
    """A saved CREMA-D run (config.json + model.pt of perturbed weights); its state."""
    cfg = {**main.header(), **TINY_WIDTHS, 'results_dir': str(results), **overrides}
    net = models.build_model(model_config(cfg))
    torch.manual_seed(1)
    # scaled by 1.05..1.15: unlike a fresh model's, yet variances stay positive
    state = {k: v * (1.05 + 0.1 * torch.rand_like(v)) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    run_dir = results / timestamp
    run_dir.mkdir(parents=True)
    save_json(run_dir / 'config.json', cfg)
    torch.save({'model': state, 'epoch': 1}, run_dir / 'model.pt')
    return state


def rml_cfg(results, **overrides):
    return {**main.header(), **TINY_WIDTHS, 'results_dir': str(results), 'dataset': 'RML',
            'pretrained': True, 'pretrained_timestamp': '20260101-000000', **overrides}


@pytest.mark.parametrize('reset', [False, True])
def test_transfer_copies_the_vqvae_modules(tmp_path, reset):
    source = save_source(tmp_path)
    cfg = transfer.resolve(rml_cfg(tmp_path, reset_mask=reset))
    assert cfg['audio_geometry'] == 'CREMA-D'
    net = models.build_model(model_config(cfg))
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    lines = []
    result = transfer.apply([net], cfg, lines.append)
    assert set(result['transferred']) == {f'{p}.{m}' for p in transfer.VQVAE_PARTS
                                          for m in ('image', 'audio')} | {'mask'}
    state = net.state_dict()
    for key, value in state.items():
        if key.startswith('backbone.'):   # encoders, pre-VQ, quantizers (EMA), decoders
            assert torch.equal(value, source[key]), key
        elif key == 'solver.mask':
            assert torch.equal(value, fresh[key] if reset else source[key])
        else:  # the classifier: untouched
            assert torch.equal(value, fresh[key]), key
    assert any('ema' in k or 'cluster' in k for k in state if k.startswith('backbone.quant'))
    assert 'Pretrained from' in lines[0] and 'CREMA-D' in lines[0]


def test_two_stage_transfer_takes_vae_and_solver(tmp_path):
    source = save_source(tmp_path)
    cfg = transfer.resolve(rml_cfg(tmp_path))
    vqvae, solver = models.build_vqvae(model_config(cfg)), models.build_solver(
        model_config(cfg))
    transfer.apply([vqvae, solver], cfg, lambda line: None)
    assert torch.equal(vqvae.state_dict()['encoders.image.0.weight'],
                       source['backbone.encoders.image.0.weight'])
    assert torch.equal(solver.state_dict()['solver.mask'], source['solver.mask'])


@pytest.mark.parametrize('source, here, words', [
    ({}, dict(num_hiddens=32), 'num_hiddens 16 vs 32'),
    ({}, dict(decay=0.0), 'codebook kind'),
    ({'dataset': 'EmoVoxCeleb'}, {}, 'cannot feed RML'),
    ({}, dict(audio_geometry='RML'), 'leave it None'),
    ({}, dict(pretrained_timestamp='20260101-000001'), 'trained runs in .*: 20260101-000000')])
def test_transfer_errors(tmp_path, source, here, words):
    save_source(tmp_path, **source)
    with pytest.raises(UserError, match=words):
        transfer.resolve(rml_cfg(tmp_path, **here))


@pytest.mark.parametrize('argv, words', [
    (['--pretrained=True'], 'RML dataset only'),
    (['--dataset=RML', '--pretrained=True'], 'needs pretrained_timestamp'),
    (['--dataset=RML', '--pretrained=True', '--pretrained_timestamp=20260101-000000',
      '--base_type=4'], 'base_type=4'),
    (['--audio_geometry=RML'], 'RML only'),
    (['--dataset=RML', '--twin_actors=2'], 'twin_actors')])
def test_config_errors(argv, words):
    with pytest.raises(ConfigError, match=words):
        resolve_run(main.header(), argv)


# ----------------------------------------------------------------------------- runs

def test_main_runs_rml_modified_and_pretrained(rml_data, tmp_path):
    data, cache = rml_data
    save_source(tmp_path / 'results')
    argv = [f'--data_path={data}', f'--cache_dir={cache}', f'--results_dir={tmp_path / "results"}',
            '--dataset=RML', '--modify_modal=True', '--pretrained=True',
            '--pretrained_timestamp=20260101-000000', '--num_epoch=1', '--batch_size=6',
            '--num_workers=0', *[f'--{k}={v}' for k, v in TINY_WIDTHS.items()]]
    test = main.main(argv)
    run_dir = max((tmp_path / 'results').iterdir())
    assert set(test['per_class_accuracy']) == set(datasets.RML_EMOTIONS)
    log = (run_dir / 'log.txt').read_text()
    assert 'Pretrained from' in log and 'happiness' in log
    assert json.loads((run_dir / 'config.json').read_text())['audio_geometry'] == 'CREMA-D'
    again = main.main([f'--timestamp={run_dir.name}', f'--results_dir={tmp_path / "results"}',
                       f'--cache_dir={cache}', '--num_workers=0'])
    assert again['accuracy'] == test['accuracy'] and again['loss'] == pytest.approx(test['loss'])


# model.py's tests cover the shapes of every combination; this takes RML items through
# each model kind and mode end to end (one epoch, tiny widths: ~1 s each), checks the
# loss terms each logged and evaluates each saved run again
@pytest.mark.parametrize('mode', models.MODES)
@pytest.mark.parametrize('base_type', models.BASE_TYPES)
def test_every_base_type_and_mode_runs_on_rml(rml_data, tmp_path, base_type, mode):
    data, cache = rml_data
    test = main.main([f'--data_path={data}', f'--cache_dir={cache}', f'--results_dir={tmp_path}',
                      '--dataset=RML', f'--base_type={base_type}', f'--mode={mode}',
                      '--num_epoch=1', '--batch_size=6', '--num_workers=0',
                      *[f'--{k}={v}' for k, v in TINY_WIDTHS.items()]])
    assert test['num_samples'] == 6
    assert set(test['per_class_accuracy']) == set(datasets.RML_EMOTIONS)
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / 'model.pt').is_file() and (run_dir / 'metrics.json').is_file()
    check_ablation_run(run_dir, test, [f'--results_dir={tmp_path}', f'--cache_dir={cache}',
                                       '--num_workers=0'])


def test_two_stage_runs_on_rml(rml_data, tmp_path):
    data, cache = rml_data
    test = main_separate.run([
        f'--data_path={data}', f'--cache_dir={cache}', f'--results_dir={tmp_path}',
        '--dataset=RML', '--num_epoch_vae=1', '--num_epoch_solver=1', '--batch_size=6',
        '--num_workers=0', '--mode=audio-only', *[f'--{k}={v}' for k, v in TINY_WIDTHS.items()]])
    assert test['num_samples'] == 6
