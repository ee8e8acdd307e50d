"""Synthetic EmoVoxCeleb twin: face tracks, voices and a teacher's logits per frame.

Writes prepare/read_emo.py's layout (one track per key ``SPEAKER/VIDEO/00001``, VoxCeleb1
speaker ids id10001..): ``frames/KEY/000001.jpg ..`` (224x224 face crops at 30
fps), ``wav/KEY.wav`` (16 kHz mono 16-bit PCM) and ``logits/KEY.npy`` (frames, 8)
float32, plus ``ground_truth.csv`` (the factors rendered per track) and the marker
``.synth_emo.json`` (the parameters; complete once the twin is).

Faces and voices come from the twins' shared renderer (render.py). Each track
shows one FER+ expression (neutral, happiness, surprise, sadness, anger,
disgust, fear, contempt), drawn from an in-the-wild prior (mostly neutral and
happy). The voice follows the expression weakly (half the prototype's strength,
VoxCeleb's speech is not acted). The teacher is a noisy facial-expression
classifier of the rendered expression: frame t's logit for class k is
``TEACHER_BIAS - |face cues - prototype_k|^2 / TEACHER_WIDTH`` (about -12..4) plus
slowly varying per-frame noise (an AR(1) process), so the logits change from
frame to frame and the teacher's arg-max is sometimes another class, as a real
teacher's is. The rendered expression itself is constant over a track (the
renderer's cues are per clip); what moves is the mouth (speech), the head,
lighting noise and the teacher's noise.

Deterministic for a seed: each track draws from a generator seeded by (seed,
crc32(key)), each speaker by (seed, speaker); the output does not depend on the
number of workers.
"""
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.signal import resample_poly

from cmvq import atomic, media
from cmvq.pools import available_cores
import datasets
from cmvq.twins import render
from cmvq.twins.render import SynthError, rng_for


VERSION = 2                     # bump when rendering changes: old twins are not reused
MARKER = '.synth_emo.json'
MAX_SPEAKERS = 1251             # VoxCeleb1's identities
FIRST_SPEAKER = 10001
# Expression prior of the tracks (FER+ order): in the wild, mostly neutral and happy.
PRIOR = (0.35, 0.25, 0.1, 0.1, 0.08, 0.04, 0.04, 0.04)
# Face prototypes per FER+ class (render.FACE_CUES order: brow_raise, brow_slant,
# eye_open, mouth_curve, mouth_width); the shared ones plus disgust, fear, contempt.
FACE_PROTOTYPES = (render.FACE_RELAXED, render.FACE_SMILE, render.FACE_SURPRISED, render.FACE_SAD,
                   render.FACE_ANGRY, (-0.6, -0.2, -0.8, -0.7, 0.5), (1.0, 1.2, 1.4, -0.5, -0.4),
                   (0.0, -0.3, -0.3, 0.4, -0.6))
VOICE_PROTOTYPES = (render.VOICE_NEUTRAL, render.VOICE_HIGH, render.VOICE_SURPRISED,
                    render.VOICE_LOW, render.VOICE_HIGH, render.VOICE_LOW, render.VOICE_FEAR,
                    render.VOICE_NEUTRAL)
VOICE_STRENGTH = 0.5            # the voice carries half the expression's prototype
TEACHER_BIAS, TEACHER_WIDTH = 4.0, 0.75  # logit = bias - squared cue distance / width (+ noise)
TEACHER_NOISE, TEACHER_MEMORY = 0.6, 0.8  # AR(1) per-frame noise: sd and frame-to-frame memory
SYLLABLE_RANGE = (10, 16)       # syllables per utterance: 2.5-4 s at duration_scale 1
SKINS = ((232, 190, 165), (205, 155, 115), (180, 140, 95), (125, 85, 62))
# Render 288x288 with the face box near the top, keep the 224x224 square around the face.
FRAME = render.Frame(height=288, width=288, top=10, left=34, max_dy=5, max_dx=20)
CROP_TOP, CROP_LEFT, FACE_SIZE = 26, 32, 224
AUDIO_UP, AUDIO_DOWN = 160, 441  # 44.1 kHz render -> 16 kHz


# ----------------------------------------------------------------------------- planning

def track_keys(count, per_speaker):
    """'id10001/video01/00001', ... in speaker, track order."""
    return [f'id{FIRST_SPEAKER + s}/video{t + 1:02d}/00001' for s in range(count)
            for t in range(per_speaker)]


def speaker_traits(speaker, seed, nuisance):
    """Sex and emotion-irrelevant identity (face, voice) of one speaker."""
    rng = rng_for(seed, 'emo-speaker', speaker)
    male = bool(rng.random() < 0.55)
    skin = SKINS[int(rng.integers(len(SKINS)))]
    return dict(render.draw_traits(rng, male, skin, nuisance), sex='Male' if male else 'Female')


def track_factors(key, traits, seed, nuisance, duration_scale):
    """Every factor rendered in track ``key`` (a flat dict: one ground_truth.csv row)."""
    rng = rng_for(seed, 'emo', key)
    label = int(rng.choice(len(PRIOR), p=PRIOR))
    scale = traits['expressiveness']
    cues = render.draw_cues(rng, FACE_PROTOTYPES[label],
                           np.multiply(VOICE_PROTOTYPES[label], VOICE_STRENGTH), scale)
    out = dict(name=key, speaker=key.split('/')[0], sex=traits['sex'], label=label,
               expression=datasets.FERPLUS[label], sentence=key, intensity=round(scale, 4),
               **cues)
    syllables = int(rng.integers(SYLLABLE_RANGE[0], SYLLABLE_RANGE[1] + 1))
    return render.draw_factors(out, rng, traits, nuisance, duration_scale, syllables)


