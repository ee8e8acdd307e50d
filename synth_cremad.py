"""Synthetic CREMA-D twin: the same tree, formats and names, with known factors.

    python synth_cremad.py                          # 91 actors x 82 clips in synth_cremad/CREMA-D
    python synth_cremad.py --num_actors=4 --workers=2 --root=/tmp/twin
    python synth_cremad.py --like=../shared/crema-d  # exactly the clips of a real listing

The tree matches CREMA-D: ``VideoFlash/NAME.flv`` (480x360 flv1 video at 30 fps,
stereo 44.1 kHz MP3), ``AudioWAV/NAME.wav`` (16 kHz mono 16-bit PCM),
``VideoDemographics.csv`` and ``SentenceFilenames.csv`` (same headers, quoting and
line endings), plus ``ground_truth.csv`` (the factors rendered per clip) and the
marker ``.synth_cremad.json`` (the parameters; written last, when the twin is complete).

Content. A parametric face (hair, skin, eyes, brows, nose, mouth) drawn with numpy
in the top-centre region the loader crops, on a per-actor background, with small head
motion, lighting and pixel noise; its mouth opens with the loudness of the speech. The
voice is a harmonic source with a pitch contour (declination, stressed-syllable
accents), spectral tilt and three formants per syllable, one syllable per spoken
syllable of the sentence, with consonant noise bursts between them.

Emotion cues (prototype vectors, scaled by the level's intensity LO 0.5 / MD 0.75 /
HI 1.0 / XX 0.8 and a per-actor expressiveness, plus per-clip jitter):

    emotion | face cues                          | voice cues
    --------+------------------------------------+------------------------------------
    NEU     | relaxed (all cues 0)               | neutral (all cues 0)
    DIS     | relaxed, same as NEU               | low, slow, quiet, dull (as SAD)
    SAD     | inner brows up, wide eyes, frown   | low, slow, quiet, dull
    FEA     | same as SAD                        | highest pitch, flat, fast, tremor
    HAP     | smile, wide mouth, narrowed eyes   | high, lively, loud, bright (as ANG)
    ANG     | brows down and in, tight frown     | high, lively, loud, bright

Complementary by design: the face confuses NEU~DIS and FEA~SAD (identical
prototypes) but separates HAP from ANG and SAD from DIS; the voice confuses HAP~ANG
and SAD~DIS but separates FEA from SAD and NEU from DIS. Each modality alone has four
distinguishable groups (at best 4/6 correct); together all six emotions separate.

Contradictory by design (emotion-irrelevant, strength ``nuisance`` in 0..1): actor
identity (face shape, hair, skin tone, clothes, background, base pitch, vocal-tract
length), per-clip lighting, head position and motion, pixel noise, pitch shift,
recording gain and background noise. Sex sets the base pitch (like real voices) at
any strength. Every rendered factor is in ``ground_truth.csv``.

Deterministic for a seed: each clip draws from its own generator seeded by
(seed, crc32(name)), each actor by (seed, actor id), so a clip is identical whatever
the number of workers or the other clips rendered.
"""
import csv
import json
import math
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.signal import lfilter, resample_poly

import atomic
import media

# ----------------------------------------------------------------------------- config
root = 'synth_cremad/CREMA-D'   # output folder (must be empty, missing, or a twin made here)
num_actors = 91                 # 1..91: actors 1001..(1000 + num_actors)
seed = 0                        # any int >= 0
like = None                     # None, or a CREMA-D checkout / folder holding its two CSVs
workers = 0                     # processes; 0: all cores
nuisance = 0.5                  # 0..1 strength of emotion-irrelevant variation
sentences = 'all'               # 'all' or comma list of codes, e.g. 'DFA,IEO'
duration_scale = 1.0            # 1.0: CREMA-D-like 2-3 s clips; tests use 0.5
measure = False                 # True: then print linear-probe accuracies (image/audio/joint)
# -----------------------------------------------------------------------------

VERSION = 2                     # bump when rendering changes: old twins are not reused
MARKER = '.synth_cremad.json'
FIRST_ACTOR, MAX_ACTORS = 1001, 91
# CREMA-D's codes in the order of its SentenceFilenames.csv listing.
SENTENCE_CODES = ('IEO', 'TIE', 'IOM', 'IWW', 'TAI', 'MTI', 'IWL', 'ITH', 'DFA', 'ITS',
                  'TSI', 'WSI')
EMOTION_CODES = ('NEU', 'HAP', 'SAD', 'ANG', 'FEA', 'DIS')
LEVEL_CODES = ('LO', 'MD', 'HI')
LEVEL_INTENSITY = {'LO': 0.5, 'MD': 0.75, 'HI': 1.0, 'XX': 0.8}
# Spoken syllables of each sentence ("It's eleven o'clock" = 5, ...).
SYLLABLES = {'IEO': 5, 'TIE': 8, 'IOM': 8, 'IWW': 8, 'TAI': 7, 'MTI': 9, 'IWL': 8,
             'ITH': 10, 'DFA': 6, 'ITS': 7, 'TSI': 5, 'WSI': 9}

