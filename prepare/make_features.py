"""Extract the RML_feat features: an RML (or CREMA-D) split folder -> a feature folder.

    python3 -m prepare.make_features --data_path=data_rml --feat_path=data_rml_feat
    python3 -m prepare.make_features --image_model=resnet18 --image_weights=None \\
        --audio_size=tiny --audio_weights=None --image_size=64     # random tiny models

For every clip of the train / val / test splits of ``data_path`` (prepare/read_rml.py's
or read_cremad.py's files), with the RML preprocessing (DESIGN 8):
- the audio window: the central 2.5 s (RML_SECONDS) when the clip is longer,
  mono, resampled to the speech model's rate (16 kHz);
- image: IMAGE_FRAMES (16) frames spread evenly over that window, each cropped
  as the RML item crops (190-pixel square centre crop, 380 when the frame is
  not 240 high; CREMA-D: the top-centre 280 crop) and resized to 128x128, then
  resized to image_size and ImageNet-normalised for a torchvision model whose
  last fully connected layer is removed (vgg16: fc7, 4096 values per frame);
- audio: the output of every transformer layer of a torchaudio wav2vec2-family
  bundle (WAV2VEC2_LARGE: 24 layers of 1024 values at 50 frames/s), each taken
  down to AUDIO_FRAMES (64) frames spread evenly over the window.

Writes feat_path/ as a whole (all files or none):
    {split}_image.npy    (N, 16, Fi) memory-mappable, dtype as set (float16)
    {split}_audio.npy    (N, L, 64, Fa), every layer
    {split}_videos.pkl   the clip of each row (the index), as in data_path
    {split}_labels.pkl   the emotion of each row (one list, RML label order)
    train_image_var.pkl  variance of the training image features
    train_audio_var.pkl  per layer: the variance of the training audio features
    features.json        models, weights, sizes, frames, preprocessing, source
RMLFeatDataset(feat_path, split, layer=7) reads one layer (1 = the first
transformer layer). Weights: 'download' uses the library's own loader (torchvision
get_model(weights='DEFAULT'), torchaudio bundle.get_model(); needs internet once,
then torch.hub's cache), a path loads a state dict from that local file (tensors
only: weights_only=True; a missing or foreign file is one line naming it), None
keeps the random initialisation (tests; meaningless features). A killed run's
temporary folder (.<feat_path>.tmp-*) is removed on the next run.
"""
from math import gcd
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchvision
from scipy.signal import resample_poly

import datasets
from cmvq import atomic, media
from cmvq.configurator import configure
from cmvq.errors import BadValueError, ExistsError, run_script
from cmvq.progress import progress_bar
from cmvq.runs import load_weights
from model_feat import frame_indices

# ----------------------------------------------------------------------------- config
data_path = 'data_rml'          # split folder of the clips (prepare/read_rml.py, read_cremad.py)
feat_path = 'data_rml_feat'     # output feature folder (RMLFeatDataset reads it)
dataset = 'RML'                 # 'RML' or 'CREMA-D': whose preprocessing and split files
image_model = 'vgg16'           # torchvision model (its last fc removed): 'vgg16', 'resnet18', ..
image_weights = 'download'      # 'download' (torchvision's loader), a state dict file, or None
image_size = 224                # the face crop is resized to this for the image model
audio_bundle = 'WAV2VEC2_LARGE'  # torchaudio.pipelines wav2vec2-family bundle (24 layers)
audio_weights = 'download'      # 'download' (bundle.get_model()), a state dict file, or None
audio_size = 'bundle'           # 'bundle': the bundle's architecture; 'tiny': TINY_AUDIO (tests)
dtype = 'float16'               # stored precision: 'float16' or 'float32'
device = 'auto'                 # 'auto' (CUDA if available), 'cpu', 'cuda'
overwrite = False               # True: replace an existing feat_path
progress = True                 # progress bars
# -----------------------------------------------------------------------------
CHOICES = {'dataset': ('RML', 'CREMA-D'), 'audio_size': ('bundle', 'tiny'),
           'dtype': ('float16', 'float32'), 'device': ('auto', 'cpu', 'cuda')}
SPLITS = ('train', 'val', 'test')
IMAGE_FRAMES, AUDIO_FRAMES = 16, 64   # released: 16 x 4096 image, 64 x 1024 audio values
RML_SECONDS = datasets.AUDIO_GEOMETRIES['RML'][1]  # the RML item's central 2.5 s of audio
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Bundles built with torchaudio.models.wav2vec2_model (wav2vec 2.0, HuBERT).
AUDIO_BUNDLES = ('WAV2VEC2_BASE', 'WAV2VEC2_LARGE', 'WAV2VEC2_LARGE_LV60K', 'WAV2VEC2_XLSR53',
                 'HUBERT_BASE', 'HUBERT_LARGE', 'HUBERT_XLARGE')
