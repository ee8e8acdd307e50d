"""The synthetic twins' shared renderer and build machinery (one renderer, several layouts).

A twin layout (cmvq/twins/cremad.py, rml.py, emo.py) decides the dataset's layout:
its names, emotion prototypes, identities and containers. This module renders
what every layout needs and builds the tree safely:

- identity: ``draw_traits`` (face shape, skin, hair, clothes, background, voice);
- per clip: ``draw_factors`` (expression + voice cues, nuisance draws, timing);
- audio: ``render_audio`` (speech at 44.1 kHz and its loudness per video frame);
- video: ``render_video`` (the face box over a background, in a ``Frame`` geometry);
- building: ``check_root`` (reuse / resume / refuse via a marker file),
  ``run_jobs`` (parallel, chunked, progress bar), ``write_csv``.

Content. A parametric face (hair, skin, eyes, brows, nose, mouth) drawn with numpy
on a per-actor background, with small head motion, lighting and pixel noise; its
mouth opens with the loudness of the speech. The voice is a harmonic source with
a pitch contour (declination, stressed-syllable accents), spectral tilt and three
formants per syllable, with consonant noise bursts between syllables.

Face cues (``FACE_CUES``): brow_raise, brow_slant (+ inner end up), eye_open,
mouth_curve (+ smile), mouth_width. Voice cues (``VOICE_CUES``): pitch
(semitones), pitch_range (log2 of contour excursion), tempo (log2 of speaking
rate), energy (dB), tilt (octaves of the source's low-pass corner), tremor.
A layout maps each emotion to one prototype per modality.

Deterministic: every draw comes from a generator seeded by (seed, crc32 of keys).
"""
import csv
import json
import math
import time
import zlib
from typing import NamedTuple

import numpy as np
from scipy.signal import lfilter

from cmvq import errors
from cmvq.pools import process_pool
from cmvq.progress import progress_bar

FACE_CUES = ('brow_raise', 'brow_slant', 'eye_open', 'mouth_curve', 'mouth_width')
FACE_JITTER = (0.25, 0.25, 0.25, 0.25, 0.25)
VOICE_CUES = ('pitch_st', 'pitch_range', 'tempo', 'energy_db', 'tilt', 'tremor')
VOICE_JITTER = (1.2, 0.2, 0.08, 2.0, 0.3, 0.2)
# Expression prototypes the layouts map their emotions to (FACE_CUES / VOICE_CUES order).
FACE_RELAXED, FACE_SAD = (0, 0, 0, 0, 0), (0.6, 1.0, 0.7, -0.8, -0.1)
FACE_SMILE, FACE_ANGRY = (0.2, 0.0, -0.5, 1.0, 0.7), (-1.0, -1.0, -0.4, -0.5, -0.6)
FACE_SURPRISED = (1.2, 0.3, 1.3, 0.0, -0.5)
VOICE_NEUTRAL, VOICE_FEAR = (0, 0, 0, 0, 0, 0), (6.0, -0.4, 0.3, 1.0, 0.3, 1.0)
VOICE_HIGH, VOICE_LOW = (3.0, 0.7, 0.15, 6.0, 1.0, 0.0), (-3.0, -0.6, -0.3, -6.0, -1.0, 0.0)
VOICE_SURPRISED = (4.0, 1.2, -0.1, 3.0, 0.3, 0.0)
NEUTRAL_SKIN = (200, 160, 130)

FPS, RATE = 30, 44100           # video frame rate; the renderer's audio rate
HOP = RATE // FPS               # audio samples per video frame (1470)
LO_PIX, HI_PIX = 20, 235        # palette bounds: room for +-15 noise without wrapping
MOUTH_LEVELS = 8                # mouth openings rendered per clip (speech follows these)
# Face box: the part of the frame holding hair, head and neck; it moves with the head.
LAYER_H, LAYER_W = 261, 220
FACE_CY, FACE_CX = 128, 110     # face centre in layer coordinates
NECK_Y, SHIRT_Y = 176, 266      # neck and shirt start, rows below the face box's top
EDGE_S = 0.35                   # silence before and after the speech (s, times duration_scale)
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410),
          (300, 870, 2240), (500, 1500, 2500), (660, 1720, 2410))