# Face cues: brow_raise, brow_slant (+ inner end up), eye_open, mouth_curve (+ smile),
# mouth_width. Confused pairs share a prototype exactly.
FACE_CUES = ('brow_raise', 'brow_slant', 'eye_open', 'mouth_curve', 'mouth_width')
_FACE_SAD = (0.6, 1.0, 0.7, -0.8, -0.1)
FACE_PROTOTYPES = {'NEU': (0, 0, 0, 0, 0), 'DIS': (0, 0, 0, 0, 0),
                   'SAD': _FACE_SAD, 'FEA': _FACE_SAD,
                   'HAP': (0.2, 0.0, -0.5, 1.0, 0.7),
                   'ANG': (-1.0, -1.0, -0.4, -0.5, -0.6)}
FACE_JITTER = (0.25, 0.25, 0.25, 0.25, 0.25)
# Voice cues: pitch (semitones), pitch_range (log2 of contour excursion), tempo (log2 of
# speaking rate), energy (dB), tilt (octaves of the source's low-pass corner), tremor.
VOICE_CUES = ('pitch_st', 'pitch_range', 'tempo', 'energy_db', 'tilt', 'tremor')
_VOICE_HIGH, _VOICE_LOW = (3.0, 0.7, 0.15, 6.0, 1.0, 0.0), (-3.0, -0.6, -0.3, -6.0, -1.0, 0.0)
VOICE_PROTOTYPES = {'NEU': (0, 0, 0, 0, 0, 0), 'FEA': (6.0, -0.4, 0.3, 1.0, 0.3, 1.0),
                    'HAP': _VOICE_HIGH, 'ANG': _VOICE_HIGH, 'SAD': _VOICE_LOW, 'DIS': _VOICE_LOW}
VOICE_JITTER = (1.2, 0.2, 0.08, 2.0, 0.3, 0.2)

# CREMA-D-like marginals for synthetic actors (from the real VideoDemographics.csv).
SEXES, SEX_P = ('Male', 'Female'), (48 / 91, 43 / 91)
RACES, RACE_P = ('African American', 'Asian', 'Caucasian', 'Unknown'), (0.24, 0.08, 0.66, 0.02)
ETHNICITIES, ETHNICITY_P = ('Not Hispanic', 'Hispanic'), (0.89, 0.11)
SKIN_BY_RACE = {'African American': (120, 80, 60), 'Asian': (220, 180, 140),
                'Caucasian': (228, 185, 160), 'Unknown': (190, 145, 110)}
NEUTRAL_SKIN = (200, 160, 130)

FPS, RATE = media.VIDEO_FPS, media.AUDIO_RATE
HOP = RATE // FPS               # audio samples per video frame (1470)
LO_PIX, HI_PIX = 20, 235        # palette bounds: room for +-15 noise without wrapping
MOUTH_LEVELS = 8                # mouth openings rendered per clip (speech follows these)
# Face box: the part of the frame holding hair, head and neck; it moves with the head.
LAYER_TOP, LAYER_LEFT, LAYER_H, LAYER_W = 24, 130, 261, 220
SHIRT_TOP, MAX_DY, MAX_DX = 290, 5, 40
FACE_CY, FACE_CX = 128, 110     # face centre in layer coordinates (frame y 152, x 240)
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410),
          (300, 870, 2240), (500, 1500, 2500), (660, 1720, 2410))


class SynthError(ValueError):
    """A bad argument or an output folder we must not touch; the message says why."""


# ----------------------------------------------------------------------------- planning

def rng_for(seed, *keys):
    """Generator seeded by (seed, crc32 of each key): stable across runs and processes."""
    words = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def parse_name(name):
    """'1001_IEO_HAP_LO' -> dict(actor=1001, sentence='IEO', emotion='HAP', level='LO')."""
    parts = Path(name).stem.split('_')
    if len(parts) != 4 or not parts[0].isdigit():
        raise SynthError(f'{name!r} is not a CREMA-D name ACTOR_SENTENCE_EMOTION_LEVEL')
    actor, sentence, emotion, level = parts
    if sentence not in SENTENCE_CODES or emotion not in EMOTION_CODES \
            or level not in LEVEL_CODES + ('XX',):
        raise SynthError(f'{name!r}: unknown sentence, emotion or level code')
    return dict(actor=int(actor), sentence=sentence, emotion=emotion, level=level)


