"""Predict the emotion of single clips with a saved run.

    python3 -m tools.predict --timestamp=20261121-101500 clip.flv other.mp4 folder/ [--key=value]

A clip is an FLV, AVI or MP4 file (anything PyAV decodes); a folder means every
such clip in it (sorted, not recursive). Each clip gets the run's own
preprocessing on its centre frame (the evaluation's: face crop of the centre frame,
log-mel of the whole mono audio track), so the result is deterministic. main.py's
machine settings (results_dir, device, ...) apply; every other setting comes from
the run's config.json (a main.py or a main_separate.py run). A clip that cannot be
read is named and skipped; the rest are still predicted. Prints one line per clip and writes
results_dir/<run>/predict-<YYYYmmdd-HHMMSS>.json:
    {'run', 'epoch', 'predictions': [{'clip', 'emotion', 'probabilities': {ANG: p, ...}}],
     'skipped': [{'clip', 'error'}]}
Exit status 1 (one line), and no file, if no clip could be read.
"""
import sys
import time
from pathlib import Path

import torch

import datasets
import main
from cmvq import media
from cmvq.config import CHOICES, TIMESTAMP_FORMAT, TOOL_KEYS
from cmvq.configurator import ConfigError, configure
from cmvq.errors import UserError, run_script
from cmvq.loaders import frame_jitter
from cmvq.runs import load_model, save_json_new, saved_config
from cmvq.runtime import Runtime

EXTENSIONS = ('.flv', '.avi', '.mp4')


def clip_paths(args):
    """Files as given; a folder -> its files with EXTENSIONS (case-insensitive), sorted."""
    paths = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        else:
            paths.append(path)
    return paths


def preprocess(path, cfg):
    """A clip -> (image (1, 3, 128, 128), spectrogram (1, 1, 256, 256)): the run's
    evaluation item (centre frame) through the dataset's own decode."""
    # size=None: any frame size (the top-centre square crop adapts to it)
    faces, spec = datasets.decode_clip(path, frame_jitter(cfg), offsets=[0], size=None)
    return datasets.to_image(faces[0])[None], datasets.to_spectrogram(spec)[None]


@torch.no_grad()
def predict(net, runtime, cfg, paths):
    """(predictions, skipped) of these clips; see the module docstring."""
    net.eval()
    predictions, skipped = [], []
    for path in paths:
        try:
            image, audio = preprocess(path, cfg)
        except (media.MediaError, OSError, ValueError) as e:
            skipped.append({'clip': str(path), 'error': str(e)})
            print(f'{path}: skipped: {e}', file=sys.stderr)
            continue
        image, audio, _ = runtime.to_device((image, audio))
        with torch.random.fork_rng(devices=[]), runtime.autocast():
            torch.manual_seed(cfg['seed'])  # the 'randomizer' mask draws, as in evaluate
            logits = net(image, audio).logits.float()
        probs = torch.softmax(logits, 1)[0].cpu().tolist()
        emotion = datasets.EMOTIONS[max(range(len(probs)), key=probs.__getitem__)]
        predictions.append({'clip': str(path), 'emotion': emotion, 'probabilities': dict(
            zip(datasets.EMOTIONS, probs, strict=True))})
        print(f'{path}: {emotion} ' + ' '.join(f'{k} {p:.3f}' for k, p in
                                               predictions[-1]['probabilities'].items()))
    return predictions, skipped


def run(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith('-')]  # --key=value, -h, --help
    clips = clip_paths(a for a in argv if not a.startswith('-'))
    machine = {k: v for k, v in main.header().items() if k in TOOL_KEYS}
    cfg = configure(machine, overrides, CHOICES)
    if not cfg['timestamp']:
        raise ConfigError('tools/predict.py needs a saved run: --timestamp=<run>')
    if not clips:
        raise ConfigError('no clip given (files, or folders holding .flv/.avi/.mp4 files)')
    run_dir, cfg = saved_config(cfg, script=None)
    if cfg['dataset'] != 'CREMA-D':
        raise ConfigError(f"tools/predict.py reads CREMA-D-style clips; run {cfg['timestamp']} "
                          f"was trained on {cfg['dataset']!r}")
    runtime = Runtime(cfg)
    net, epoch = load_model(cfg, run_dir, runtime)
    predictions, skipped = predict(net, runtime, cfg, clips)
    if not predictions:  # nothing to keep: no file
        raise UserError(f'no clip could be read ({len(skipped)} skipped, named above)')
    out = save_json_new(run_dir / f'predict-{time.strftime(TIMESTAMP_FORMAT)}.json',
                        {'run': str(run_dir), 'epoch': epoch, 'predictions': predictions,
                         'skipped': skipped})
    print(f'{len(predictions)} predicted, {len(skipped)} skipped; wrote {out}')
    return out


if __name__ == '__main__':
    run_script(run)