class Frame(NamedTuple):
    """A layout's frame geometry: size, the face box's resting corner, head travel.

    The face box is opaque (it carries its own background), invisible on a
    vertical gradient as long as it never reaches the shirt: hence the box's
    bottom plus max_dy must stay above the shirt (top + SHIRT_Y)."""
    height: int
    width: int
    top: int
    left: int
    max_dy: int = 5
    max_dx: int = 40


class SynthError(errors.BadValueError):
    """A bad argument or an output folder we must not touch; the message says why."""


def rng_for(seed, *keys):
    """Generator seeded by (seed, crc32 of each key): stable across runs and processes."""
    words = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# ----------------------------------------------------------------------------- factors

def draw_traits(rng, male, skin, nuisance):
    """Emotion-irrelevant identity of one actor (face, voice), scaled by ``nuisance``.

    skin: the actor's base skin colour (RGB), before the per-actor draw."""
    n = nuisance
    skin = np.array(skin, float) + rng.normal(0, 12, 3)
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


def draw_cues(rng, face_prototype, voice_prototype, scale):
    """{'face_<cue>': .., 'voice_<cue>': ..}: prototypes * scale plus per-clip jitter."""
    face = np.array(face_prototype) * scale + rng.normal(0, FACE_JITTER)
    voice = np.array(voice_prototype) * scale + rng.normal(0, VOICE_JITTER)
    out = {f'face_{k}': v for k, v in zip(FACE_CUES, face, strict=True)}
    out.update({f'voice_{k}': v for k, v in zip(VOICE_CUES, voice, strict=True)})
    return out


def draw_factors(out, rng, traits, nuisance, duration_scale, syllables):
    """Add the nuisance, pitch, timing and identity factors to ``out`` (a clip's dict
    holding 'sentence' and the cues of draw_cues; the sentence has ``syllables``
    syllables); returns the rounded flat dict (one ground_truth.csv row)."""
    n = nuisance
    out.update(
        pitch_shift_st=n * rng.normal(0, 1.5), gain_db=n * rng.normal(0, 2.0),
        noise_rms=n * rng.uniform(0.002, 0.02), light=1 + n * rng.normal(0, 0.08),
        head_x=n * rng.normal(0, 4), head_y=n * rng.normal(0, 3),
        head_motion_px=1 + n * rng.uniform(0, 3), pixel_noise=round(n * rng.uniform(4, 14)))
    out['f0_hz'] = traits['f0_hz'] * 2 ** ((out['voice_pitch_st'] + out['pitch_shift_st']) / 12)
    syllables = syllable_plan(out['sentence'], syllables)
    per_syllable = 0.2 * duration_scale / traits['rate'] / 2 ** out['voice_tempo']
    lengths = per_syllable * (1 + 0.35 * syllables['stress'])
    edge = EDGE_S * duration_scale
    out.update(syllables=len(lengths), speech_s=float(lengths.sum()),
               frames=int(math.ceil((2 * edge + lengths.sum()) * FPS)))
    out['duration_s'] = out['frames'] / FPS
    for key in ('skin', 'hair', 'background'):
        out.update({f'{key}_{c}': v for c, v in zip('rgb', traits[key], strict=True)})
    out.update(actor_f0_hz=traits['f0_hz'], formant_scale=traits['formant_scale'])
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v)
            for k, v in out.items()}


def syllable_plan(sentence, count):
    """Stress pattern, vowels and consonant onsets of a sentence: same for every actor."""
    rng = rng_for(0, 'sentence', sentence)
    return dict(stress=(rng.random(count) < 0.4).astype(float),
                vowel=rng.integers(0, len(VOWELS), count), onset=rng.random(count) < 0.7)


# ----------------------------------------------------------------------------- audio

def render_audio(f, traits, duration_scale, rng):
    """Speech at 44.1 kHz (frames * 1470 samples) and its loudness per video frame."""
    total = f['frames'] * HOP
    plan_ = syllable_plan(f['sentence'], f['syllables'])
    lengths = f['speech_s'] * (1 + 0.35 * plan_['stress']) / (1 + 0.35 * plan_['stress']).sum()
    starts = EDGE_S * duration_scale + np.concatenate([[0], np.cumsum(lengths)[:-1]])
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

