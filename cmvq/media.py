"""Media I/O shared by the datasets, the synthetic twin and the benchmark.

CREMA-D ships every clip twice: ``VideoFlash/NAME.flv`` (480x360 video at 30 fps
with a stereo 44.1 kHz MP3 track) and ``AudioWAV/NAME.wav`` (16 kHz mono 16-bit
PCM). This module writes and reads both, and turns audio into the log-mel
spectrogram and a video frame into the face crop the model sees.

RML ships AVI clips (30 fps, mono 16-bit PCM at 22,050 Hz); ``write_avi`` writes
them for its twin and the same readers decode them.

Two readers return the same arrays for any container (FLV, AVI): PyAV (fast, the
default) and moviepy (the original code's reader, kept for comparison). A file
that is missing or cannot be decoded raises ``MediaError`` naming the file.
"""
import wave

import av
import librosa
import numpy as np
from PIL import Image

from cmvq.errors import UserError

VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_FPS = 480, 360, 30
AUDIO_RATE = 44100           # FLV audio track
WAV_RATE = 16000             # AudioWAV files
VIDEO_BITRATE = 800_000      # close to CREMA-D's ~270 kB for a 2.5 s clip
AUDIO_BITRATE = 64_000
AVI_RATE = 22050             # RML's audio: mono 16-bit PCM
AVI_BITRATE = 1_500_000      # MPEG-4 part 2 video of the RML twin

# Feature parameters of the paper's pipeline.
CROP_SIZE = 280              # top-centre square crop of the 480x360 frame
IMAGE_SIZE = 128             # crop resized to 128x128
MEL = dict(n_fft=2048, win_length=512, hop_length=353, n_mels=256)
SPEC_FRAMES = 256            # log-mel centre-cropped / reflect-padded to 256 frames


# A clip is rejected (MediaError) when it is shorter than this, or when it decodes
# to fewer than this fraction of the frames its container's duration promises
# (a truncated file keeps its header's duration: 13 of ~31 frames).
MIN_SECONDS = 0.5
MIN_FRAME_FRACTION = 0.8
FPS_TOLERANCE = 0.5          # a clip's frame rate, when checked: 30 accepts 29.97


class MediaError(UserError, RuntimeError):
    """A clip that is missing, cannot be decoded, or fails a check: the clip's
    ``path`` and the ``reason`` (one line): MediaError(path, reason), str() 'path:
    reason'; or MediaError(message) (path None) for several clips."""

    def __init__(self, path, reason=None):
        if reason is None:  # MediaError(message): several clips, or no single path
            path, reason = None, path
        super().__init__(reason if path is None else f'{path}: {reason}')
        self.path, self.reason = path, reason


# ----------------------------------------------------------------------------- writing

def write_flv(path, frames, audio):
    """Write an FLV like CREMA-D's: Sorenson (flv1) video, stereo MP3 audio.

    frames: (T, 360, 480, 3) uint8 RGB at 30 fps.
    audio: (2, N) or (N,) float in [-1, 1] at 44.1 kHz.
    Single-threaded encoders keep the output identical across runs.
    """
    audio = np.atleast_2d(np.asarray(audio, np.float32))
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    with av.open(str(path), 'w', format='flv') as out:
        video = out.add_stream('flv1', rate=VIDEO_FPS)
        video.width, video.height = VIDEO_WIDTH, VIDEO_HEIGHT
        video.pix_fmt, video.bit_rate = 'yuv420p', VIDEO_BITRATE
        video.codec_context.thread_count = 1
        sound = out.add_stream('libmp3lame', rate=AUDIO_RATE, layout='stereo')
        sound.bit_rate = AUDIO_BITRATE
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        out.mux(video.encode())
        hop = 1152  # one MP3 frame
        for start in range(0, audio.shape[1], hop):
            chunk = np.ascontiguousarray(audio[:, start:start + hop])
            frame = av.AudioFrame.from_ndarray(chunk, format='fltp', layout='stereo')
            frame.sample_rate, frame.pts = AUDIO_RATE, start
            out.mux(sound.encode(frame))
        out.mux(sound.encode())


def write_avi(path, frames, audio, sample_rate=AVI_RATE):
    """Write an AVI like RML's: MPEG-4 part 2 video at 30 fps, mono 16-bit PCM audio.

    frames: (T, H, W, 3) uint8 RGB (H and W even). audio: (N,) float in [-1, 1]
    at sample_rate. Single-threaded encoding keeps the output identical across runs.
    """
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)[None]  # (1, N)
    with av.open(str(path), 'w', format='avi') as out:
        video = out.add_stream('mpeg4', rate=VIDEO_FPS)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt, video.bit_rate = 'yuv420p', AVI_BITRATE
        video.codec_context.thread_count = 1
        sound = out.add_stream('pcm_s16le', rate=sample_rate, layout='mono')
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        out.mux(video.encode())
        hop = 1024
        for start in range(0, pcm.shape[1], hop):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + hop]),
                                               format='s16', layout='mono')
            frame.sample_rate, frame.pts = sample_rate, start
            out.mux(sound.encode(frame))
        out.mux(sound.encode())


