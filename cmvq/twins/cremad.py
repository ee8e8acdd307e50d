"""Synthetic CREMA-D twin: the same tree, formats and names, with known factors.

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

The renderer and the build machinery are shared with the other twins (render.py);
this file holds CREMA-D's layout: names, demographics, prototypes, FLV + WAV.

Deterministic for a seed: each clip draws from its own generator seeded by
(seed, crc32(name)), each actor by (seed, actor id), so a clip is identical whatever
the number of workers or the other clips rendered.
"""
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.signal import resample_poly
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cmvq import atomic, media
from cmvq.pools import available_cores, process_pool
from cmvq.twins import render
from cmvq.twins.render import SynthError, rng_for


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
FACE_PROTOTYPES = {'NEU': render.FACE_RELAXED, 'DIS': render.FACE_RELAXED,
                   'SAD': render.FACE_SAD, 'FEA': render.FACE_SAD,
                   'HAP': render.FACE_SMILE, 'ANG': render.FACE_ANGRY}
# Voice cues: pitch (semitones), pitch_range (log2 of contour excursion), tempo (log2 of
# speaking rate), energy (dB), tilt (octaves of the source's low-pass corner), tremor.
VOICE_PROTOTYPES = {'NEU': render.VOICE_NEUTRAL, 'FEA': render.VOICE_FEAR,
                    'HAP': render.VOICE_HIGH, 'ANG': render.VOICE_HIGH,
                    'SAD': render.VOICE_LOW, 'DIS': render.VOICE_LOW}

# CREMA-D-like marginals for synthetic actors (from the real VideoDemographics.csv).
SEXES, SEX_P = ('Male', 'Female'), (48 / 91, 43 / 91)
RACES, RACE_P = ('African American', 'Asian', 'Caucasian', 'Unknown'), (0.24, 0.08, 0.66, 0.02)
ETHNICITIES, ETHNICITY_P = ('Not Hispanic', 'Hispanic'), (0.89, 0.11)
SKIN_BY_RACE = {'African American': (120, 80, 60), 'Asian': (220, 180, 140),
                'Caucasian': (228, 185, 160), 'Unknown': (190, 145, 110)}

# The face box rests at the top centre, in the region the loader crops.
FRAME = render.Frame(height=media.VIDEO_HEIGHT, width=media.VIDEO_WIDTH, top=24, left=130)


# ----------------------------------------------------------------------------- planning

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
    rng = rng_for(seed, 'actor', row['ActorID'])
    return render.draw_traits(rng, row['Sex'] == 'Male',
                             SKIN_BY_RACE.get(row['Race'], render.NEUTRAL_SKIN), nuisance)


def clip_factors(name, traits, seed, nuisance, duration_scale):
    """Every factor rendered in clip ``name`` (a flat dict: one ground_truth.csv row)."""
    info = parse_name(name)
    rng = rng_for(seed, name)
    scale = LEVEL_INTENSITY[info['level']] * traits['expressiveness']
    cues = render.draw_cues(rng, FACE_PROTOTYPES[info['emotion']],
                           VOICE_PROTOTYPES[info['emotion']], scale)
    out = dict(name=name, **info, intensity=round(scale, 4), **cues)
    return render.draw_factors(out, rng, traits, nuisance, duration_scale,
                              SYLLABLES[info['sentence']])


# ----------------------------------------------------------------------------- clips

def render_clip(job):
    """Render one clip and write it atomically; returns (name, flv bytes, wav bytes)."""
    out_root, f, traits, seed, duration_scale = job
    rng = rng_for(seed, f['name'], 'render')
    audio, loudness = render.render_audio(f, traits, duration_scale, rng)
    frames = render.render_video(f, traits, loudness, rng, FRAME)
    flv = Path(out_root) / 'VideoFlash' / f'{f["name"]}.flv'
    wav = Path(out_root) / 'AudioWAV' / f'{f["name"]}.wav'
    atomic.write(flv, lambda p: media.write_flv(p, frames, audio.astype(np.float32)))
    atomic.write(wav, lambda p: media.write_wav(p, resample_poly(audio, 160, 441)))
    return f['name'], flv.stat().st_size, wav.stat().st_size


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
    if render.check_root(root, MARKER, params):
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
    seconds = render.run_jobs(render_clip, jobs, workers or available_cores(), progress,
                             'synth_cremad')
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
    render.check_common(seed, workers, nuisance, duration_scale)
    codes = parse_sentences(sentences)
    if like is not None:
        read_like(like, 1, codes)  # raises when the folder lacks the CSVs
        like = str(Path(like).resolve())
    return dict(generator='synth_cremad', version=VERSION, num_actors=num_actors, seed=seed,
                like=like, nuisance=float(nuisance), sentences=','.join(codes),
                duration_scale=float(duration_scale))


def _done(root, name):
    return ((root / 'VideoFlash' / f'{name}.flv').is_file()
            and (root / 'AudioWAV' / f'{name}.wav').is_file())


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
    atomic.write_bytes(root / 'ground_truth.csv', render.csv_text(factors))


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
        with process_pool(workers, blas=False) as pool:  # log-mels as in the main process
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