def render_video(f, traits, loudness, rng, frame):
    """(frames, H, W, 3) uint8 in the ``frame`` geometry: the face box pasted over a
    static background, plus noise."""
    background = _background(traits, f['light'], frame)
    openings = np.clip(loudness / max(loudness.max(), 1e-9), 0, 1) ** 0.7
    levels = np.minimum((openings * MOUTH_LEVELS).astype(int), MOUTH_LEVELS - 1)
    layers = _face_layers(f, traits, background, frame)
    frames = np.empty((f['frames'], frame.height, frame.width, 3), np.uint8)
    frames[:] = background
    dy, dx = _head_path(f, rng, frame)
    for i in range(f['frames']):
        y, x = frame.top + dy[i], frame.left + dx[i]
        frames[i, y:y + LAYER_H, x:x + LAYER_W] = layers[levels[i]]
    _add_noise(frames, int(f['pixel_noise']), rng)
    return frames


def _head_path(f, rng, frame):
    """Integer (dy, dx) per frame: a per-clip offset plus slow sway, within the frame's
    travel (see Frame)."""
    t = np.arange(f['frames']) / FPS
    phase = rng.uniform(0, 2 * np.pi, 2)
    amp = f['head_motion_px']
    dx = f['head_x'] + amp * np.sin(2 * np.pi * 0.7 * t + phase[0])
    dy = f['head_y'] + 0.6 * amp * np.sin(2 * np.pi * 0.5 * t + phase[1])
    dx = np.clip(np.round(dx), -frame.max_dx, frame.max_dx).astype(int)
    return np.clip(np.round(dy), -frame.max_dy, frame.max_dy).astype(int), dx


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
    for image, (oy, ox) in zip(frames, offsets, strict=True):
        image += pool[oy:oy + h, ox:ox + w]


def colour(rgb, light=1.0):
    """An RGB triple (any numbers) as uint8 within the palette bounds."""
    return np.clip(np.asarray(rgb, float) * light, LO_PIX, HI_PIX).astype(np.uint8)


