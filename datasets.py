"""Datasets: the items of CREMA-D, RML, EmoVoxCeleb and RML features, and the samplers.

A CREMA-D split config (written by ``read_cremad.py``) is a folder with
``{split}_videos.pkl`` (list of FLV paths) and ``{split}_labels.pkl`` (the 8
aligned label lists of ``LABEL_NAMES``). An item is

    (image (3, 128, 128) float32 in [0, 1], spectrogram (1, 256, 256) float32,
     emotion, race, gender, sentence)          # labels as Python ints

The image is one face crop near the clip's centre frame: at random within
+-frame_jitter frames when training, the centre frame itself when evaluating.
A training draw is a pure function of (seed, epoch, item index): the training
loader's ``EpochSampler`` yields ``(epoch, index)`` keys, so the draws do not
depend on which DataLoader worker (or how many) loads the item.

By default every clip is decoded once into the decode-once cache (cmvq/cache.py;
this module gives it the decoder and the preprocessing parameters). Cached and
uncached items are identical (same decode, same float32 features).
"""
import csv
import json
import os
from math import gcd
from pathlib import Path

import librosa
import numpy as np
import torch
from PIL import Image
from scipy.signal import resample_poly
from torch.utils.data import Dataset, Sampler

from cmvq import cache, media, pickles
from cmvq.cache import DEFAULT_WORKERS, check_clips_exist, describe_bad
from cmvq.errors import BadValueError, MissingError
from cmvq.progress import progress_bar

# Frame size of every CREMA-D clip (width, height); another size is a MediaError.
CLIP_SIZE = (media.VIDEO_WIDTH, media.VIDEO_HEIGHT)
CREMAD_JITTER = 15              # training frame within +-15 of the centre (released code)

# CREMA-D label vocabularies; a label is the index of its value in these tuples
# (actor: ID - 1001; age: decade index 20s..60s, clamped).
SENTENCES = ('IEO', 'TIE', 'IOM', 'IWW', 'TAI', 'MTI', 'IWL', 'ITH', 'DFA', 'ITS', 'TSI', 'WSI')
EMOTIONS = ('ANG', 'DIS', 'FEA', 'HAP', 'NEU', 'SAD')
LEVELS = ('LO', 'MD', 'HI', 'XX')
AGES = ('20s', '30s', '40s', '50s', '60s')
GENDERS = ('Male', 'Female')
RACES = ('African American', 'Asian', 'Caucasian', 'Unknown')
ETHNICITIES = ('Not Hispanic', 'Hispanic')
FIRST_ACTOR = 1001
# Order of the 8 label lists in {split}_labels.pkl.
LABEL_NAMES = ('actor', 'sentence', 'emo', 'level', 'age', 'gender', 'race', 'ethnic')
ACTOR, SENTENCE, EMOTION, LEVEL, AGE, GENDER, RACE, ETHNIC = range(8)


def parse_name(name):
    """'1001_DFA_ANG_XX' (or a path to it) -> (actor 0.., sentence, emotion, level) indices."""
    stem = Path(name).stem
    try:
        actor, sentence, emotion, level = stem.split('_')
        return (int(actor) - FIRST_ACTOR, SENTENCES.index(sentence),
                EMOTIONS.index(emotion), LEVELS.index(level))
    except ValueError:
        raise BadValueError(f'{name!r} is not a CREMA-D clip name like 1001_DFA_ANG_XX') from None



# ----------------------------------------------------------------------------- paths

def remap_path(path, root):
    """'<anything>/VideoFlash/NAME.flv' -> 'root/VideoFlash/NAME.flv'."""
    parts = Path(str(path).replace('\\', '/'))
    if parts.parent.name != 'VideoFlash':
        raise BadValueError(f'cannot remap {path!r} onto media_root={root!r}: '
                            'expected a path ending in VideoFlash/NAME.flv')
    return os.path.join(root, 'VideoFlash', parts.name)


def resolve_paths(paths, root=None):
    """Paths as stored (relative ones are relative to the current dir), or remapped onto root."""
    return [str(p) if root is None else remap_path(p, root) for p in paths]


# Allowed values of each label list: 0 .. count-1 (actor: CREMA-D's 91 actors).
LABEL_COUNTS = {'actor': 91, 'sentence': len(SENTENCES), 'emo': len(EMOTIONS),
                'level': len(LEVELS), 'age': len(AGES), 'gender': len(GENDERS),
                'race': len(RACES), 'ethnic': len(ETHNICITIES)}



def load_split(data_path, split):
    """(paths, labels) of a CREMA-D split config; labels: list of 8 int lists."""
    paths, labels = pickles.load_split_files(data_path, split)
    return paths, [list(map(int, x)) for x in labels]