def write_wav(path, audio, sample_rate=WAV_RATE):
    """16-bit PCM mono WAV. audio: (N,) float in [-1, 1]."""
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype('<i2')
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


# ----------------------------------------------------------------------------- reading

def read_wav(path):
    """(samples (N,) float32 in [-1, 1], sample_rate) of a 16-bit PCM WAV."""
    try:
        with wave.open(str(path), 'rb') as w:
            if w.getsampwidth() != 2:
                raise MediaError(path, f'expected 16-bit PCM, got {8 * w.getsampwidth()}-bit')
            pcm = np.frombuffer(w.readframes(w.getnframes()), '<i2')
            pcm = pcm.reshape(-1, w.getnchannels()).mean(axis=1)
            return (pcm / 32768).astype(np.float32), w.getframerate()
    except (OSError, EOFError, wave.Error) as e:
        raise MediaError(path, f'cannot read WAV: {e}') from e


def read_flv(path, backend='pyav', pick=None, size=None, min_seconds=MIN_SECONDS,
             audio_like_moviepy=False, fps=None):
    """Decode a clip (FLV, AVI or any container FFmpeg reads): (frames (T, H, W, 3)
    uint8 RGB, audio (C, N) float32 in [-1, 1], fps, rate).

    backend: 'pyav' (fast) or 'moviepy' (the original code's reader).
    pick: optional function num_frames -> frame indices; only those frames are
    returned, in that order (T = len(indices)). PyAV then converts just them to
    RGB, which is most of its decoding time.
    audio_like_moviepy: PyAV's audio as moviepy returns it (moviepy_audio), the
    released CREMA-D item's reader: PyAV alone returns every decoded sample, 0-2
    log-mel frames more or fewer, which shifts the centre crop.
    Raises MediaError (path, reason) for a clip that cannot be decoded, has no
    audio stream, is truncated (see MIN_FRAME_FRACTION), is shorter than
    min_seconds, or whose frames are not size=(width, height) or whose frame rate is
    not fps, when given.
    """
    readers = {'pyav': _read_pyav, 'moviepy': _read_moviepy}
    if backend not in readers:
        raise ValueError(f'backend={backend!r} is not one of {", ".join(map(repr, readers))}')
    pick = pick or (lambda n: range(n))
    try:
        info = probe(path)
        check_clip(path, info, size, min_seconds, fps)
        frames, audio, fps, rate = readers[backend](str(path), pick)
        if audio_like_moviepy and backend == 'pyav':
            audio = moviepy_audio(audio, info['duration'], rate)
    except MediaError:
        raise
    except Exception as e:  # decoders raise many types; the caller needs the file name
        raise MediaError(path, f'cannot decode: {type(e).__name__}: {e}') from e
    if len(frames) == 0 or audio.shape[-1] == 0:
        raise MediaError(path, 'cannot decode: no video frames or no audio samples')
    return frames, audio, fps, rate