def parse_sentences(text):
    """'all' or 'DFA,IEO' -> tuple of codes in CREMA-D's listing order."""
    if text == 'all':
        return SENTENCE_CODES
    codes = [c.strip().upper() for c in str(text).split(',') if c.strip()]
    bad = [c for c in codes if c not in SENTENCE_CODES]
    if bad or not codes:
        raise SynthError(f'sentences={text!r}: unknown code(s) {", ".join(bad) or "(none)"}; '
                         f"valid: 'all' or a comma list of {', '.join(SENTENCE_CODES)}")
    return tuple(c for c in SENTENCE_CODES if c in codes)


def clip_names(actors, codes=SENTENCE_CODES):
    """Names of every clip of ``actors`` in the real listing's order (82 per actor)."""
    names = []
    for actor in actors:
        for sentence in codes:
            for emotion in EMOTION_CODES:
                levels = LEVEL_CODES if sentence == 'IEO' and emotion != 'NEU' else ('XX',)
                names += [f'{actor}_{sentence}_{emotion}_{level}' for level in levels]
    return names


def synthetic_demographics(count, seed):
    """CREMA-D-like demographics rows for actors 1001.. (each drawn from its own id)."""
    rows = []
    for actor in range(FIRST_ACTOR, FIRST_ACTOR + count):
        rng = rng_for(seed, 'demographics', actor)
        age = int(np.clip(20 + rng.gamma(2.0, 8.5), 20, 74))
        rows.append(dict(ActorID=actor, Age=age, Sex=str(rng.choice(SEXES, p=SEX_P)),
                         Race=str(rng.choice(RACES, p=RACE_P)),
                         Ethnicity=str(rng.choice(ETHNICITIES, p=ETHNICITY_P))))
    return rows


def read_like(folder, count, codes):
    """(demographics rows, clip names) of a real listing: its first ``count`` actors."""
    folder = Path(folder)
    demo_csv, names_csv = folder / 'VideoDemographics.csv', folder / 'SentenceFilenames.csv'
    if not (demo_csv.is_file() and names_csv.is_file()):
        raise SynthError(f'like={str(folder)!r} holds no VideoDemographics.csv and '
                         'SentenceFilenames.csv (give a CREMA-D checkout or a folder with both)')
    with open(demo_csv, newline='') as f:
        rows = [dict(r, ActorID=int(r['ActorID']), Age=int(r['Age']))
                for r in csv.DictReader(f)][:count]
    actors = {r['ActorID'] for r in rows}
    with open(names_csv, newline='') as f:
        names = [r['Filename'] for r in csv.DictReader(f)]
    keep = [n for n in names if parse_name(n)['actor'] in actors
            and parse_name(n)['sentence'] in codes]
    return rows, keep


def plan(num_actors=MAX_ACTORS, seed=0, like=None, sentences='all'):
    """What generate() renders, without rendering: dict(demographics, names)."""
    if not (isinstance(num_actors, int) and 1 <= num_actors <= MAX_ACTORS):
        raise SynthError(f'num_actors={num_actors!r} must be an int in 1..{MAX_ACTORS}')
    codes = parse_sentences(sentences)
    if like is not None:
        demographics, names = read_like(like, num_actors, codes)
    else:
        demographics = synthetic_demographics(num_actors, seed)
        names = clip_names([r['ActorID'] for r in demographics], codes)
    return dict(demographics=demographics, names=names)


# ----------------------------------------------------------------------------- factors

def actor_traits(row, seed, nuisance):
    """Emotion-irrelevant identity of one actor (face, voice), scaled by ``nuisance``."""
    rng, n = rng_for(seed, 'actor', row['ActorID']), nuisance
    male = row['Sex'] == 'Male'
    skin = np.array(SKIN_BY_RACE.get(row['Race'], NEUTRAL_SKIN), float) + rng.normal(0, 12, 3)
    return dict(
        f0_hz=(115.0 if male else 205.0) * 2 ** (n * rng.normal(0, 3) / 12),
        formant_scale=(1.0 if male else 1.15) * math.exp(n * rng.normal(0, 0.08)),
        rate=math.exp(n * rng.normal(0, 0.1)),
        expressiveness=float(np.clip(rng.normal(1, 0.15), 0.6, 1.4)),
        skin=_mix(NEUTRAL_SKIN, skin, n), hair=_mix((90, 60, 40), rng.uniform(20, 200, 3), n),
        shirt=_mix((70, 90, 120), rng.uniform(30, 230, 3), n),
        background=_mix((150, 150, 150), rng.uniform(40, 230, 3), n),
        face_w=1 + n * rng.normal(0, 0.08), face_h=1 + n * rng.normal(0, 0.06),
        eye_gap=1 + n * rng.normal(0, 0.08), fringe=float(n * rng.uniform(-1, 1)))


def _mix(neutral, actor, n):
    """Blend a neutral colour toward the actor's own by the nuisance strength."""
    pairs = zip(neutral, actor, strict=True)
    return [float(np.clip(a + n * (b - a), LO_PIX, HI_PIX)) for a, b in pairs]