# A wav2vec2-family model small enough for tests: same code path and frame rate
# (320 samples a frame at 16 kHz), 4 layers of 32 values, random weights.
TINY_AUDIO = dict(extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4
                  + [(32, 2, 2)] * 2, encoder_embed_dim=32, encoder_num_layers=4,
                  encoder_num_heads=2, encoder_ff_interm_features=64, encoder_pos_conv_kernel=16,
                  encoder_pos_conv_groups=4)


# ----------------------------------------------------------------------------- models

def build_image_model(name, weights):
    """(torchvision model without its last fc, in eval mode, feature size)."""
    try:
        net = torchvision.models.get_model(name, weights='DEFAULT' if weights == 'download'
                                           else None)
    except ValueError as e:
        raise BadValueError(f'image_model={name!r}: {e}') from None
    if weights not in ('download', None):
        load_weights(net, weights, key=None)
    parent, last = _last_linear(net)
    size = getattr(parent, last).in_features
    setattr(parent, last, torch.nn.Identity())  # (B, F): the penultimate features
    return net.eval(), size


def _last_linear(net):
    """(parent module, attribute name) of the last nn.Linear in net."""
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise BadValueError(f'{type(net).__name__} has no fully connected layer to remove')
    path, _, last = names[-1].rpartition('.')
    return (net.get_submodule(path) if path else net), last


class AudioModel(torch.nn.Module):
    """A wav2vec2-family model returning every transformer layer's output.

    forward(waveform (1, N) at `rate`) -> (L, T, F), T = 50 frames/s."""

    def __init__(self, bundle_name, weights, size='bundle'):
        super().__init__()
        if bundle_name not in AUDIO_BUNDLES:
            raise BadValueError(f'audio_bundle={bundle_name!r} is not one of '
                             f'{", ".join(AUDIO_BUNDLES)}')
        if size == 'tiny' and weights is not None:
            raise BadValueError("audio_size='tiny' is a randomly initialised test model: "
                             'it needs audio_weights=None')
        bundle = getattr(torchaudio.pipelines, bundle_name)
        self.rate = bundle.sample_rate
        # Some large bundles expect a layer-normalised waveform; get_model() adds it.
        self.normalize = bundle._normalize_waveform and weights != 'download'
        if weights == 'download' and size == 'bundle':
            self.net = bundle.get_model()  # torchaudio's loader (downloads once)
        else:
            params = {**bundle._params, **(TINY_AUDIO if size == 'tiny' else {})}
            self.net = torchaudio.models.wav2vec2_model(**params)
            if weights not in ('download', None):
                load_weights(self.net, weights, key=None)
        self.net.eval()

    def forward(self, waveform):
        if self.normalize:
            waveform = F.layer_norm(waveform, waveform.shape)
        layers, _ = self.net.extract_features(waveform)  # L x (1, T, F)
        return torch.cat(layers)


# ----------------------------------------------------------------------------- one clip

def clip_window(path, kind):
    """Decode a clip with the RML preprocessing: (faces (16, 128, 128, 3) uint8 spread
    over the audio window, mono audio (N,) float32 of the window, rate)."""
    frames, audio, fps, rate = media.read_flv(path)
    mono = audio.mean(axis=0)
    keep = int(RML_SECONDS * rate)
    start = (len(mono) - keep) // 2 if len(mono) > keep else 0
    window = mono[start:start + keep]
    first = int(start / rate * fps)
    last = min(len(frames), first + max(1, int(round(len(window) / rate * fps)))) - 1
    picks = [first + k for k in frame_indices(last - first + 1, IMAGE_FRAMES)]
    crop = datasets.rml_face if kind == 'RML' else media.face_crop
    return np.stack([crop(frames[k]) for k in picks]), window, rate