def probe(path):
    """Container facts without decoding (~1 ms): {'duration' (s, from the header),
    'fps', 'width', 'height', 'audio' (has an audio stream), 'frames' (video packets,
    one per frame: a truncated file has fewer than its duration promises)}."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(path, 'no video stream')
        video = container.streams.video[0]
        info = {'duration': (container.duration or 0) / av.time_base,
                'fps': float(video.average_rate or VIDEO_FPS), 'width': video.width,
                'height': video.height, 'audio': bool(container.streams.audio)}
        info['frames'] = sum(p.size > 0 for p in container.demux(video))
    return info


def check_clip(path, info, size=None, min_seconds=MIN_SECONDS, fps=None):
    """Raise MediaError naming the first failed check of a probed/decoded clip (size:
    (width, height), fps: frame rate, each checked when given)."""
    if not info['audio']:
        raise MediaError(path, 'no audio stream')
    if size is not None and (info['width'], info['height']) != tuple(size):
        raise MediaError(path, f'frame size {info["width"]}x{info["height"]}, '
                               f'expected {size[0]}x{size[1]}')
    if fps is not None and abs(info['fps'] - fps) > FPS_TOLERANCE:
        raise MediaError(path, f'frame rate {info["fps"]:.4g} fps, expected {fps}')
    promised = info['duration'] * info['fps']
    if info['frames'] < MIN_FRAME_FRACTION * promised:
        raise MediaError(path, f'truncated: {info["frames"]} frames, but its container '
                               f'promises {info["duration"]:.2f} s ({promised:.0f} frames)')
    seconds = info['frames'] / info['fps']
    if seconds < min_seconds:
        raise MediaError(path, f'too short: {seconds:.2f} s ({info["frames"]} frames), '
                               f'minimum {min_seconds} s')


def _read_pyav(path, pick):
    with av.open(path) as container:
        video = container.streams.video[0]
        fps = float(video.average_rate)
        frames, chunks = [], []
        for frame in container.decode(video=0, audio=0):
            if isinstance(frame, av.VideoFrame):
                frames.append(frame)  # still YUV: converted below if picked
            else:
                rate = frame.sample_rate
                chunks.append(frame.to_ndarray().reshape(len(frame.layout.channels), -1)
                              if frame.format.is_planar else
                              frame.to_ndarray().reshape(-1, len(frame.layout.channels)).T)
    audio = _to_float(np.concatenate(chunks, axis=1))
    picked = [frames[i].to_ndarray(format='rgb24') for i in pick(len(frames))]
    return np.stack(picked) if picked else np.zeros((0, 0, 0, 3), np.uint8), audio, fps, rate


def container_samples(duration, rate):
    """Audio samples moviepy returns for a clip of `duration` s (the container's):
    int(rate * D), D the duration as FFmpeg prints it (rounded half up to 10 ms)."""
    centis = (round(duration * 1e6) + 5000) // 10000
    return int(rate * (centis / 100))


def moviepy_audio(audio, duration, rate):
    """Decoded (C, N) float audio as moviepy returns it: container_samples(duration,
    rate) samples (cut, or padded with zeros at the end as moviepy pads reads past
    the last decoded sample) of 16-bit PCM (FFmpeg's s16 rounding), float32."""
    n = container_samples(duration, rate)
    audio = audio[..., :n]
    audio = np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, n - audio.shape[-1])])
    return (np.clip(np.rint(audio * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def _to_float(samples):
    """Decoded samples -> float32 in [-1, 1]: PCM integers (AVI) are scaled, floats
    (MP3) kept."""
    if np.issubdtype(samples.dtype, np.integer):
        return (samples / float(-np.iinfo(samples.dtype).min)).astype(np.float32)
    return samples.astype(np.float32)


def _read_moviepy(path, pick):
    from moviepy import VideoFileClip  # slow to import; only the comparison path needs it
    with VideoFileClip(path) as clip:
        # Read frames in order from moviepy's ffmpeg pipe: iter_frames() seeks by
        # time and, rounding t * fps, repeats or skips a frame now and then.
        reader = clip.reader
        reader.initialize(0)
        frames = np.stack([reader.read_frame() for _ in range(reader.n_frames)])
        frames = frames[np.asarray(pick(len(frames)), dtype=np.int64)]
        rate = clip.audio.fps
        audio = clip.audio.to_soundarray(fps=rate).T.astype(np.float32)
        return frames, audio, float(clip.fps), rate


# ----------------------------------------------------------------------------- features

def face_crop(frame):
    """(360, 480, 3) uint8 frame -> (128, 128, 3) uint8 top-centre face crop."""
    h, w = frame.shape[:2]
    size = min(CROP_SIZE, h, w)
    left = (w - size) // 2
    crop = Image.fromarray(frame[:size, left:left + size])
    return np.asarray(crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def centre_index(num_frames):
    """Index of the frame the evaluation uses."""
    return num_frames // 2


def log_mel(audio, sample_rate=AUDIO_RATE):
    """Mono audio (N,) -> (256 mels, 256 frames) float32 log-mel power in dB."""
    spec = librosa.feature.melspectrogram(y=np.asarray(audio, np.float32), sr=sample_rate, **MEL)
    return fit_frames(librosa.power_to_db(spec)).astype(np.float32)


def resized_log_mel(audio, sample_rate, size, **mel):
    """Mono audio (N,) -> (size, size) float32: log-mel power in dB (librosa, ``mel``
    its n_fft/hop_length/win_length/n_mels) stretched or squeezed to size x size
    (bilinear, antialiased), as the released EmoVoxCeleb item resizes its log-mel."""
    spec = librosa.feature.melspectrogram(y=np.asarray(audio, np.float32), sr=sample_rate, **mel)
    db = Image.fromarray(librosa.power_to_db(spec).astype(np.float32))  # mode 'F'
    return np.asarray(db.resize((size, size), Image.BILINEAR), dtype=np.float32)


def read_jpeg(path, size):
    """(size, size, 3) uint8 RGB of an image file, resized bilinearly; MediaError names
    a missing or unreadable file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert('RGB').resize((size, size), Image.BILINEAR))
    except OSError as e:
        raise MediaError(f'cannot read image {path}: {e}') from e


def check_image(path):
    """MediaError naming an image file that does not decode (a zero-byte or truncated
    JPEG); decoded at 1/8 scale where the format allows (JPEG DCT scaling: fast)."""
    try:
        with Image.open(path) as image:
            image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, f'cannot decode image: {e}') from e


def fit_frames(spec, length=SPEC_FRAMES):
    """Centre-crop or reflect-pad the time axis (last) of ``spec`` to ``length``.

    As the released items do: an odd number of frames to crop leaves the extra
    one at the end, an odd number to pad puts the extra one at the start."""
    n = spec.shape[-1]
    if n >= length:
        start = (n - length) // 2
        return spec[..., start:start + length]
    before = length - n - (length - n) // 2
    pad = [(0, 0)] * (spec.ndim - 1) + [(before, length - n - before)]
    return np.pad(spec, pad, mode='reflect' if n > 1 else 'edge')
