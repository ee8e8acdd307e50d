"""The synthetic CREMA-D twin: formats, names, CSVs, determinism, safety, learnability."""
import csv
import json
import re
import subprocess
import sys
import wave

import av
import numpy as np
import pytest

from cmvq import media
from cmvq.twins import cremad as synth_cremad
from conftest import REPO, TINY

SHORT = dict(duration_scale=0.2, progress=False)


def listing(root):
    with open(root / 'SentenceFilenames.csv', newline='') as f:
        return [r['Filename'] for r in csv.DictReader(f)]


def decode(root, name):
    frames, audio, _, _ = media.read_flv(root / 'VideoFlash' / f'{name}.flv', min_seconds=0)
    samples, _ = media.read_wav(root / 'AudioWAV' / f'{name}.wav')
    return frames, audio, samples


# ----------------------------------------------------------------------------- tree

def test_tree_holds_every_listed_clip(twin):
    names = listing(twin)
    assert len(names) == 3 * (6 + 16)
    assert sorted(p.stem for p in (twin / 'VideoFlash').iterdir()) == sorted(names)
    assert sorted(p.stem for p in (twin / 'AudioWAV').iterdir()) == sorted(names)
    marker = json.loads((twin / synth_cremad.MARKER).read_text())
    assert marker['complete'] and marker['clips'] == len(names)
    assert not list(twin.rglob('*.tmp*')), 'temporary files left behind'


def test_flv_format(twin):
    name = listing(twin)[0]
    with av.open(str(twin / 'VideoFlash' / f'{name}.flv')) as container:
        assert 'flv' in container.format.name
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name in ('flv', 'flv1')
        assert (video.codec_context.width, video.codec_context.height) == (480, 360)
        assert float(video.average_rate) == 30
        assert sound.codec_context.name.startswith('mp3')
        assert sound.codec_context.sample_rate == 44100
        assert len(sound.codec_context.layout.channels) == 2


def test_wav_format_and_length_match_the_flv(twin):
    name = listing(twin)[0]
    with wave.open(str(twin / 'AudioWAV' / f'{name}.wav'), 'rb') as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        seconds = w.getnframes() / 16000
    frames, audio, fps, rate = media.read_flv(twin / 'VideoFlash' / f'{name}.flv')
    assert (fps, rate) == (30, 44100)
    assert abs(seconds - len(frames) / 30) < 1e-3
    assert abs(audio.shape[1] / 44100 - seconds) < 0.1  # MP3 adds encoder padding


def test_csvs_match_cremads_exact_format(twin, shared):
    real_demo = (shared / 'crema-d' / 'VideoDemographics.csv').read_bytes()
    real_names = (shared / 'crema-d' / 'SentenceFilenames.csv').read_bytes()
    demo = (twin / 'VideoDemographics.csv').read_bytes()
    names = (twin / 'SentenceFilenames.csv').read_bytes()
    assert demo.split(b'\n')[0] == real_demo.split(b'\n')[0] == \
        b'"ActorID","Age","Sex","Race","Ethnicity"'
    assert names.split(b'\n')[0] == real_names.split(b'\n')[0] == b'"Stimulus_Number","Filename"'
    assert b'\r' not in demo + names
    assert demo.endswith(b'\n') == real_demo.endswith(b'\n')
    assert names.endswith(b'\n') == real_names.endswith(b'\n')
    row = re.compile(rb'^\d{4},\d{2},"(Male|Female)","(African American|Asian|Caucasian|Unknown)",'
                     rb'"(Not Hispanic|Hispanic)"$')
    rows = demo.decode().splitlines()[1:]
    assert [r.split(',')[0] for r in rows] == ['1001', '1002', '1003']
    assert all(row.match(r.encode()) for r in rows), rows
    assert all(20 <= int(r.split(',')[1]) <= 74 for r in rows)
    numbered = names.decode().splitlines()[1:]
    assert all(re.fullmatch(r'\d+,"\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}"', r) for r in numbered)
    assert [int(r.split(',')[0]) for r in numbered] == list(range(1, len(numbered) + 1))


def test_names_follow_the_real_listings_order(twin, shared):
    real = listing(shared / 'crema-d')
    wanted = [n for n in real if n[:4] in ('1001', '1003') and n[5:8] in ('DFA', 'IEO')]
    ours = [n for n in listing(twin) if n[:4] in ('1001', '1003')]
    assert ours == wanted
    assert len(synth_cremad.clip_names([1001])) == 82


def test_parse_name():
    assert synth_cremad.parse_name('1001_IEO_HAP_LO') == \
        dict(actor=1001, sentence='IEO', emotion='HAP', level='LO')
    assert synth_cremad.parse_name('VideoFlash/1091_WSI_DIS_XX.flv')['actor'] == 1091
    for bad in ('1001_IEO_HAP', '1001_XYZ_HAP_LO', '1001_IEO_JOY_XX', 'abcd_IEO_HAP_XX'):
        with pytest.raises(synth_cremad.SynthError):
            synth_cremad.parse_name(bad)