def clip_factors(name, traits, seed, nuisance, duration_scale):
    """Every factor rendered in clip ``name`` (a flat dict: one ground_truth.csv row)."""
    info = parse_name(name)
    rng, n = rng_for(seed, name), nuisance
    scale = LEVEL_INTENSITY[info['level']] * traits['expressiveness']
    face = np.array(FACE_PROTOTYPES[info['emotion']]) * scale + rng.normal(0, FACE_JITTER)
    voice = np.array(VOICE_PROTOTYPES[info['emotion']]) * scale + rng.normal(0, VOICE_JITTER)
    out = dict(name=name, **info, intensity=round(scale, 4))
    out.update({f'face_{k}': v for k, v in zip(FACE_CUES, face, strict=True)})
    out.update({f'voice_{k}': v for k, v in zip(VOICE_CUES, voice, strict=True)})
    out.update(
        pitch_shift_st=n * rng.normal(0, 1.5), gain_db=n * rng.normal(0, 2.0),
        noise_rms=n * rng.uniform(0.002, 0.02), light=1 + n * rng.normal(0, 0.08),
        head_x=n * rng.normal(0, 4), head_y=n * rng.normal(0, 3),
        head_motion_px=1 + n * rng.uniform(0, 3), pixel_noise=round(n * rng.uniform(4, 14)))
    out['f0_hz'] = traits['f0_hz'] * 2 ** ((out['voice_pitch_st'] + out['pitch_shift_st']) / 12)
    syllables = _syllable_plan(info['sentence'])
    per_syllable = 0.2 * duration_scale / traits['rate'] / 2 ** out['voice_tempo']
    lengths = per_syllable * (1 + 0.35 * syllables['stress'])
    edge = 0.35 * duration_scale
    out.update(syllables=len(lengths), speech_s=float(lengths.sum()),
               frames=int(math.ceil((2 * edge + lengths.sum()) * FPS)))
    out['duration_s'] = out['frames'] / FPS
    for key in ('skin', 'hair', 'background'):
        out.update({f'{key}_{c}': v for c, v in zip('rgb', traits[key], strict=True)})
    out.update(actor_f0_hz=traits['f0_hz'], formant_scale=traits['formant_scale'])
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v)
            for k, v in out.items()}


def _syllable_plan(sentence):
    """Stress pattern, vowels and consonant onsets of a sentence: same for every actor."""
    rng = rng_for(0, 'sentence', sentence)
    count = SYLLABLES[sentence]
    return dict(stress=(rng.random(count) < 0.4).astype(float),
                vowel=rng.integers(0, len(VOWELS), count), onset=rng.random(count) < 0.7)


# ----------------------------------------------------------------------------- audio

def render_audio(f, traits, duration_scale, rng):
    """Speech at 44.1 kHz (frames * 1470 samples) and its loudness per video frame."""
    total = f['frames'] * HOP
    plan_ = _syllable_plan(f['sentence'])
    lengths = f['speech_s'] * (1 + 0.35 * plan_['stress']) / (1 + 0.35 * plan_['stress']).sum()
    starts = 0.35 * duration_scale + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    t = np.arange(total) / RATE
    phase = 2 * np.pi * np.cumsum(_pitch_contour(f, t, starts, lengths, plan_)) / RATE
    source = _tilt(2 * ((phase / (2 * np.pi)) % 1.0) - 1, f['voice_tilt'])
    speech = np.zeros(total)
    for k, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        a, b = int(start * RATE), min(total, int((start + length) * RATE))
        formants = np.array(VOWELS[plan_['vowel'][k]]) * traits['formant_scale']
        speech[a:b] += _formants(source[a:b], formants) * _syllable_envelope(b - a)
        if plan_['onset'][k]:
            burst = min(a, int(0.04 * duration_scale * RATE))
            speech[a - burst:a] += 0.3 * np.diff(rng.normal(size=burst + 1))
    speech *= 0.05 * 10 ** ((f['voice_energy_db'] + f['gain_db']) / 20) / _rms(speech)
    loudness = np.sqrt((speech.reshape(-1, HOP) ** 2).mean(axis=1))
    noise = lfilter([1.0], [1.0, -0.7], rng.normal(0, f['noise_rms'] * 0.7, total))
    return np.clip(speech + noise, -0.99, 0.99), loudness


def _pitch_contour(f, t, starts, lengths, plan_):
    """f0 (Hz) per sample: declination, accents on stressed syllables, fear's tremor."""
    span = 2 ** f['voice_pitch_range']
    speech_t = np.clip((t - starts[0]) / max(lengths.sum(), 1e-3), 0, 1)
    semitones = span * (1.5 - 3.0 * speech_t)
    for start, length, stress in zip(starts, lengths, plan_['stress'], strict=True):
        a, b = int(start * RATE), min(len(t), int((start + length) * RATE))
        inside = (t[a:b] - start) / length
        semitones[a:b] += span * (0.8 + 1.5 * stress) * np.sin(np.pi * inside) ** 2
    semitones += 0.6 * max(f['voice_tremor'], 0) * np.sin(2 * np.pi * 6.0 * t)
    return f['f0_hz'] * 2 ** (semitones / 12)


