"""Synthetic RML twin: RML's layout and formats, with known factors.

The tree matches the RML emotion database: one folder per subject, ``s1/`` ..
``s8/``, holding ``{emotion}{n}.avi`` clips (emotion codes ha, sa, an, fe, su, di;
n = 1..clips_per_emotion): MPEG-4 video at 30 fps, 720x480 or 360x240 (frames
480 or 240 pixels high, by subject), mono 16-bit PCM at 22,050 Hz, 3-6 s at
duration_scale 1. Each subject speaks one of six languages; each language has
``sentences_per_emotion`` sentences per emotion (10 by default, clip n speaks
sentence (n - 1) % 10 + 1). Plus ``ground_truth.csv`` (the factors rendered per
clip, with the probe classes skin_class and pitch_class) and the marker
``.synth_rml.json`` (the parameters; complete once the twin is).

The faces and voices come from the CREMA-D twin's renderer (render.py), with RML's
six emotions (with surprise, without neutral):

    emotion   | face cues                          | voice cues
    ----------+------------------------------------+---------------------------------
    happiness | smile                              | high, lively, loud (as anger)
    sadness   | inner brows up, frown (as fear)    | low, slow, quiet (as disgust)
    anger     | brows down and in (as disgust)     | high, lively, loud (as happiness)
    fear      | inner brows up, frown (as sadness) | highest pitch, tremor
    surprise  | brows up, eyes wide                | wide pitch excursion
    disgust   | brows down and in (as anger)       | low, slow, quiet (as sadness)

Complementary by design: each modality alone has four distinguishable groups;
together all six emotions separate. Contradictory by design (strength
``nuisance``): identity, skin tone, background, lighting, head motion, pixel
noise, pitch shift, gain and noise, as in the CREMA-D twin.

Deterministic for a seed: each clip draws from a generator seeded by (seed,
crc32(name)), each subject by (seed, subject): a clip does not depend on the
number of workers or the other clips.
"""
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.signal import resample_poly

from cmvq import atomic, media
from cmvq.pools import available_cores
from cmvq.twins import render
from cmvq.twins.render import SynthError, rng_for


VERSION = 1                     # bump when rendering changes: old twins are not reused
MARKER = '.synth_rml.json'
MAX_SUBJECTS = 8
# RML's label order (the released code) and the codes its file names start with.
EMOTIONS = ('happiness', 'sadness', 'anger', 'fear', 'surprise', 'disgust')
EMOTION_CODES = ('ha', 'sa', 'an', 'fe', 'su', 'di')
LANGUAGES = ('English', 'Mandarin', 'Urdu', 'Punjabi', 'Persian', 'Italian')
INTENSITY = 0.9                 # RML has no intensity levels: one scale for every clip
SYLLABLE_RANGE = (12, 18)       # syllables per sentence: mostly 3-6 s clips at duration_scale 1
FACE_PROTOTYPES = {'ha': render.FACE_SMILE, 'sa': render.FACE_SAD, 'an': render.FACE_ANGRY,
                   'fe': render.FACE_SAD, 'su': render.FACE_SURPRISED, 'di': render.FACE_ANGRY}
VOICE_PROTOTYPES = {'ha': render.VOICE_HIGH, 'sa': render.VOICE_LOW, 'an': render.VOICE_HIGH,
                    'fe': render.VOICE_FEAR, 'su': render.VOICE_SURPRISED, 'di': render.VOICE_LOW}
# Probe classes (emotion-irrelevant): the subject's skin tone and the clip's voice
# pitch without its emotional part (subject f0 * pitch shift), in bins.
SKIN_TONES = {'light': (232, 190, 165), 'medium': (205, 155, 115), 'olive': (180, 140, 95),
              'dark': (125, 85, 62)}