def check_aligned(paths, labels, where=''):
    """Raise BadValueError unless labels (8 lists) match paths in length and name-derived
    labels, and every label is in its range (LABEL_COUNTS)."""
    if len(labels) != len(LABEL_NAMES):
        raise BadValueError(f'{where}: expected {len(LABEL_NAMES)} label lists '
                            f'({", ".join(LABEL_NAMES)}), got {len(labels)}')
    for name, values in zip(LABEL_NAMES, labels, strict=True):
        if len(values) != len(paths):
            raise BadValueError(f'{where}: {len(paths)} paths but {len(values)} {name} labels')
        wrong = [(i, v) for i, v in enumerate(values) if not 0 <= v < LABEL_COUNTS[name]]
        if wrong:
            i, v = wrong[0]
            raise BadValueError(f'{where}: {name} label {v} of item {i} ({paths[i]}) is '
                                f'outside 0..{LABEL_COUNTS[name] - 1} ({len(wrong)} such)')
    for i, path in enumerate(paths):
        # actor, sentence, emotion, level are also spelled in the file name
        got = tuple(labels[k][i] for k in (ACTOR, SENTENCE, EMOTION, LEVEL))
        if got != parse_name(path):
            raise BadValueError(f'{where}: labels of item {i} {got} (actor, sentence, emotion, '
                                f'level) do not match its file name {path}')




def clip_name(path):
    """'<anything>/VideoFlash/1001_DFA_ANG_XX.flv' (either slash) -> '1001_DFA_ANG_XX'."""
    return Path(str(path).replace('\\', '/')).stem


# ----------------------------------------------------------------------------- decoding

def window_indices(num_frames, jitter):
    """Frame indices centre-jitter .. centre+jitter, clamped to the clip: (2*jitter+1,)."""
    centre = media.centre_index(num_frames)
    return np.clip(np.arange(centre - jitter, centre + jitter + 1), 0, num_frames - 1)


def decode_clip(path, frame_jitter=CREMAD_JITTER, backend='pyav', offsets=None, size=CLIP_SIZE,
                audio_transform=None):
    """Decode one clip -> (faces (W, 128, 128, 3) uint8, log-mel (256, 256) float32).

    offsets: frame offsets from the centre to crop (default: the whole window
    -jitter..+jitter, W = 2*jitter+1). Out-of-clip indices are clamped. A clip
    that is truncated, too short, has no audio or frames other than size
    (width, height) raises MediaError (media.check_clip).
    audio_transform: optional function (mono waveform (N,), rate) -> waveform,
    applied before the log-mel (robustness.py adds noise there).
    """
    def pick(num_frames):
        indices = window_indices(num_frames, frame_jitter)
        return indices if offsets is None else indices[np.asarray(offsets) + frame_jitter]

    frames, audio, _, rate = media.read_flv(path, backend, pick, size=size,
                                            audio_like_moviepy=True)
    faces = np.stack([media.face_crop(frame) for frame in frames])
    mono = audio.mean(axis=0)
    if audio_transform is not None:
        mono = audio_transform(mono, rate)
    return faces, media.log_mel(mono, rate)


def to_image(face):
    """(128, 128, 3) uint8 -> (3, 128, 128) float32 tensor in [0, 1]."""
    # One numpy pass from the (read-only) memmap to a new float32 array; dividing
    # in torch would wake its thread pool for 200 KB, costing ~10 ms on a busy CPU.
    image = np.empty((3, *face.shape[:2]), np.float32)
    np.divide(face.transpose(2, 0, 1), np.float32(255), out=image)
    return torch.from_numpy(image)


def to_spectrogram(spec):
    """(256, 256) array -> (1, 256, 256) float32 tensor (copies out of a memmap)."""
    return torch.from_numpy(np.array(spec, dtype=np.float32))[None]


# ----------------------------------------------------------------------------- cache

def cache_params(frame_jitter=CREMAD_JITTER, backend='pyav', decoder=None):
    """Every parameter the cached arrays depend on (decoder: None for CREMA-D's
    decode_clip, or an object with params() and spec_shape, e.g. RMLDecoder)."""
    params = {'version': cache.CACHE_VERSION, 'crop_size': media.CROP_SIZE,
              'image_size': media.IMAGE_SIZE, 'mel': media.MEL, 'spec_frames': media.SPEC_FRAMES,
              'frame_jitter': frame_jitter, 'backend': backend, 'spec_dtype': 'float32',
              'clip_size': list(CLIP_SIZE), 'min_seconds': media.MIN_SECONDS,
              'min_frame_fraction': media.MIN_FRAME_FRACTION}
    if decoder is not None:
        params.update(decoder.params(), spec_shape=list(decoder.spec_shape))
    return params


def check_clips(paths, progress=True, size=CLIP_SIZE, fps=None):
    """Raise MediaError naming how many clips fail media.check_clip (container facts:
    no audio, frame size (size: (width, height), None: any), frame rate (fps, when
    given), truncated, too short; ~2 ms a clip, no decoding) and the first few with
    their reasons."""
    bad = {}
    for path in progress_bar(paths, desc='check clips', unit='clip',
                             enabled=progress and len(paths) >= 500):
        try:
            media.check_clip(path, media.probe(path), size, fps=fps)
        except media.MediaError as e:
            bad[path] = e.reason
        except Exception as e:  # the container cannot be opened
            bad[path] = f'cannot decode: {type(e).__name__}: {e}'
    if bad:
        raise media.MediaError(describe_bad(bad, len(paths)))