def _tilt(source, tilt):
    """One-pole low-pass whose corner moves an octave per unit of tilt (bright vs dull)."""
    corner = 1200.0 * 2 ** np.clip(tilt, -3, 3)
    pole = math.exp(-2 * math.pi * corner / RATE)
    return lfilter([1 - pole], [1, -pole], source)


def _formants(source, freqs):
    """Parallel two-pole resonators at the vowel's three formants."""
    out = np.zeros_like(source)
    for freq, gain, width in zip(freqs, (1.0, 0.6, 0.3), (90.0, 110.0, 160.0), strict=True):
        r = math.exp(-math.pi * width / RATE)
        theta = 2 * math.pi * min(freq, 0.45 * RATE) / RATE
        out += gain * lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], source)
    return out


def _syllable_envelope(n):
    """Fast attack, plateau, slower release: a vowel's loudness over its syllable."""
    u = np.linspace(0, 1, n, endpoint=False)
    return np.minimum(1, u / 0.12) * np.minimum(1, (1 - u) / 0.3)


def _rms(x):
    return max(float(np.sqrt(np.mean(x ** 2))), 1e-9)


# ----------------------------------------------------------------------------- video

def render_video(f, traits, loudness, rng):
    """(frames, 360, 480, 3) uint8: the face box pasted over a static background, plus noise."""
    background = _background(traits, f['light'])
    openings = np.clip(loudness / max(loudness.max(), 1e-9), 0, 1) ** 0.7
    levels = np.minimum((openings * MOUTH_LEVELS).astype(int), MOUTH_LEVELS - 1)
    layers = _face_layers(f, traits, background)
    frames = np.empty((f['frames'], media.VIDEO_HEIGHT, media.VIDEO_WIDTH, 3), np.uint8)
    frames[:] = background
    dy, dx = _head_path(f, rng)
    for i in range(f['frames']):
        y, x = LAYER_TOP + dy[i], LAYER_LEFT + dx[i]
        frames[i, y:y + LAYER_H, x:x + LAYER_W] = layers[levels[i]]
    _add_noise(frames, int(f['pixel_noise']), rng)
    return frames


def _head_path(f, rng):
    """Integer (dy, dx) per frame: a per-clip offset plus slow sway. The face box is
    opaque (it carries its own background), which is invisible on a vertical gradient
    as long as it never reaches the shirt: hence dy within +-MAX_DY."""
    t = np.arange(f['frames']) / FPS
    phase = rng.uniform(0, 2 * np.pi, 2)
    amp = f['head_motion_px']
    dx = f['head_x'] + amp * np.sin(2 * np.pi * 0.7 * t + phase[0])
    dy = f['head_y'] + 0.6 * amp * np.sin(2 * np.pi * 0.5 * t + phase[1])
    dx = np.clip(np.round(dx), -MAX_DX, MAX_DX).astype(int)
    return np.clip(np.round(dy), -MAX_DY, MAX_DY).astype(int), dx


def _add_noise(frames, amplitude, rng):
    """Uniform pixel noise in place. Every palette colour lies in [20, 235] and the
    noise within +-15, so uint8 addition of the noise's two's complement never wraps
    (and is several times faster than an int16 round trip)."""
    amplitude = min(amplitude, 15)
    if amplitude <= 0:
        return
    pad = 16
    pool = rng.integers(-amplitude, amplitude + 1, (frames.shape[1] + pad,
                                                    frames.shape[2] + pad, 3), dtype=np.int8)
    pool = pool.view(np.uint8)
    offsets = rng.integers(0, pad, (len(frames), 2))
    h, w = frames.shape[1:3]
    for frame, (oy, ox) in zip(frames, offsets, strict=True):
        frame += pool[oy:oy + h, ox:ox + w]


def _colour(rgb, light=1.0):
    return np.clip(np.asarray(rgb, float) * light, LO_PIX, HI_PIX).astype(np.uint8)