def teacher_logits(f, rng):
    """(frames, 8) float32: the teacher's logits for the rendered expression, frame by frame."""
    cues = np.array([f[f'face_{c}'] for c in render.FACE_CUES])
    clean = TEACHER_BIAS - ((cues - np.array(FACE_PROTOTYPES)) ** 2).sum(1) / TEACHER_WIDTH
    noise = np.empty((f['frames'], len(clean)))
    noise[0] = rng.normal(0, TEACHER_NOISE, len(clean))
    innovation = TEACHER_NOISE * np.sqrt(1 - TEACHER_MEMORY ** 2)
    for t in range(1, f['frames']):
        noise[t] = TEACHER_MEMORY * noise[t - 1] + rng.normal(0, innovation, len(clean))
    return (clean + noise).astype(np.float32)


# ----------------------------------------------------------------------------- tracks

def render_track(job):
    """Render one track and write it (write_track); returns (key, frames)."""
    out_root, f, traits, seed, duration_scale = job
    rng = rng_for(seed, 'emo', f['name'], 'render')
    audio, loudness = render.render_audio(f, traits, duration_scale, rng)
    frames = render.render_video(f, traits, loudness, rng, FRAME)
    faces = frames[:, CROP_TOP:CROP_TOP + FACE_SIZE, CROP_LEFT:CROP_LEFT + FACE_SIZE]
    logits = teacher_logits(f, rng_for(seed, 'emo', f['name'], 'teacher'))
    write_track(out_root, f['name'], faces, resample_poly(audio, AUDIO_UP, AUDIO_DOWN),
                         logits)
    return f['name'], len(faces)


def _done(root, key, frames):
    folder, wav, npy = datasets.track_paths(root, key)
    return wav.is_file() and npy.is_file() and (folder / datasets.frame_name(frames - 1)).is_file()


# ----------------------------------------------------------------------------- generate

def generate(root, *, num_speakers=24, tracks_per_speaker=8, seed=0, workers=1, nuisance=0.5,
             duration_scale=1.0, progress=True):
    """Write a synthetic EmoVoxCeleb tree at ``root``; returns a summary dict.

    Reuses a complete twin made with the same parameters, resumes an interrupted
    one, refuses any other non-empty folder.
    """
    params = _check(num_speakers, tracks_per_speaker, seed, workers, nuisance, duration_scale)
    root = Path(root)
    keys = track_keys(num_speakers, tracks_per_speaker)
    if render.check_root(root, MARKER, params):
        return dict(root=str(root), tracks=len(keys), rendered=0, reused=True, seconds=0.0)
    speakers = dict.fromkeys(k.split('/')[0] for k in keys)  # in order, once each
    traits = {s: speaker_traits(s, seed, nuisance) for s in speakers}
    factors = [track_factors(k, traits[k.split('/')[0]], seed, nuisance, duration_scale)
               for k in keys]
    root.mkdir(parents=True, exist_ok=True)
    atomic.write_json(root / MARKER, dict(params, complete=False))
    jobs = [(str(root), f, traits[f['speaker']], seed, duration_scale) for f in factors
            if not _done(root, f['name'], f['frames'])]
    seconds = render.run_jobs(render_track, jobs, workers or available_cores(), progress,
                             'synth_emo')
    atomic.write_bytes(root / 'ground_truth.csv', render.csv_text(factors))
    atomic.write_json(root / MARKER, dict(params, complete=True, tracks=len(factors)))
    if progress:
        print(f'synth_emo: {len(keys)} tracks in {root} ({len(jobs)} rendered in '
              f'{seconds:.1f} s)')
    return dict(root=str(root), tracks=len(keys), rendered=len(jobs), reused=False,
                seconds=round(seconds, 2))


def _check(num_speakers, tracks_per_speaker, seed, workers, nuisance, duration_scale):
    """Validate the arguments; returns the parameters recorded in the marker."""
    if not (isinstance(num_speakers, int) and 1 <= num_speakers <= MAX_SPEAKERS):
        raise SynthError(f'num_speakers={num_speakers!r} must be an int in 1..{MAX_SPEAKERS}')
    if not (isinstance(tracks_per_speaker, int) and not isinstance(tracks_per_speaker, bool)
            and tracks_per_speaker >= 1):
        raise SynthError(f'tracks_per_speaker={tracks_per_speaker!r} must be an int >= 1')
    render.check_common(seed, workers, nuisance, duration_scale)
    return dict(generator='synth_emo', version=VERSION, num_speakers=num_speakers,
                tracks_per_speaker=tracks_per_speaker, seed=seed, nuisance=float(nuisance),
                duration_scale=float(duration_scale))


def write_track(root, key, frames, audio, logits, quality=90):
    """Write one track in the layout above (each file atomically).

    frames: (T, H, W, 3) uint8 RGB face crops; audio: (N,) float in [-1, 1] at
    16 kHz; logits: (T, 8) teacher logits, FER+ order.
    """
    folder, wav, npy = datasets.track_paths(root, key)
    logits = np.asarray(logits, np.float32)
    if logits.shape != (len(frames), len(datasets.FERPLUS)):
        raise SynthError(f'{key}: logits {logits.shape} for {len(frames)} frames; expected '
                         f'({len(frames)}, {len(datasets.FERPLUS)})')
    for path in (folder, wav.parent, npy.parent):
        path.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(frames):
        atomic.write(folder / datasets.frame_name(k),
                     lambda p, f=frame: Image.fromarray(f).save(p, 'JPEG', quality=quality))
    atomic.write(wav, lambda p: media.write_wav(p, audio, datasets.EMO_RATE))
    atomic.write(npy, lambda p: np.save(p, logits))