def build_cache(paths, cache_dir='cache', *, frame_jitter=CREMAD_JITTER, backend='pyav',
                workers=DEFAULT_WORKERS, progress=True, decoder=None):
    """The decode-once cache folder of these clips (cache.build; decoder: None for
    CREMA-D's decode_clip, or e.g. an RMLDecoder). A clip that fails raises MediaError."""
    return build_cache_dropping(paths, cache_dir, frame_jitter=frame_jitter, backend=backend,
                                workers=workers, progress=progress, decoder=decoder,
                                drop_bad=False)[2]


def build_cache_dropping(paths, cache_dir='cache', *, frame_jitter=CREMAD_JITTER,
                         backend='pyav', workers=DEFAULT_WORKERS, progress=True, decoder=None,
                         drop_bad=True):
    """build_cache that leaves the clips failing a check out instead of raising:
    (kept paths, {path: reason} of the others, the cache folder of the kept paths).
    Every clip is decoded once (the split builders validate every split this way)."""
    return cache.build(paths, cache_dir, decoder or decode_clip,
                       cache_params(frame_jitter, backend, decoder), workers=workers,
                       progress=progress, drop_bad=drop_bad)


# ----------------------------------------------------------------------------- dataset

class CREMADDataset(Dataset):
    """CREMA-D items of one split config; see the module docstring.

    data_path: split config folder (only read). root: a local CREMA-D checkout
    to remap the stored paths onto (None: use them as stored). train: random
    training frame (default: split == 'train'). cache: decode once into
    cache_dir (built here, in parallel) or decode each item (backend 'pyav' or
    'moviepy').

    Subclasses (RML) change what a split holds (read_split), how a clip is
    decoded (decoder) and what an item's face and spectrogram are (clip).
    """

    decoder = None  # None: decode_clip with CREMA-D's parameters; else e.g. an RMLDecoder

    def __init__(self, data_path, split, *, train=None, root=None, cache=True,
                 cache_dir='cache', frame_jitter=CREMAD_JITTER, backend='pyav',
                 workers=DEFAULT_WORKERS, progress=True, seed=0):
        self.train = split == 'train' if train is None else train
        self.frame_jitter, self.backend, self.seed = frame_jitter, backend, seed
        self.paths, self.labels = self.read_split(data_path, split, root)  # (N,), (N, L)
        self._targets = self.item_labels()
        self.cache_path = None
        if not cache:
            check_clips_exist(self.paths)  # build_cache checks them too
        else:
            self.cache_path = build_cache(self.paths, cache_dir, frame_jitter=frame_jitter,
                                          backend=backend, workers=workers, progress=progress,
                                          decoder=self.decoder)
        self._arrays = None  # opened lazily, per process (DataLoader workers)

    def read_split(self, data_path, split, root):
        """(clip paths, labels (N, 8) int64) of the split config, checked."""
        paths, labels = load_split(data_path, split)
        check_aligned(paths, labels, where=f'{data_path} split {split!r}')
        return (resolve_paths(paths, root),
                np.asarray(labels, dtype=np.int64).T.reshape(len(paths), len(LABEL_NAMES)))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        """key: an index, or (epoch, index) from an EpochSampler (an index alone is epoch 0)."""
        epoch, i = split_key(key)
        face, spec = self.clip(i, self._frame_offset(epoch, i))
        return (to_image(face), to_spectrogram(spec), *(int(x) for x in self._targets[i]))

    def clip(self, i, offset):
        """(face (128, 128, 3) uint8, log-mel) of clip i at `offset` frames from its centre."""
        if self.cache_path is None:
            faces, spec = (self.decoder or decode_clip)(self.paths[i], self.frame_jitter,
                                                        self.backend, [offset])
            return faces[0], spec
        arrays = self.arrays()
        return arrays['frames'][i, offset + self.frame_jitter], arrays['specs'][i]

    def _frame_offset(self, epoch, i):
        """Training: uniform in -jitter..jitter, drawn from (seed, epoch, i) alone; else 0."""
        if not self.train or self.frame_jitter == 0:
            return 0
        return int(item_rng(self.seed, epoch, i).integers(-self.frame_jitter,
                                                          self.frame_jitter + 1))

    def item_labels(self):
        """(N, 4) int64: the labels an item returns after its image and audio."""
        return self.labels[:, [EMOTION, RACE, GENDER, SENTENCE]]

    def arrays(self):
        """{'frames': (N, W, 128, 128, 3) uint8, 'specs': (N, 256, 256) float32 memmaps,
        'labels': (N, 8) int64}; only for a cached dataset."""
        if self.cache_path is None:
            raise RuntimeError('arrays() needs the decode-once cache (cache=True)')
        if self._arrays is None:
            self._arrays = {name: np.load(self.cache_path / f'{name}.npy', mmap_mode='r')
                            for name in ('frames', 'specs')}
            self._arrays['labels'] = self.labels
        return self._arrays

    def __getstate__(self):
        # Memmaps must not be pickled into DataLoader workers (they would be copied).
        return {**self.__dict__, '_arrays': None}