def test_ground_truth_records_the_rendered_factors(twin):
    with open(twin / 'ground_truth.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['name'] for r in rows] == listing(twin)
    for column in ('actor', 'emotion', 'level', 'face_mouth_curve', 'face_brow_raise',
                   'voice_pitch_st', 'voice_tempo', 'voice_energy_db', 'skin_r', 'background_r',
                   'pitch_shift_st', 'noise_rms', 'pixel_noise', 'f0_hz', 'duration_s', 'frames'):
        assert column in rows[0], column
    row = rows[5]
    assert row['name'] == f'{row["actor"]}_{row["sentence"]}_{row["emotion"]}_{row["level"]}'
    frames, _, _ = decode(twin, row['name'])
    assert len(frames) == int(row['frames'])
    happy = [float(r['face_mouth_curve']) for r in rows if r['emotion'] == 'HAP']
    angry = [float(r['face_mouth_curve']) for r in rows if r['emotion'] == 'ANG']
    assert np.mean(happy) > np.mean(angry) + 0.5  # smiles vs frowns, as designed


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_clips_across_worker_counts(tmp_path):
    args = dict(num_actors=1, sentences='DFA', seed=3, **SHORT)
    one = synth_cremad.generate(tmp_path / 'a', workers=1, **args)
    two = synth_cremad.generate(tmp_path / 'b', workers=2, **args)
    other = synth_cremad.generate(tmp_path / 'c', workers=1, **dict(args, seed=4))
    assert one['clips'] == two['clips'] == other['clips'] == 6
    for name in listing(tmp_path / 'a'):
        a, b, c = decode(tmp_path / 'a', name), decode(tmp_path / 'b', name), \
            decode(tmp_path / 'c', name)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[2], c[2]) and not np.array_equal(a[0][0], c[0][0])
    for csv_name in ('ground_truth.csv', 'VideoDemographics.csv', 'SentenceFilenames.csv'):
        assert (tmp_path / 'a' / csv_name).read_bytes() == (tmp_path / 'b' / csv_name).read_bytes()


def test_interrupted_twin_is_resumed(tmp_path):
    root = tmp_path / 'twin'
    synth_cremad.generate(root, num_actors=1, sentences='TSI', **SHORT)
    wav = root / 'AudioWAV' / '1001_TSI_ANG_XX.wav'
    expected = wav.read_bytes()
    wav.unlink()  # as if killed before this clip was written
    marker = root / synth_cremad.MARKER
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), complete=False)))
    summary = synth_cremad.generate(root, num_actors=1, sentences='TSI', **SHORT)
    assert summary['rendered'] == 1 and wav.read_bytes() == expected


# ----------------------------------------------------------------------------- like=

def test_like_plans_the_real_clips_and_actors(shared):
    real = shared / 'crema-d'
    planned = synth_cremad.plan(num_actors=2, like=real)
    names = [n for n in listing(real) if n[:4] in ('1001', '1002')]
    assert planned['names'] == names and len(names) == 163  # 1002_TIE_NEU_XX is missing
    with open(real / 'VideoDemographics.csv', newline='') as f:
        demo = list(csv.DictReader(f))[:2]
    assert [{k: str(v) for k, v in r.items()} for r in planned['demographics']] == demo


def test_like_renders_the_listed_clips(tmp_path, shared):
    real = shared / 'crema-d'
    root = tmp_path / 'like'
    synth_cremad.generate(root, num_actors=2, like=real, sentences='TIE', **SHORT)
    names = [n for n in listing(real) if n[:4] in ('1001', '1002') and n[5:8] == 'TIE']
    assert listing(root) == names and len(names) == 11
    assert sorted(p.stem for p in (root / 'VideoFlash').iterdir()) == sorted(names)
    real_lines = (real / 'VideoDemographics.csv').read_text().splitlines(keepends=True)
    assert (root / 'VideoDemographics.csv').read_text() == ''.join(real_lines[:3])
    frames, _, samples = decode(root, names[0])
    assert frames.shape[1:] == (360, 480, 3) and len(samples) > 0


# ----------------------------------------------------------------------------- safety

def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(synth_cremad.SynthError, match='not a synthetic twin'):
        synth_cremad.generate(tmp_path, num_actors=1, sentences='TSI', **SHORT)
    assert [p.name for p in tmp_path.iterdir()] == ['notes.txt']


def test_reuses_its_own_twin_and_refuses_other_parameters(twin):
    def files():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in twin.rglob('*')}
    before = files()
    summary = synth_cremad.generate(root=twin, workers=2, progress=False, **TINY)
    assert summary['reused'] and summary['rendered'] == 0
    assert files() == before  # nothing rendered, rewritten or added
    with pytest.raises(synth_cremad.SynthError, match='other parameters.*seed=0'):
        synth_cremad.generate(root=twin, **dict(TINY, seed=1), progress=False)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_actors=0), 'num_actors'),
    (dict(num_actors=92), 'num_actors'),
    (dict(nuisance=1.5), 'nuisance'),
    (dict(seed=-1), 'seed'),
    (dict(duration_scale=0), 'duration_scale'),
    (dict(sentences='DFA,XYZ'), 'XYZ.*valid.*IEO, TIE'),
    (dict(like='/nonexistent'), 'VideoDemographics.csv'),
])
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(synth_cremad.SynthError, match=message) as error:
        synth_cremad.generate(tmp_path / 'x', **kwargs)
    assert '\n' not in str(error.value)
    assert not (tmp_path / 'x').exists()


def test_script_reports_bad_arguments_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'prepare.synth_cremad',
                             f'--root={tmp_path / "x"}', '--nuisance=2.0'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count('\n') == 0 and 'nuisance' in result.stderr


# ----------------------------------------------------------------------------- learnability

def test_each_modality_is_informative_and_together_they_are_better(tmp_path):
    """Complementarity, measured: a linear probe beats chance on either modality alone
    and clearly beats both with the two together."""
    root = tmp_path / 'probe'
    synth_cremad.generate(root, num_actors=10, sentences='TIE,DFA,ITS,TSI', workers=2,
                          duration_scale=0.5, progress=False)
    scores = synth_cremad.learnability(root, split='clip', workers=2)
    assert scores['test'] == 72
    assert scores['image'] > 0.3 and scores['audio'] > 0.3, scores
    assert scores['joint'] >= max(scores['image'], scores['audio']) + 0.05, scores