PITCH_CLASSES, PITCH_EDGES_HZ = ('low', 'mid', 'high'), (140.0, 185.0)
# Frame geometry: rendered 720x480 with the face box centred (the loader's centre
# crop is 380 pixels); subjects filmed at 240 get every frame halved to 360x240.
FRAME = render.Frame(height=480, width=720, top=(480 - render.LAYER_H) // 2,
                    left=(720 - render.LAYER_W) // 2)
HEIGHTS = (480, 240)            # s1, s2: 480 high; s3, s4: 240; s5, s6: 480; ...
AUDIO_DOWN = render.RATE // media.AVI_RATE  # 44.1 kHz render -> 22,050 Hz


# ----------------------------------------------------------------------------- planning

def subjects(count):
    """Per subject: dict(subject 's1', language, sex, height, skin_class)."""
    rows = []
    for k in range(1, count + 1):
        rng = rng_for(0, 'rml-subject', k)  # who the subject is does not depend on seed
        rows.append(dict(subject=f's{k}', language=LANGUAGES[(k - 1) % len(LANGUAGES)],
                         sex='Male' if k % 2 else 'Female', height=HEIGHTS[(k - 1) // 2 % 2],
                         skin_class=str(rng.choice(list(SKIN_TONES)))))
    return rows


def clip_names(count, per_emotion):
    """'s1/ha1', ... in subject, emotion, clip order."""
    return [f's{k}/{code}{n}' for k in range(1, count + 1) for code in EMOTION_CODES
            for n in range(1, per_emotion + 1)]


def parse_name(name):
    """'s1/ha3' (or a path ending in s1/ha3.avi) -> dict(subject='s1', emotion='ha', clip=3)."""
    path = Path(name)
    stem, subject = path.stem, path.parent.name
    if not (stem[:2] in EMOTION_CODES and stem[2:].isdigit() and subject[:1] == 's'
            and subject[1:].isdigit()):
        raise SynthError(f'{name!r} is not an RML twin name like s1/ha3')
    return dict(subject=subject, emotion=stem[:2], clip=int(stem[2:]))


def sentence_syllables(language, code, number):
    """Syllables of sentence ``number`` of an emotion in a language (fixed, seed-free)."""
    rng = rng_for(0, 'rml-sentence', language, code, number)
    return int(rng.integers(SYLLABLE_RANGE[0], SYLLABLE_RANGE[1] + 1))


# ----------------------------------------------------------------------------- factors

def subject_traits(row, seed, nuisance):
    """Emotion-irrelevant identity of one subject (face, voice)."""
    rng = rng_for(seed, 'rml-actor', row['subject'])
    return render.draw_traits(rng, row['sex'] == 'Male', SKIN_TONES[row['skin_class']], nuisance)


def clip_factors(name, row, traits, seed, nuisance, duration_scale, sentences):
    """Every factor rendered in clip ``name`` (a flat dict: one ground_truth.csv row)."""
    info = parse_name(name)
    rng = rng_for(seed, 'rml', name)
    number = (info['clip'] - 1) % sentences + 1
    scale = INTENSITY * traits['expressiveness']
    cues = render.draw_cues(rng, FACE_PROTOTYPES[info['emotion']],
                           VOICE_PROTOTYPES[info['emotion']], scale)
    out = dict(name=name, subject=row['subject'], language=row['language'], sex=row['sex'],
               emotion=info['emotion'], label=EMOTION_CODES.index(info['emotion']),
               clip=info['clip'], sentence=f'{row["language"]}-{info["emotion"]}{number}',
               height=row['height'], skin_class=row['skin_class'], intensity=round(scale, 4),
               **cues)
    out = render.draw_factors(out, rng, traits, nuisance, duration_scale, sentence_syllables(
        row['language'], info['emotion'], number))
    base = out['actor_f0_hz'] * 2 ** (out['pitch_shift_st'] / 12)
    out['pitch_class'] = PITCH_CLASSES[int(np.searchsorted(PITCH_EDGES_HZ, base))]
    return out


# ----------------------------------------------------------------------------- clips

def render_clip(job):
    """Render one clip and write root/NAME.avi atomically; returns (name, bytes)."""
    out_root, f, traits, seed, duration_scale = job
    rng = rng_for(seed, 'rml', f['name'], 'render')
    audio, loudness = render.render_audio(f, traits, duration_scale, rng)
    frames = render.render_video(f, traits, loudness, rng, FRAME)
    if f['height'] != FRAME.height:
        frames = np.stack([_resize(image, f['height']) for image in frames])
    path = Path(out_root) / f'{f["name"]}.avi'
    audio = resample_poly(audio, 1, AUDIO_DOWN)  # (N / 2,) at 22,050 Hz
    atomic.write(path, lambda p: media.write_avi(p, frames, audio))
    return f['name'], path.stat().st_size


def _resize(image, height):
    width = image.shape[1] * height // image.shape[0]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


# ----------------------------------------------------------------------------- generate

def generate(root, *, num_subjects=MAX_SUBJECTS, clips_per_emotion=15, sentences_per_emotion=10,
             seed=0, workers=1, nuisance=0.5, duration_scale=1.0, progress=True):
    """Write a synthetic RML tree at ``root``; returns a summary dict.

    Reuses a complete twin made with the same parameters, resumes an interrupted
    one, refuses any other non-empty folder. workers: processes (0: all cores);
    the output does not depend on it.
    """
    params = _check(num_subjects, clips_per_emotion, sentences_per_emotion, seed, workers,
                    nuisance, duration_scale)
    root = Path(root)
    names = clip_names(num_subjects, clips_per_emotion)
    if render.check_root(root, MARKER, params):
        return dict(root=str(root), clips=len(names), rendered=0, reused=True, seconds=0.0)
    rows = {r['subject']: r for r in subjects(num_subjects)}
    traits = {s: subject_traits(r, seed, nuisance) for s, r in rows.items()}
    factors = []
    for name in names:
        subject = parse_name(name)['subject']
        factors.append(clip_factors(name, rows[subject], traits[subject], seed, nuisance,
                                    duration_scale, sentences_per_emotion))
    for subject in rows:
        (root / subject).mkdir(parents=True, exist_ok=True)
    atomic.write_json(root / MARKER, dict(params, complete=False))
    jobs = [(str(root), f, traits[f['subject']], seed, duration_scale) for f in factors
            if not (root / f'{f["name"]}.avi').is_file()]
    seconds = render.run_jobs(render_clip, jobs, workers or available_cores(), progress,
                             'synth_rml')
    atomic.write_bytes(root / 'ground_truth.csv', render.csv_text(factors))
    atomic.write_json(root / MARKER, dict(params, complete=True, clips=len(factors)))
    size = sum((root / f'{n}.avi').stat().st_size for n in names)
    if progress:
        print(f'synth_rml: {len(names)} clips in {root} ({len(jobs)} rendered in '
              f'{seconds:.1f} s), {size / 1e6:.1f} MB')
    return dict(root=str(root), clips=len(names), rendered=len(jobs), reused=False,
                seconds=round(seconds, 2), bytes=size)


def _check(num_subjects, clips_per_emotion, sentences_per_emotion, seed, workers, nuisance,
           duration_scale):
    """Validate the arguments; returns the parameters recorded in the marker."""
    if not (isinstance(num_subjects, int) and 1 <= num_subjects <= MAX_SUBJECTS):
        raise SynthError(f'num_subjects={num_subjects!r} must be an int in 1..{MAX_SUBJECTS}')
    for key, value in (('clips_per_emotion', clips_per_emotion),
                       ('sentences_per_emotion', sentences_per_emotion)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise SynthError(f'{key}={value!r} must be an int >= 1')
    render.check_common(seed, workers, nuisance, duration_scale)
    return dict(generator='synth_rml', version=VERSION, num_subjects=num_subjects,
                clips_per_emotion=clips_per_emotion,
                sentences_per_emotion=sentences_per_emotion, seed=seed,
                nuisance=float(nuisance), duration_scale=float(duration_scale))