@torch.no_grad()
def clip_features(path, kind, image_net, audio_net, size, device):
    """(image features (16, Fi), audio features (L, 64, Fa)) of one clip, float32."""
    faces, window, rate = clip_window(path, kind)
    x = torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False,
                      antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    image = image_net((x - mean) / std)                                  # (16, Fi)
    g = gcd(int(rate), audio_net.rate)
    wave = resample_poly(window, audio_net.rate // g, int(rate) // g).astype(np.float32)
    layers = audio_net(torch.from_numpy(wave)[None].to(device))          # (L, T, Fa)
    audio = layers[:, frame_indices(layers.shape[1], AUDIO_FRAMES)]      # (L, 64, Fa)
    return image.float().cpu().numpy(), audio.float().cpu().numpy()


# ----------------------------------------------------------------------------- folders

def load_clips(data_path, split, kind):
    """(clip paths, emotions) of a split folder: prepare/read_rml.py's, or read_cremad.py's
    emotion list out of its 8."""
    if kind == 'RML':
        return datasets.load_rml_split(data_path, split)
    paths, labels = datasets.load_split(data_path, split)
    return paths, labels[datasets.EMOTION]


def extract(data_path, feat_path, *, kind='RML', image_model='vgg16', image_weights='download',
            image_size=224, audio_bundle='WAV2VEC2_LARGE', audio_weights='download',
            audio_size='bundle', dtype='float16', device='cpu', overwrite=False, progress=True):
    """Write the feature folder of every split of data_path; returns features.json."""
    clips = {s: load_clips(data_path, s, kind) for s in SPLITS}  # checked before any work
    empty = [s for s in SPLITS if not clips[s][0]]
    if empty:
        raise BadValueError(f'{data_path}: split(s) {", ".join(empty)} hold no clips')
    if Path(feat_path).exists() and any(Path(feat_path).iterdir()) and not overwrite:
        raise ExistsError(f'feat_path {str(feat_path)!r} already exists and is not empty; '
                              'pass overwrite=True (--overwrite=True) to replace it')
    image_net, image_dim = build_image_model(image_model, image_weights)
    audio_net = AudioModel(audio_bundle, audio_weights, audio_size)
    image_net, audio_net = image_net.to(device), audio_net.to(device)
    info = {'source': str(data_path), 'dataset': kind, 'image_model': image_model,
            'image_weights': image_weights, 'image_size': image_size,
            'audio_bundle': audio_bundle, 'audio_weights': audio_weights,
            'audio_size': audio_size, 'dtype': dtype, 'image_frames': IMAGE_FRAMES,
            'audio_frames': AUDIO_FRAMES, 'window_s': RML_SECONDS, 'audio_rate': audio_net.rate,
            'sizes': {s: len(clips[s][0]) for s in SPLITS}}

    def fill(folder):
        for split in SPLITS:
            paths, emotions = clips[split]
            for i, path in enumerate(progress_bar(paths, desc=f'features {split}',
                                                  unit='clip', enabled=progress)):
                x, y = clip_features(path, kind, image_net, audio_net, image_size, device)
                if i == 0:  # sizes known after the first clip
                    image = _memmap(folder / f'{split}_image.npy', dtype, (len(paths), *x.shape))
                    audio = _memmap(folder / f'{split}_audio.npy', dtype, (len(paths), *y.shape))
                    info.update(image_features=x.shape[-1], audio_features=y.shape[-1],
                                num_layers=y.shape[0])
                image[i], audio[i] = x, y
            image.flush()
            audio.flush()
            atomic.write_pickle(folder / f'{split}_videos.pkl', list(paths))
            atomic.write_pickle(folder / f'{split}_labels.pkl', emotions)
        train_image = np.load(folder / 'train_image.npy', mmap_mode='r')
        train_audio = np.load(folder / 'train_audio.npy', mmap_mode='r')
        image_var = float(np.var(train_image, dtype=np.float64))
        audio_var = [float(np.var(train_audio[:, k], dtype=np.float64))
                     for k in range(train_audio.shape[1])]
        atomic.write_pickle(folder / 'train_image_var.pkl', image_var)
        atomic.write_pickle(folder / 'train_audio_var.pkl', audio_var)
        info.update(image_var=image_var, audio_var=audio_var)
        atomic.write_json(folder / 'features.json', info)
    atomic.write_folder(feat_path, fill, overwrite=overwrite)
    return info


def _memmap(path, dtype, shape):
    return np.lib.format.open_memmap(path, 'w+', np.dtype(dtype), shape)


def main(argv=None):
    cfg = configure(globals(), argv, choices=CHOICES)
    dev = cfg['device']
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    info = extract(cfg['data_path'], cfg['feat_path'], kind=cfg['dataset'],
                       image_model=cfg['image_model'], image_weights=cfg['image_weights'],
                       image_size=cfg['image_size'], audio_bundle=cfg['audio_bundle'],
                       audio_weights=cfg['audio_weights'], audio_size=cfg['audio_size'],
                       dtype=cfg['dtype'], device=dev, overwrite=cfg['overwrite'],
                       progress=cfg['progress'])
    print(f'wrote {cfg["feat_path"]}: ' + ', '.join(f'{s} {n}' for s, n in info['sizes'].items())
          + f' clips; image {IMAGE_FRAMES} x {info.get("image_features")}, audio '
          f'{info.get("num_layers")} layers x {AUDIO_FRAMES} x {info.get("audio_features")}')


if __name__ == '__main__':
    run_script(main)