def _background(traits, light):
    """Vertical gradient of the actor's background colour and a shirt at the bottom."""
    h, w = media.VIDEO_HEIGHT, media.VIDEO_WIDTH
    shade = np.linspace(1.1, 0.85, h)[:, None, None]
    image = np.clip(np.asarray(traits['background']) * light * shade, LO_PIX, HI_PIX)
    image = np.broadcast_to(image, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    neck = (yy > 200) & (np.abs(xx - w // 2) < 29 * traits['face_w'])
    image[neck] = _colour(traits['skin'], light * 0.85)
    shirt = (yy >= SHIRT_TOP) & (np.abs(xx - w // 2) < 95 + (yy - SHIRT_TOP) * 1.5)
    image[shirt] = _colour(traits['shirt'], light)
    return image


def _face_layers(f, traits, background):
    """The face box (hair, head, neck, features on the background), one per mouth opening."""
    light = f['light']
    yy, xx = np.mgrid[0:LAYER_H, 0:LAYER_W].astype(np.float32)
    cy, cx = FACE_CY, FACE_CX
    ry, rx = 92 * traits['face_h'], 70 * traits['face_w']
    skin, hair = _colour(traits['skin'], light), _colour(traits['hair'], light)
    layer = background[LAYER_TOP:LAYER_TOP + LAYER_H, LAYER_LEFT:LAYER_LEFT + LAYER_W].copy()
    hair_back = _ellipse(yy, xx, cy - 8, cx, ry * 1.08, rx * 1.14)
    neck = (np.abs(xx - cx) < 29 * traits['face_w']) & (yy > cy + ry * 0.5)
    face = _ellipse(yy, xx, cy, cx, ry, rx)
    layer[hair_back] = hair
    layer[neck] = _colour(traits['skin'], light * 0.85)
    layer[face] = skin
    fringe = face & (yy < cy - ry * (0.55 + 0.1 * traits['fringe'])
                     + 6 * np.sin(xx / 9.0) * traits['fringe'])
    layer[fringe] = hair
    layer[_ellipse(yy, xx, cy + ry * 0.12, cx, 15, 7)] = _colour(traits['skin'], light * 0.88)
    _draw_eyes_and_brows(layer, yy, xx, f, traits, ry, rx, light)
    return [_draw_mouth(layer.copy(), yy, xx, f, ry, rx, k / (MOUTH_LEVELS - 1), light)
            for k in range(MOUTH_LEVELS)]


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _draw_eyes_and_brows(layer, yy, xx, f, traits, ry, rx, light):
    """Eyes open with eye_open; brows rise with brow_raise and tilt with brow_slant."""
    eye_y = FACE_CY - ry * 0.12
    eye_ry = 6.5 * (1 + 0.45 * np.clip(f['face_eye_open'], -1.6, 1.6))
    for side in (-1, 1):
        eye_x = FACE_CX + side * rx * 0.4 * traits['eye_gap']
        white = _ellipse(yy, xx, eye_y, eye_x, eye_ry, 13)
        layer[white] = _colour((232, 232, 228), light)
        layer[white & _ellipse(yy, xx, eye_y, eye_x, 5.5, 5.5)] = _colour((40, 30, 25), light)
        inner_x, outer_x = FACE_CX + side * 10, FACE_CX + side * rx * 0.72
        base = eye_y - 18 - 11 * f['face_brow_raise']
        inner_y, outer_y = base - 9 * f['face_brow_slant'], base + 4 * f['face_brow_slant']
        along = (xx - inner_x) / (outer_x - inner_x)
        line_y = inner_y + along * (outer_y - inner_y)
        brow = (along >= 0) & (along <= 1) & (np.abs(yy - line_y) < 4)
        layer[brow] = _colour(np.asarray(traits['hair']) * 0.6, light)


def _draw_mouth(layer, yy, xx, f, ry, rx, opening, light):
    """Lips along a curve (corners up for a smile), open by ``opening`` (0..1)."""
    my = FACE_CY + ry * 0.5
    half = rx * 0.38 * (1 + 0.3 * np.clip(f['face_mouth_width'], -1.5, 1.5))
    u = (xx - FACE_CX) / half
    inside = np.abs(u) <= 1
    mid = my - 13 * f['face_mouth_curve'] * (u ** 2 - 1 / 3)
    gap = opening * 15 * np.sqrt(np.clip(1 - u ** 2, 0, 1))
    distance = np.abs(yy - mid)
    layer[inside & (distance < gap / 2 + 3)] = _colour((170, 80, 80), light)
    layer[inside & (distance < gap / 2)] = _colour((60, 25, 30), light)
    return layer


# ----------------------------------------------------------------------------- clips

def render_clip(job):
    """Render one clip and write it atomically; returns (name, flv bytes, wav bytes)."""
    out_root, f, traits, seed, duration_scale = job
    rng = rng_for(seed, f['name'], 'render')
    audio, loudness = render_audio(f, traits, duration_scale, rng)
    frames = render_video(f, traits, loudness, rng)
    flv = Path(out_root) / 'VideoFlash' / f'{f["name"]}.flv'
    wav = Path(out_root) / 'AudioWAV' / f'{f["name"]}.wav'
    atomic.write(flv, lambda p: media.write_flv(p, frames, audio.astype(np.float32)))
    atomic.write(wav, lambda p: media.write_wav(p, resample_poly(audio, 160, 441)))
    return f['name'], flv.stat().st_size, wav.stat().st_size


def _render_chunk(jobs):
    return [render_clip(job) for job in jobs]


# ----------------------------------------------------------------------------- generate

def generate(root, *, num_actors=MAX_ACTORS, seed=0, like=None, workers=1, nuisance=0.5,
             sentences='all', duration_scale=1.0, progress=True):
    """Write a synthetic CREMA-D tree at ``root``; returns a summary dict.

    Reuses ``root`` at once when it holds a complete twin made with the same
    parameters, resumes one interrupted with the same parameters, and refuses any
    other non-empty folder. workers: processes (0: all cores); the output does not
    depend on it.
    """
    params = _check(num_actors, seed, like, workers, nuisance, sentences, duration_scale)
    root = Path(root)
    if _ready(root, params):
        clips = len(plan(num_actors, seed, like, sentences)['names'])
        return dict(root=str(root), clips=clips, rendered=0, reused=True, seconds=0.0)
    planned = plan(num_actors, seed, like, sentences)
    traits = {r['ActorID']: actor_traits(r, seed, nuisance) for r in planned['demographics']}
    factors = [clip_factors(n, traits[parse_name(n)['actor']], seed, nuisance, duration_scale)
               for n in planned['names']]
    for sub in ('VideoFlash', 'AudioWAV'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    atomic.write_json(root / MARKER, dict(params, complete=False))
    todo = [f for f in factors if not _done(root, f['name'])]
    jobs = [(str(root), f, traits[f['actor']], seed, duration_scale) for f in todo]
    start = time.time()
    _run_jobs(jobs, workers or os.cpu_count(), progress)
    seconds = time.time() - start
    _write_outputs(root, planned, factors)
    atomic.write_json(root / MARKER, dict(params, complete=True, clips=len(factors)))
    summary = _summary(root, factors, len(jobs), seconds)
    if progress:
        print(f'synth_cremad: {summary["clips"]} clips in {root} ({summary["rendered"]} rendered '
              f'in {seconds:.1f} s, {summary["clips_per_s"]:.1f} clips/s), '
              f'{summary["bytes"] / 1e6:.1f} MB')
    return summary


def _check(num_actors, seed, like, workers, nuisance, sentences, duration_scale):
    """Validate the arguments; returns the parameters recorded in the marker."""
    if not (isinstance(num_actors, int) and 1 <= num_actors <= MAX_ACTORS):
        raise SynthError(f'num_actors={num_actors!r} must be an int in 1..{MAX_ACTORS}')
    if not (isinstance(seed, int) and seed >= 0):
        raise SynthError(f'seed={seed!r} must be an int >= 0')
    if not (isinstance(workers, int) and workers >= 0):
        raise SynthError(f'workers={workers!r} must be an int >= 0 (0: all cores)')
    if not (isinstance(nuisance, (int, float)) and 0 <= nuisance <= 1):
        raise SynthError(f'nuisance={nuisance!r} must be a number in [0, 1]')
    if not (isinstance(duration_scale, (int, float)) and 0.1 <= duration_scale <= 3):
        raise SynthError(f'duration_scale={duration_scale!r} must be a number in [0.1, 3]')
    codes = parse_sentences(sentences)
    if like is not None:
        read_like(like, 1, codes)  # raises when the folder lacks the CSVs
        like = str(Path(like).resolve())
    return dict(generator='synth_cremad', version=VERSION, num_actors=num_actors, seed=seed,
                like=like, nuisance=float(nuisance), sentences=','.join(codes),
                duration_scale=float(duration_scale))


def _ready(root, params):
    """True if ``root`` is a complete twin of ``params``; raise if we must not write there."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    if not root.is_dir():
        raise SynthError(f'root={str(root)!r} is a file, not a folder')
    marker = root / MARKER
    if not marker.is_file():
        raise SynthError(f'root={str(root)!r} is not empty and is not a synthetic twin '
                         f'(no {MARKER}); pick another root or empty it')
    made = json.loads(marker.read_text())
    same = {k: made.get(k) for k in params} == params
    if not same:
        diff = ', '.join(f'{k}={made.get(k)!r}' for k in params if made.get(k) != params[k])
        raise SynthError(f'root={str(root)!r} holds a twin made with other parameters '
                         f'({diff}); pick another root or delete it')
    return bool(made.get('complete'))


def _done(root, name):
    return ((root / 'VideoFlash' / f'{name}.flv').is_file()
            and (root / 'AudioWAV' / f'{name}.wav').is_file())


def _run_jobs(jobs, workers, progress):
    """Render in ``workers`` processes, in chunks, with a progress bar."""
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit='clip', disable=not progress or not jobs,
               desc='synth_cremad')
    chunks = [jobs[i:i + 4] for i in range(0, len(jobs), 4)]
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            bar.update(len(_render_chunk(chunk)))
    else:
        with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
            for done in pool.map(_render_chunk, chunks):
                bar.update(len(done))
    bar.close()


def _write_outputs(root, planned, factors):
    """The two CREMA-D CSVs (exact format) and ground_truth.csv."""
    demo = ['"ActorID","Age","Sex","Race","Ethnicity"\n']
    demo += [f'{r["ActorID"]},{r["Age"]},"{r["Sex"]}","{r["Race"]}","{r["Ethnicity"]}"\n'
             for r in planned['demographics']]
    atomic.write_bytes(root / 'VideoDemographics.csv', ''.join(demo))
    # CREMA-D's listing ends without a newline after its last row; match it.
    rows = ['"Stimulus_Number","Filename"'] + [f'{i},"{n}"' for i, n in
                                               enumerate(planned['names'], 1)]
    atomic.write_bytes(root / 'SentenceFilenames.csv', '\n'.join(rows))
    columns = list(factors[0])
    lines = [','.join(columns)] + [','.join(str(f[c]) for c in columns) for f in factors]
    atomic.write_bytes(root / 'ground_truth.csv', '\n'.join(lines) + '\n')


def _summary(root, factors, rendered, seconds):
    names = [f['name'] for f in factors]
    flv = sum((root / 'VideoFlash' / f'{n}.flv').stat().st_size for n in names)
    wav = sum((root / 'AudioWAV' / f'{n}.wav').stat().st_size for n in names)
    return dict(root=str(root), clips=len(names), rendered=rendered, reused=False,
                seconds=round(seconds, 2), clips_per_s=rendered / max(seconds, 1e-9),
                flv_bytes=flv, wav_bytes=wav, bytes=flv + wav)


# ----------------------------------------------------------------------------- learnability

def clip_features(path, size=32):
    """Cheap features of one FLV: (size x size grey centre face crop, mean + std of 64
    log-mel bands)."""
    from PIL import Image
    frames, audio, _, rate = media.read_flv(path)
    face = media.face_crop(frames[media.centre_index(len(frames))])
    grey = Image.fromarray(face).convert('L').resize((size, size), Image.BILINEAR)
    spec = media.log_mel(audio.mean(axis=0), rate).reshape(64, 4, -1).mean(axis=1)
    return np.asarray(grey, np.float32).ravel() / 255, np.concatenate([spec.mean(1), spec.std(1)])


def probe_features(root, workers=1):
    """(names, emotions, image features, audio features) of every clip listed in ``root``."""
    root = Path(root)
    names = _listing(root)
    paths = [root / 'VideoFlash' / f'{n}.flv' for n in names]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            feats = list(pool.map(clip_features, paths, chunksize=8))
    else:
        feats = [clip_features(p) for p in paths]
    emotions = np.array([parse_name(n)['emotion'] for n in names])
    return names, emotions, np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats])


def learnability(root, split='clip', test_size=0.3, seed=0, workers=1, features=None):
    """Held-out accuracy of a logistic regression on image, audio and joint features.

    split: 'clip' (stratified by emotion, actors shared, like the paper's split) or
    'actor' (speaker-independent). features: probe_features(root) if already computed.
    Returns dict(chance, train, test, image, audio, joint).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupShuffleSplit, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    names, labels, image, audio = features or probe_features(root, workers)
    index = np.arange(len(names))
    if split == 'actor':
        groups = [parse_name(n)['actor'] for n in names]
        cut = GroupShuffleSplit(1, test_size=test_size, random_state=seed)
        train, test = next(cut.split(index, labels, groups))
    else:
        train, test = train_test_split(index, test_size=test_size, random_state=seed,
                                       stratify=labels)
    result = dict(chance=1 / len(EMOTION_CODES), train=len(train), test=len(test))
    for key, x in (('image', image), ('audio', audio), ('joint', np.hstack([image, audio]))):
        # PCA keeps the fit fast on 1024 pixels and a few hundred clips.
        pca = PCA(min(64, len(train) - 1), random_state=seed)
        model = make_pipeline(StandardScaler(), pca, LogisticRegression(C=0.1, max_iter=1000))
        model.fit(x[train], labels[train])
        result[key] = float((model.predict(x[test]) == labels[test]).mean())
    return result


def _listing(root):
    with open(Path(root) / 'SentenceFilenames.csv', newline='') as f:
        return [r['Filename'] for r in csv.DictReader(f)]


if __name__ == '__main__':
    from configurator import configure_or_exit
    cfg = configure_or_exit(globals())
    try:
        generate(cfg['root'], num_actors=cfg['num_actors'], seed=cfg['seed'], like=cfg['like'],
                 workers=cfg['workers'], nuisance=cfg['nuisance'], sentences=cfg['sentences'],
                 duration_scale=cfg['duration_scale'])
        if cfg['measure']:
            features = probe_features(cfg['root'], cfg['workers'] or os.cpu_count())
            for split in ('clip', 'actor'):
                scores = learnability(cfg['root'], split=split, features=features)
                print(f'learnability (split by {split}): ' + ', '.join(
                    f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}'
                    for k, v in scores.items()))
    except SynthError as e:
        sys.exit(f'synth_cremad: {e}')
