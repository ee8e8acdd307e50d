"""The RML family: the twin's layout, the split builder, RMLDataset, modify_modal,
the probe labels and the pretrained transfer."""
import csv
import json

import av
import numpy as np
import pytest

import media
import synth
import synth_rml
from conftest import TINY_RML


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