# ----------------------------------------------------------------------------- RML

# RML's label order (the released code) and the codes its clip names start with.
RML_EMOTIONS = ('happiness', 'sadness', 'anger', 'fear', 'surprise', 'disgust')
RML_CODES = ('ha', 'sa', 'an', 'fe', 'su', 'di')
RML_JITTER = 22                   # training frame within +-22 of the centre (released code)
RML_FPS = 30                      # every RML clip; another frame rate is a MediaError
RML_SUBJECTS = 8                  # subject folders s1 .. s8
RML_DATASETS = ('RML', 'RML_probe')
RML_BUILDER = 'python3 -m prepare.read_rml'
RML_CROP = {240: 190}             # square centre crop by frame height; other heights: 380
RML_OTHER_CROP = 380
# Audio geometries: (sample rate, seconds kept around the centre or None for the
# whole clip), each followed by media.log_mel's mel (n_fft 2048, win 512, hop 353,
# 256 mels) fitted to 256 frames. 'RML': the released RMLDataset; a pretrained
# RML model takes its source dataset's ('CREMA-D': the whole clip at 44.1 kHz).
AUDIO_GEOMETRIES = {'RML': (32000, 2.5), 'CREMA-D': (media.AUDIO_RATE, None)}
# modify_modal: emotion-irrelevant features injected per item, one choice of each.
SKIN_COLOURS = {'pale': (245, 215, 195), 'brown': (150, 95, 60), 'green': (120, 185, 110),
                'blue': (120, 140, 215)}
PITCH_SHIFTS = (-4.0, -2.0, 2.0, 4.0)   # semitones
# Probe classes of the synthetic twin's ground_truth.csv (skin_class, pitch_class).
RML_SKIN_TONES = ('light', 'medium', 'olive', 'dark')
RML_PITCH_CLASSES = ('low', 'mid', 'high')


def rml_emotion(path):
    """'.../s1/ha3.avi' -> 0 (happiness): the code the clip's name starts with."""
    code = Path(path).stem[:2].lower()
    if code not in RML_CODES:
        raise BadValueError(f'{path!r} is not an RML clip name (it must start with one of '
                         f'{", ".join(RML_CODES)})')
    return RML_CODES.index(code)


def rml_subject(path):
    """'.../s3/ha3.avi' (or '.../s3/<language>/ha3.avi') -> 2: the subject folder s1..s8."""
    for part in reversed(Path(path).parts[:-1]):
        if part[:1].lower() == 's' and part[1:].isdigit():
            if not 1 <= int(part[1:]) <= RML_SUBJECTS:
                raise BadValueError(f'{str(path)!r}: subject folder {part} is outside '
                                    f's1..s{RML_SUBJECTS} (RML has {RML_SUBJECTS} subjects)')
            return int(part[1:]) - 1
    raise BadValueError(f'{str(path)!r} is not inside an RML subject folder '
                        f's1..s{RML_SUBJECTS}')


def rml_face(frame):
    """(H, W, 3) uint8 frame -> (128, 128, 3) uint8 square centre crop (190 pixels when
    H is 240, else 380), resized."""
    h, w = frame.shape[:2]
    size = min(RML_CROP.get(h, RML_OTHER_CROP), h, w)
    top, left = (h - size) // 2, (w - size) // 2
    crop = Image.fromarray(frame[top:top + size, left:left + size])
    return np.asarray(crop.resize((media.IMAGE_SIZE, media.IMAGE_SIZE), Image.BILINEAR))