def _background(traits, light, frame):
    """Vertical gradient of the actor's background colour, a neck and a shirt below
    the face box."""
    h, w = frame.height, frame.width
    shade = np.linspace(1.1, 0.85, h)[:, None, None]
    image = np.clip(np.asarray(traits['background']) * light * shade, LO_PIX, HI_PIX)
    image = np.broadcast_to(image, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    centre, shirt_top = frame.left + FACE_CX, frame.top + SHIRT_Y
    neck = (yy > frame.top + NECK_Y) & (np.abs(xx - centre) < 29 * traits['face_w'])
    image[neck] = colour(traits['skin'], light * 0.85)
    shirt = (yy >= shirt_top) & (np.abs(xx - centre) < 95 + (yy - shirt_top) * 1.5)
    image[shirt] = colour(traits['shirt'], light)
    return image


def _face_layers(f, traits, background, frame):
    """The face box (hair, head, neck, features on the background), one per mouth opening."""
    light = f['light']
    yy, xx = np.mgrid[0:LAYER_H, 0:LAYER_W].astype(np.float32)
    cy, cx = FACE_CY, FACE_CX
    ry, rx = 92 * traits['face_h'], 70 * traits['face_w']
    skin, hair = colour(traits['skin'], light), colour(traits['hair'], light)
    layer = background[frame.top:frame.top + LAYER_H, frame.left:frame.left + LAYER_W].copy()
    hair_back = _ellipse(yy, xx, cy - 8, cx, ry * 1.08, rx * 1.14)
    neck = (np.abs(xx - cx) < 29 * traits['face_w']) & (yy > cy + ry * 0.5)
    face = _ellipse(yy, xx, cy, cx, ry, rx)
    layer[hair_back] = hair
    layer[neck] = colour(traits['skin'], light * 0.85)
    layer[face] = skin
    fringe = face & (yy < cy - ry * (0.55 + 0.1 * traits['fringe'])
                     + 6 * np.sin(xx / 9.0) * traits['fringe'])
    layer[fringe] = hair
    layer[_ellipse(yy, xx, cy + ry * 0.12, cx, 15, 7)] = colour(traits['skin'], light * 0.88)
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
        layer[white] = colour((232, 232, 228), light)
        layer[white & _ellipse(yy, xx, eye_y, eye_x, 5.5, 5.5)] = colour((40, 30, 25), light)
        inner_x, outer_x = FACE_CX + side * 10, FACE_CX + side * rx * 0.72
        base = eye_y - 18 - 11 * f['face_brow_raise']
        inner_y, outer_y = base - 9 * f['face_brow_slant'], base + 4 * f['face_brow_slant']
        along = (xx - inner_x) / (outer_x - inner_x)
        line_y = inner_y + along * (outer_y - inner_y)
        brow = (along >= 0) & (along <= 1) & (np.abs(yy - line_y) < 4)
        layer[brow] = colour(np.asarray(traits['hair']) * 0.6, light)


def _draw_mouth(layer, yy, xx, f, ry, rx, opening, light):
    """Lips along a curve (corners up for a smile), open by ``opening`` (0..1)."""
    my = FACE_CY + ry * 0.5
    half = rx * 0.38 * (1 + 0.3 * np.clip(f['face_mouth_width'], -1.5, 1.5))
    u = (xx - FACE_CX) / half
    inside = np.abs(u) <= 1
    mid = my - 13 * f['face_mouth_curve'] * (u ** 2 - 1 / 3)
    gap = opening * 15 * np.sqrt(np.clip(1 - u ** 2, 0, 1))
    distance = np.abs(yy - mid)
    layer[inside & (distance < gap / 2 + 3)] = colour((170, 80, 80), light)
    layer[inside & (distance < gap / 2)] = colour((60, 25, 30), light)
    return layer


# ----------------------------------------------------------------------------- building

def check_root(root, marker, params):
    """True if ``root`` is a complete twin of ``params`` (its ``marker`` file says so);
    False if it is missing, empty or an interrupted build of the same parameters;
    SynthError if we must not write there."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    if not root.is_dir():
        raise SynthError(f'root={str(root)!r} is a file, not a folder')
    path = root / marker
    if not path.is_file():
        raise SynthError(f'root={str(root)!r} is not empty and is not a synthetic twin '
                         f'(no {marker}); pick another root or empty it')
    made = json.loads(path.read_text())
    if {k: made.get(k) for k in params} != params:
        diff = ', '.join(f'{k}={made.get(k)!r}' for k in params if made.get(k) != params[k])
        raise SynthError(f'root={str(root)!r} holds a twin made with other parameters '
                         f'({diff}); pick another root or delete it')
    return bool(made.get('complete'))


def check_common(seed, workers, nuisance, duration_scale):
    """Validate the arguments every twin takes."""
    if not (isinstance(seed, int) and seed >= 0):
        raise SynthError(f'seed={seed!r} must be an int >= 0')
    if not (isinstance(workers, int) and workers >= 0):
        raise SynthError(f'workers={workers!r} must be an int >= 0 (0: all cores)')
    if not (isinstance(nuisance, (int, float)) and 0 <= nuisance <= 1):
        raise SynthError(f'nuisance={nuisance!r} must be a number in [0, 1]')
    if not (isinstance(duration_scale, (int, float)) and 0.1 <= duration_scale <= 3):
        raise SynthError(f'duration_scale={duration_scale!r} must be a number in [0.1, 3]')


def run_jobs(render, jobs, workers, progress, desc):
    """render(job) for every job, in ``workers`` processes, in chunks, with a progress
    bar. render must be a module-level function (it is pickled into the workers)."""
    bar = progress_bar(total=len(jobs), unit='clip', enabled=progress and bool(jobs), desc=desc)
    chunks = [(render, jobs[i:i + 4]) for i in range(0, len(jobs), 4)]
    start = time.time()
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            bar.update(len(_render_chunk(chunk)))
    else:
        with process_pool(min(workers, len(chunks))) as pool:
            for done in pool.map(_render_chunk, chunks):
                bar.update(len(done))
    bar.close()
    return time.time() - start


def _render_chunk(chunk):
    render, jobs = chunk
    return [render(job) for job in jobs]


def csv_text(rows):
    """Rows of dicts (same keys) -> plain comma-separated text with a header line."""
    columns = list(rows[0])
    lines = [','.join(columns)] + [','.join(str(r[c]) for c in columns) for r in rows]
    return '\n'.join(lines) + '\n'


def read_csv(path):
    """A csv_text file -> list of dicts of strings."""
    with open(path, newline='') as f:
        return list(csv.DictReader(f))