def rml_audio(audio, rate, geometry='RML'):
    """Mono (N,) audio at ``rate`` -> (samples, new rate) of the geometry: the central
    seconds (when longer), resampled."""
    target, seconds = AUDIO_GEOMETRIES[geometry]
    if seconds is not None and len(audio) > seconds * rate:
        keep = int(seconds * rate)
        start = (len(audio) - keep) // 2
        audio = audio[start:start + keep]
    if rate != target:
        g = gcd(int(rate), int(target))
        audio = resample_poly(audio, target // g, int(rate) // g)
    return np.asarray(audio, np.float32), target


class RMLDecoder:
    """Decode an RML clip: (faces (W, 128, 128, 3) uint8, log-mel (256, 256) float32,
    or (P, 256, 256) with one log-mel per pitch shift). Picklable (cache workers)."""

    def __init__(self, geometry='RML', pitch_shifts=()):
        if geometry not in AUDIO_GEOMETRIES:
            raise BadValueError(f'audio geometry {geometry!r} is not one of '
                             f'{", ".join(AUDIO_GEOMETRIES)}')
        self.geometry, self.pitch_shifts = geometry, tuple(float(s) for s in pitch_shifts)
        frames = (media.MEL['n_mels'], media.SPEC_FRAMES)
        self.spec_shape = (len(self.pitch_shifts), *frames) if self.pitch_shifts else frames

    def params(self):
        return {'dataset': 'RML', 'crop': [*RML_CROP.items(), ('other', RML_OTHER_CROP)],
                'audio_geometry': AUDIO_GEOMETRIES[self.geometry],
                'pitch_shifts': list(self.pitch_shifts)}

    def __call__(self, path, frame_jitter=RML_JITTER, backend='pyav', offsets=None):
        def pick(num_frames):
            indices = window_indices(num_frames, frame_jitter)
            return indices if offsets is None else indices[np.asarray(offsets) + frame_jitter]

        frames, audio, _, rate = media.read_flv(path, backend, pick, fps=RML_FPS)
        faces = np.stack([rml_face(frame) for frame in frames])
        audio, rate = rml_audio(audio.mean(axis=0), rate, self.geometry)
        if not self.pitch_shifts:
            return faces, media.log_mel(audio, rate)
        return faces, np.stack([media.log_mel(librosa.effects.pitch_shift(
            audio, sr=rate, n_steps=shift), rate) for shift in self.pitch_shifts])


def rml_decoder(audio_geometry='RML', modify_modal=False):
    """The RMLDecoder of an RMLDataset: one log-mel per PITCH_SHIFTS entry with modify_modal."""
    return RMLDecoder(audio_geometry, PITCH_SHIFTS if modify_modal else ())


def rml_resolve_paths(paths, root=None):
    """RML paths as stored, or remapped onto root (their last two parts, SUBJECT/NAME.avi)."""
    return [str(p) if root is None else os.path.join(root, rml_clip_name(p)) for p in paths]


def rml_clip_name(path):
    """'.../s1/ha1.avi' -> 's1/ha1.avi': an RML clip's name (its file name repeats per subject)."""
    return os.path.join(*Path(path).parts[-2:])


def recolour_skin(face, rgb):
    """Change the skin colour of a (128, 128, 3) uint8 face to ``rgb``: pixels in the
    usual skin range of YCbCr (Cb 77..127, Cr 133..173, Y > 60) are scaled channel-wise
    so that their mean becomes rgb, keeping their shading."""
    x = face.astype(np.float32)
    y = x @ np.float32([0.299, 0.587, 0.114])
    cb = 128 + x @ np.float32([-0.168736, -0.331264, 0.5])
    cr = 128 + x @ np.float32([0.5, -0.418688, -0.081312])
    skin = (cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173) & (y > 60)  # (128, 128)
    if not skin.any():
        return face
    gain = np.float32(rgb) / np.maximum(x[skin].mean(axis=0), 1)
    x[skin] *= gain
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def modify_choices(n, seed):
    """(n, 2) int64: per item, the index of its SKIN_COLOURS and PITCH_SHIFTS choices,
    from a generator seeded by (seed, item index): fixed for an item, known as labels."""
    out = np.empty((n, 2), np.int64)
    for i in range(n):
        rng = np.random.default_rng((seed, 0x6D6F64, i))  # 0x6D6F64: 'mod'
        out[i] = rng.integers(len(SKIN_COLOURS)), rng.integers(len(PITCH_SHIFTS))
    return out


def load_rml_split(data_path, split):
    """(paths, emotions) of an RML split config, checked against the clip names."""
    paths, labels = pickles.load_split_files(data_path, split, builder=RML_BUILDER, flat=True)
    where = f'{data_path} split {split!r}'
    if len(labels) != len(paths):
        raise BadValueError(f'{where}: {len(paths)} paths but {len(labels)} emotion labels')
    labels = [int(x) for x in labels]
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        if label != rml_emotion(path):
            raise BadValueError(f'{where}: label {label} of item {i} does not match its file '
                             f'name {path} ({RML_EMOTIONS[rml_emotion(path)]})')
    return paths, labels


class RMLDataset(CREMADDataset):
    """RML items of one split config (written by prepare/read_rml.py):

        (image (3, 128, 128) float32 in [0, 1], spectrogram (1, 256, 256) float32,
         emotion, skin, pitch, -1)

    with the released preprocessing (see RMLDecoder; training frame within
    +-frame_jitter of the centre, drawn as for CREMA-D; evaluation: the centre frame).
    skin, pitch: -1 placeholders, or with modify_modal the indices of the item's
    injected SKIN_COLOURS and PITCH_SHIFTS (see modify_choices). audio_geometry:
    'RML', or a pretrained model's source dataset. root: remap the stored paths
    (their last two parts, SUBJECT/NAME.avi) onto another RML folder.
    """

    def __init__(self, data_path, split, *, frame_jitter=RML_JITTER, modify_modal=False,
                 audio_geometry='RML', **kwargs):
        self.modify_modal = modify_modal
        self.decoder = rml_decoder(audio_geometry, modify_modal)
        super().__init__(data_path, split, frame_jitter=frame_jitter, **kwargs)

    def read_split(self, data_path, split, root):
        """(clip paths, labels (N, 4): emotion and _extra_labels) of the split config."""
        paths, emotions = load_rml_split(data_path, split)
        paths = rml_resolve_paths(paths, root)
        self.choices = modify_choices(len(paths), self.seed) if self.modify_modal else None
        return paths, np.column_stack([emotions, self._extra_labels(paths)]).astype(np.int64)

    def _extra_labels(self, paths):
        """(N, 3): skin, pitch, -1 (see the class docstring)."""
        extra = np.full((len(paths), 3), -1, np.int64)
        if self.choices is not None:
            extra[:, :2] = self.choices
        return extra

    def item_labels(self):
        return self.labels

    def clip(self, i, offset):
        """The clip's face and log-mel; with modify_modal its skin recoloured and the
        log-mel of its pitch shift (only that one is decoded without the cache)."""
        if self.choices is None:
            return super().clip(i, offset)
        skin, pitch = self.choices[i]
        if self.cache_path is None:
            decoder = RMLDecoder(self.decoder.geometry, [PITCH_SHIFTS[pitch]])
            faces, specs = decoder(self.paths[i], self.frame_jitter, self.backend, [offset])
            face, spec = faces[0], specs[0]
        else:
            face, specs = super().clip(i, offset)
            spec = specs[pitch]
        return recolour_skin(face, list(SKIN_COLOURS.values())[skin]), spec


class RMLProbeDataset(RMLDataset):
    """RML items with the seed's emotion-contradictory labels:

        (image, spectrogram, emotion, skin, pitch, user)

    skin, pitch: with modify_modal the injected SKIN_COLOURS / PITCH_SHIFTS indices;
    otherwise the synthetic twin's rendered classes (RML_SKIN_TONES,
    RML_PITCH_CLASSES) from the ground_truth.csv beside the subject folders, or -1
    when there is none (a real RML copy). user: the subject, s1..s8 -> 0..7.
    """

    def _extra_labels(self, paths):
        extra = super()._extra_labels(paths)
        extra[:, 2] = [rml_subject(p) for p in paths]
        if self.choices is None:
            extra[:, :2] = rml_ground_truth_classes(paths)
        return extra


def rml_ground_truth_classes(paths):
    """(N, 2) int64 (skin tone, pitch class) of each clip from the ground_truth.csv two
    folders up (the twin's root); -1 where there is no such file or row."""
    out = np.full((len(paths), 2), -1, np.int64)
    tables = {}
    for i, path in enumerate(paths):
        root = Path(path).parent.parent
        if root not in tables:
            table, rows = root / 'ground_truth.csv', []
            if table.is_file():
                with open(table, newline='') as f:
                    rows = list(csv.DictReader(f))
            tables[root] = {r['name']: r for r in rows}
        row = tables[root].get(f'{Path(path).parent.name}/{Path(path).stem}')
        if row is not None:
            out[i] = (RML_SKIN_TONES.index(row['skin_class']),
                      RML_PITCH_CLASSES.index(row['pitch_class']))
    return out


# ----------------------------------------------------------------------------- sampling

def split_key(key):
    """A dataset key -> (epoch, index): EpochSampler yields (epoch, index); an index
    alone is epoch 0."""
    return key if isinstance(key, tuple) else (0, key)


def item_rng(seed, epoch, index):
    """The generator of an item's training draws: a pure function of (seed, epoch, index)."""
    return np.random.default_rng((seed, epoch, int(index)))


def epoch_seed(seed, epoch):
    """A 63-bit seed for epoch-level draws (the shuffle order), a pure function of both."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """Training order of one epoch as (epoch, index) keys; call set_epoch before each.

    The keys carry the epoch into the DataLoader workers (persistent or not), so
    an item's random frame depends on (seed, epoch, index) only. The order is a
    permutation seeded by (seed, epoch) (shuffle) or 0..n-1; or, given
    ``sampler`` (e.g. a DistributedSampler), that sampler's indices, whose
    set_epoch is forwarded.
    """

    def __init__(self, n, seed=0, shuffle=True, sampler=None):
        self.n, self.seed, self.shuffle, self.sampler = n, seed, shuffle, sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.n if self.sampler is None else len(self.sampler)

    def __iter__(self):
        if self.sampler is not None:
            order = iter(self.sampler)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = range(self.n)
        return ((self.epoch, int(i)) for i in order)


# ----------------------------------------------------------------------------- EmoVoxCeleb

# FER+ classes of the facial-expression teacher, in the order of its logits.
FERPLUS = ('neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear', 'contempt')
EMO_RATE = 16000                                      # VoxCeleb WAVs
EMO_MEL = dict(n_fft=512, hop_length=160, win_length=400)  # released; librosa's 128 mels
# The released item resizes the log-mel to 512x512 and gives the audio the image
# encoder (4x down: a 128x128 latent, not the image's 32x32). 256x256 through the
# audio encoder (8x down) gives the 32x32 latent the TaskSolver needs.
EMO_AUDIO_SIZE = 256
EMO_SPLIT_FILES = ('image', 'audio', 'labels', 'index')
EMO_BUILDER = 'python3 -m prepare.read_emo'
# What an entry of each split file is (the released format).
EMO_ENTRIES = {
    'image': lambda x: (isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str)
                        and pickles.is_int(x[1])),
    'audio': lambda x: isinstance(x, str),
    'labels': lambda x: isinstance(x, (list, np.ndarray)),
    'index': pickles.is_int}
EMO_ENTRY_NAMES = {'image': '(frame folder, number of frames) pairs', 'audio': 'WAV paths',
                   'labels': 'per-frame logit arrays', 'index': 'video indices (ints)'}


def load_emo_split(data_path, split):
    """{'image': [(frame folder, num_frames)], 'audio': [WAV path], 'labels': [(frames, 8)
    float32 teacher logits per video], 'index': [video of each item]} of a read_emo.py
    split folder; BadValueError names the file of a malformed or misaligned list."""
    lists = {}
    for kind in EMO_SPLIT_FILES:
        path = Path(data_path) / f'{split}_{kind}.pkl'
        if not path.is_file():
            raise MissingError(f'split file {path} does not exist (build it with {EMO_BUILDER})')
        lists[kind] = pickles.read(path)
        if not isinstance(lists[kind], (list, tuple)) or not all(
                map(EMO_ENTRIES[kind], lists[kind])):
            raise BadValueError(f'{path} is not a list of {EMO_ENTRY_NAMES[kind]}: rebuild '
                                f'{data_path} with {EMO_BUILDER}')
    where = f'{data_path} split {split!r}'
    if not len(lists['image']) == len(lists['audio']) == len(lists['index']):
        raise BadValueError(f'{where}: {len(lists["image"])} image, {len(lists["audio"])} audio '
                         f'and {len(lists["index"])} index entries; they must be aligned')
    lists['labels'] = [np.asarray(x, np.float32) for x in lists['labels']]
    for i, ((folder, count), video) in enumerate(zip(lists['image'], lists['index'],
                                                     strict=True)):
        if not 0 <= video < len(lists['labels']):
            raise BadValueError(f'{where}: item {i} points to video {video} of '
                             f'{len(lists["labels"])} in {split}_labels.pkl')
        if lists['labels'][video].shape != (count, len(FERPLUS)):
            raise BadValueError(f'{where}: item {i} ({folder}) has {count} frames but its logits '
                             f'are {lists["labels"][video].shape}, not ({count}, {len(FERPLUS)})')
    return lists


def check_emo_tracks(lists, where, show=3):
    """MissingError unless every item's frames (000001.jpg .. its count) and WAV exist
    (one folder listing per track: no decoding, which read_emo.py did)."""
    bad = []
    for (folder, count), wav in zip(lists['image'], lists['audio'], strict=True):
        names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        gone = [frame_name(k) for k in range(count) if frame_name(k) not in names]
        if gone:
            bad.append(f'{folder}: {len(gone)} of its {count} frames are missing '
                       f'({gone[0]}, ...)')
        if not os.path.isfile(wav):
            bad.append(f'{wav} is missing')
    if bad:
        more = f' (and {len(bad) - show} more)' if len(bad) > show else ''
        raise MissingError(f'{where}: {"; ".join(bad[:show])}{more}; restore them or rebuild '
                           f'the split files with {EMO_BUILDER}')


def subsample_items(n, subsample):
    """Positions kept by the seed's subsample=N: every ceil(n / N)-th item from 0."""
    if subsample is None:
        return np.arange(n)
    return np.arange(0, n, int(np.ceil(n / float(subsample))))


def track_paths(root, key):
    """(frame folder, WAV, logits file) of track ``key`` under ``root``."""
    root = Path(root)
    return root / 'frames' / key, root / 'wav' / f'{key}.wav', root / 'logits' / f'{key}.npy'


def frame_name(k):
    """Frame file of 0-based frame k in a face-track folder: '000001.jpg' for k = 0."""
    return f'{k + 1:06d}.jpg'


class EmoVoxCelebDataset(Dataset):
    """EmoVoxCeleb items of a read_emo.py split folder.

    Item: (image (3, 128, 128) float32 in [0, 1], log-mel (1, 256, 256) float32,
    teacher logits (8,) float32 of the drawn frame, FER+ order). The frame is drawn
    uniformly from the track when training (from a generator seeded by (seed,
    epoch, item), keys (epoch, i) as the training sampler yields them) and is the
    track's centre frame when evaluating. subsample=N keeps every ceil(len/N)-th
    item, as the seed does.
    """

    def __init__(self, data_path, split, *, train=None, subsample=None, seed=0):
        lists = load_emo_split(data_path, split)
        keep = subsample_items(len(lists['index']), subsample)
        self.tracks = [lists['image'][k] for k in keep]   # (frame folder, num_frames)
        self.audio = [lists['audio'][k] for k in keep]    # WAV paths
        self.videos = [lists['index'][k] for k in keep]   # item -> entry of labels
        self.labels = lists['labels']                      # per video: (frames, 8)
        self.train = split == 'train' if train is None else train
        self.seed = seed

    def __len__(self):
        return len(self.tracks)

    def __getitem__(self, key):
        """key: an index, or (epoch, index) from the training sampler."""
        epoch, i = split_key(key)
        k = self.frame(epoch, i)
        face = media.read_jpeg(Path(self.tracks[i][0]) / frame_name(k), media.IMAGE_SIZE)
        samples, rate = media.read_wav(self.audio[i])
        spec = media.resized_log_mel(samples, rate, EMO_AUDIO_SIZE, **EMO_MEL)
        logits = torch.from_numpy(self.labels[self.videos[i]][k].copy())
        return to_image(face), to_spectrogram(spec), logits

    def frame(self, epoch, i):
        """0-based frame of item i: uniform over the track in training, else the centre."""
        count = self.tracks[i][1]
        if not self.train:
            return media.centre_index(count)
        return int(item_rng(self.seed, epoch, i).integers(count))


# ----------------------------------------------------------------------------- RML features

FEAT_BUILDER = 'python3 -m prepare.make_features'


def open_features(path):
    """A feature array of a make_features.py folder, memory-mapped; one line naming a
    missing, truncated or damaged file."""
    try:
        return np.load(path, mmap_mode='r')
    except FileNotFoundError:
        raise MissingError(f'{path} does not exist: rebuild {Path(path).parent} with '
                           f'{FEAT_BUILDER}') from None
    except (OSError, ValueError, EOFError) as e:
        raise BadValueError(f'{path} cannot be read as an array ({e}): rebuild '
                            f'{Path(path).parent} with {FEAT_BUILDER}') from None


def feature_info(data_path):
    """features.json of a make_features.py folder (sizes, layers, models); ValueError
    naming the file when data_path is not such a folder."""
    path = Path(data_path) / 'features.json'
    if not path.is_file():
        raise MissingError(f'{path} does not exist: data_path={str(data_path)!r} is not a '
                           f'feature folder (write one with {FEAT_BUILDER})')
    return json.loads(path.read_text())


class RMLFeatDataset(Dataset):
    """Items of a make_features.py folder: (image features (16, Fi) float32, audio
    features (64, Fa) float32 of transformer layer ``layer`` (1-based; the seed's
    best: 7), emotion). The features are fixed: training and evaluation items agree.
    """

    def __init__(self, data_path, split, *, train=None, layer=7):
        info = feature_info(data_path)
        count = info['num_layers']
        if not (isinstance(layer, int) and 1 <= layer <= count):
            raise BadValueError(f'layer={layer!r}: {data_path} holds {count} audio layers '
                             f'({info["audio_bundle"]}); give one in 1..{count}')
        self.layer, self.train = layer, train
        self.files = {m: Path(data_path) / f'{split}_{m}.npy' for m in ('image', 'audio')}
        _, labels = pickles.load_split_files(data_path, split, FEAT_BUILDER, flat=True)
        self.labels = [int(e) for e in labels]
        # (N, 16, Fi) image and (N, layers, 64, Fa) audio features, one row per label
        want = {'image': (len(self.labels), None, info.get('image_features')),  # None: any
                'audio': (len(self.labels), count, None, info.get('audio_features'))}
        for m, path in self.files.items():
            shape = open_features(path).shape
            if len(shape) != len(want[m]) or any(w not in (None, n)
                                                 for w, n in zip(want[m], shape, strict=True)):
                expected = ', '.join('?' if w is None else str(w) for w in want[m])
                raise BadValueError(f'{path} holds an array of shape {shape}, expected '
                                    f'({expected}) ({len(self.labels)} labels); rebuild '
                                    f'{data_path} with {FEAT_BUILDER}')
        self._arrays = None  # opened lazily, per process (DataLoader workers)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        _, i = split_key(key)
        if self._arrays is None:
            self._arrays = {m: open_features(path) for m, path in self.files.items()}
        image = np.asarray(self._arrays['image'][i], np.float32)                 # (16, Fi)
        audio = np.asarray(self._arrays['audio'][i, self.layer - 1], np.float32)  # (64, Fa)
        return torch.from_numpy(image), torch.from_numpy(audio), self.labels[i]

    def __getstate__(self):
        return {**self.__dict__, '_arrays': None}


# ----------------------------------------------------------------------------- registry

DATASETS = {'CREMA-D': CREMADDataset, 'RML': RMLDataset, 'RML_probe': RMLProbeDataset,
            'EmoVoxCeleb': EmoVoxCelebDataset, 'RML_feat': RMLFeatDataset}
# Class names in label order (logs, metrics, plots); their count sizes the classifier.
CLASS_NAMES = {'CREMA-D': EMOTIONS, 'RML': RML_EMOTIONS, 'RML_feat': RML_EMOTIONS,
               'RML_probe': RML_EMOTIONS, 'EmoVoxCeleb': FERPLUS}
NUM_CLASSES = {name: len(names) for name, names in CLASS_NAMES.items()}
# Datasets whose label is a teacher's logits (C,): MSE loss, accuracy by arg-max.
SOFT_LABELS = ('EmoVoxCeleb',)


def default_frame_jitter(dataset):
    """The released training-frame window of a dataset: RML +-22, CREMA-D +-15."""
    return RML_JITTER if dataset in RML_DATASETS else CREMAD_JITTER


def get_dataset(name, *args, **kwargs):
    """Instantiate dataset ``name`` (a key of DATASETS) with the given arguments."""
    if name in DATASETS:
        return DATASETS[name](*args, **kwargs)
    raise BadValueError(f'unknown dataset {name!r}; known: {", ".join(DATASETS)}')
