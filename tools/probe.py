"""Probe a trained CM-VQVAE run: what its shared and private latent channels hold.

    python3 -m tools.probe --timestamp=20261121-051151                  # results/20261121-051151
    python3 -m tools.probe --timestamp=20261121-051151 --probe_epochs=5 # also tune decoders

The run must have a mask: base_type 0 (one- or two-stage) or 3. Like
`main.py --timestamp`, the model comes from the run's config.json and only the
machine settings of main.py's header (device, num_workers, cache_dir,
results_dir, ...) and the probe's constants below apply. The probe

1. reconstructs a fixed, seeded set of test items from all codes, from the
   shared codes only, the private codes only, and mixed codes (sample i's shared
   codes with sample i-1's private codes: model.Masker's mix), and measures each
   variant's reconstruction error (MSE) over the test split; with
   probe_epochs > 0 it also fine-tunes copies of the decoders on shared-only and
   on private-only codes (encoders, quantizers and mask frozen);
2. pools each item's codes over space (one value per channel) and, per label,
   fits a linear probe on the training split and scores it on the test split,
   from every channel subset (all, shared, private, each modality's shared and
   private part): logistic regression (accuracy) for classes, ridge (R^2) for
   continuous factors, with bootstrap intervals over the test items;
3. scores the paper's claim per label: shared minus private decodability, with
   its interval and a verdict (emotion-relevant labels should be more decodable
   from shared channels, emotion-irrelevant ones from private channels), and
   the same difference for probe_permutations random splits of the channels
   with the learned sets' sizes (is the learned split special?).

Labels: the dataset's own (CREMA-D: actor, sentence, emotion, level, age,
gender, race, ethnicity; RML: emotion, skin colour, pitch, user) and, for clips
of a synthetic twin, every numeric factor of its ground_truth.csv. Writes
results/<run>/probe-<time>/ (probe.json, probe.md, recon_image.png,
recon_audio.png, decodability.png) and appends a summary to the run's log.txt.
Deterministic for a probe_seed.
"""
import copy
import csv
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
import datasets
import main
import model as models
from cmvq import atomic, plots
from cmvq.config import CHOICES, TOOL_KEYS, model_config, non_negative_int, positive_int
from cmvq.configurator import ConfigError, configure
from cmvq.errors import BadValueError, run_script
from cmvq.loaders import make_datasets, make_loader, set_epoch
from cmvq.progress import progress_bar
from cmvq.runs import Log, load_model, new_run_dir, save_json, saved_config
from cmvq.runtime import Runtime, seed_everything

# ------------------------------------------------------------------------------------------
# config: main.py's machine settings (timestamp names the run; see TOOL_KEYS), plus
probe_items = 8             # test items shown in the reconstruction figures (int > 0)
probe_epochs = 0            # > 0: fine-tune decoder copies on shared-only / private-only codes
probe_seed = 0              # drives the figure's items, the bootstrap and the fine-tuning
bootstrap = 1000            # bootstrap resamples of the test items for every interval
probe_C = 1.0               # inverse L2 strength of the logistic-regression probes (> 0)
probe_alpha = 1.0           # L2 strength of the ridge probes of continuous factors (> 0)
probe_permutations = 20     # random same-size shared/private splits to compare with (0: off)
# ------------------------------------------------------------------------------------------

PROBE_KEYS = ('probe_items', 'probe_epochs', 'probe_seed', 'bootstrap', 'probe_C',
              'probe_alpha', 'probe_permutations')
MASKED_BASE_TYPES = (0, 3)
# Reconstruction variants: model.Masker's keep argument -> row title.
VARIANTS = {'all': 'all codes', 'shared': 'shared only', 'private': 'private only',
            'mix': 'mixed (shared of i, private of i-1)'}
SUBSETS = ('all', 'shared', 'private', 'image_shared', 'image_private', 'audio_shared',
           'audio_private')
# What the paper expects of a label (matched by name prefix, first table first):
# emotion-relevant ones should be more decodable from the shared channels,
# emotion-irrelevant (contradictory) ones from the private channels. Anything
# else (e.g. the twin's f0_hz or duration, set by both) is 'mixed': no expectation.
RELEVANT = ('emotion', 'level', 'intensity', 'face_', 'voice_')
IRRELEVANT = ('actor', 'user', 'sentence', 'syllables', 'age', 'gender', 'race', 'ethnicity',
              'skin', 'hair_', 'background_', 'pitch', 'formant_scale', 'gain_db',
              'noise_rms', 'light', 'head_', 'pixel_noise')
# ground_truth.csv columns that repeat a dataset label.
GROUND_TRUTH_SKIP = ('name', 'actor', 'sentence', 'emotion', 'level')  # CREMA-D's
CI = (2.5, 97.5)  # percentiles of the 95% bootstrap interval


def _positive_float(v):
    """a number > 0"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


PROBE_CHOICES = {'probe_items': positive_int, 'probe_epochs': non_negative_int,
                 'probe_seed': non_negative_int, 'bootstrap': positive_int,
                 'probe_C': _positive_float, 'probe_alpha': _positive_float,
                 'probe_permutations': non_negative_int}


def header():
    """main.py's machine settings plus this file's constants."""
    machine = {k: v for k, v in main.header().items() if k in TOOL_KEYS}
    return {**machine, **{k: globals()[k] for k in PROBE_KEYS}}


class Label(NamedTuple):
    name: str
    kind: str          # 'class' (logistic regression, accuracy) or 'continuous' (ridge, R^2)
    role: str          # 'emotion-relevant', 'emotion-irrelevant' or 'mixed'
    train: np.ndarray  # (N_train,)
    test: np.ndarray   # (N_test,)


# ----------------------------------------------------------------------------- labels

def cremad_labels(dataset):
    """{name: (values (N,), kind)}: a CREMA-D split's 8 labels, plus a twin's factors."""
    rename = {'emo': 'emotion', 'ethnic': 'ethnicity'}
    labels = {rename.get(n, n): (dataset.labels[:, k], 'class')
              for k, n in enumerate(datasets.LABEL_NAMES)}
    labels.update(twin_factors(dataset.paths))
    return labels


def rml_labels(dataset):
    """{name: (values (N,), kind)}: an RML_probe split's emotion and the seed's
    contradictory labels (skin colour, voice pitch, user), plus a twin's factors."""
    labels = {name: (dataset.labels[:, k], 'class')
              for k, name in enumerate(('emotion', 'skin', 'pitch', 'user'))}
    labels.update(twin_factors(dataset.paths, key=lambda p: f'{p.parent.name}/{p.stem}'))
    return labels


# Dataset name of a run -> (dataset the probe loads, label source of one split's
# dataset). An RML run is probed through RMLProbeDataset, whose items carry the
# skin colour, pitch and user labels (-1 where unknown: then constant, skipped).
LABEL_SOURCES = {'CREMA-D': ('CREMA-D', cremad_labels), 'RML': ('RML_probe', rml_labels),
                 'RML_probe': ('RML_probe', rml_labels)}


def twin_factors(paths, key=lambda p: p.stem):
    """{column: (values (N,), 'continuous')} of the ground_truth.csv two folders above
    the clips (a twin's root), for every numeric column; {} for clips not from one
    twin. key: a clip's path -> its 'name' in that table."""
    roots = {Path(p).parent.parent for p in paths}
    table = roots.pop() / 'ground_truth.csv' if len(roots) == 1 else None
    if table is None or not table.is_file():
        return {}
    with open(table, newline='') as f:
        rows = {r['name']: r for r in csv.DictReader(f)}
    names = [key(Path(p)) for p in paths]
    if not names or any(n not in rows for n in names):
        return {}
    factors = {}
    for column in rows[names[0]]:
        try:
            values = np.array([float(rows[n][column]) for n in names])
        except ValueError:  # a text column
            continue
        if column not in GROUND_TRUTH_SKIP:
            factors[column] = (values, 'continuous')
    return factors


def label_role(name):
    if name.startswith(RELEVANT):
        return 'emotion-relevant'
    return 'emotion-irrelevant' if name.startswith(IRRELEVANT) else 'mixed'


def make_labels(source, train_set, test_set):
    """Labels present in both splits, in the source's order."""
    train, test = source(train_set), source(test_set)
    return [Label(name, kind, label_role(name), values, test[name][0])
            for name, (values, kind) in train.items() if name in test]


# ----------------------------------------------------------------------------- model

class Probed(NamedTuple):
    backbone: torch.nn.Module         # ModelVQVAE: codes (and decoders for base_type 0)
    shared: np.ndarray                # (2D,) bool, image channels first
    probe: torch.nn.Module | None     # ModelProbe (base_type 0), None without decoders
    epoch: int


def check_run(cfg, run_dir):
    """A BadValueError (one line) unless the run can be probed."""
    if cfg['base_type'] not in MASKED_BASE_TYPES:
        raise BadValueError(f"run {run_dir.name} has base_type {cfg['base_type']} (no mask); "
                            f"the probe needs a masked run: base_type 0 or 3")
    if cfg['dataset'] not in LABEL_SOURCES:
        raise BadValueError(f"the probe has no labels for dataset {cfg['dataset']!r} of run "
                            f"{run_dir.name}; known: {', '.join(LABEL_SOURCES)}")


def shared_channels(solver):
    """(2D,) bool: the channels the trained mask keeps, as model.py counts them
    (TaskSolver.shared_channels). The randomizer draws a fresh mask at every call,
    so its raw mask is read with the binarizer rule (raw > threshold) instead."""
    if solver.threshold_fn == 'randomizer':
        shared = models.binarizer(solver.mask, solver.threshold)
    else:
        shared = solver.shared_channels()
    return (shared.detach().reshape(-1) != 0).cpu().numpy()


def load_probed(cfg, run_dir, runtime):
    """The run's encoders and mask; for base_type 0 a ModelProbe built from them."""
    net, epoch = load_model(cfg, run_dir, runtime)
    backbone, solver = net.backbone, net.solver
    if isinstance(net, models.ModelTwoStage):  # a two-stage run of main_separate.py
        solver = solver.solver
    probe = None
    if cfg['base_type'] == 0:
        # The released code's way: the probing model takes the trained VQ-VAEs' weights and,
        # through set_mask, the trained mask.
        probe = runtime.prepare(models.build_probe(model_config(cfg)))
        probe.backbone.load_state_dict(backbone.state_dict())
        probe.set_mask(net.get_mask())
        backbone, solver = probe.backbone, probe.solver
    backbone.eval()
    return Probed(backbone, shared_channels(solver), probe, epoch)


# ----------------------------------------------------------------------------- codes

def batches(loader, runtime, desc):
    """(image, audio) on the device, with a progress bar."""
    for batch in progress_bar(loader, desc=desc, leave=False, lines=False):
        image, audio, _ = runtime.to_device(batch)
        yield image, audio


def _pool(codes, dim, batch):
    """(B, D, H, W) -> (B, D) mean over space; NaN for a modality the model lacks."""
    if codes is None:
        return torch.full((batch, dim), float('nan'))
    return codes.float().mean((2, 3)).cpu()


@torch.no_grad()
def pooled_codes(backbone, loader, runtime, dim, desc):
    """(N, 2D) float64: every item's codes averaged over space, image channels first."""
    rows = []
    for image, audio in batches(loader, runtime, desc):
        with runtime.autocast():
            out = backbone(image, audio, decode=False)
        rows.append(torch.cat([_pool(out.quantized_image, dim, len(image)),
                               _pool(out.quantized_audio, dim, len(image))], 1))
    return torch.cat(rows).double().numpy()


# ----------------------------------------------------------------------------- reconstructions

def decoders_of(cfg, probe, tuned):
    """[(row name, Masker, backbone that decodes it)]: the variants, then tuned views."""
    dim = cfg['embedding_dim']
    rows = [(title, models.Masker(embedding_dim=dim, keep=keep), probe.backbone)
            for keep, title in VARIANTS.items()]
    rows += [(f'{keep} only, tuned decoders', models.Masker(embedding_dim=dim, keep=keep), net)
             for keep, net in tuned.items()]
    return rows


@torch.no_grad()
def decode_rows(rows, backbone, mask, image, audio, runtime):
    """{row name: (recon image (B, 3, 128, 128), recon audio (B, 1, 256, 256))}."""
    with runtime.autocast():
        codes = backbone(image, audio, decode=False)
        return {name: net.decode(*masker(codes.quantized_image, codes.quantized_audio, mask))
                for name, masker, net in rows}


def recon_errors(rows, backbone, mask, loader, runtime):
    """{row name: {'image': MSE, 'audio': MSE}} over the whole split (plain MSE,
    the released loss), summed over items and divided by the element count."""
    sums, counts = {}, {'image': 0, 'audio': 0}
    for image, audio in batches(loader, runtime, 'reconstruction error'):
        counts['image'] += image.numel()
        counts['audio'] += audio.numel()
        for name, recon in decode_rows(rows, backbone, mask, image, audio, runtime).items():
            errors = sums.setdefault(name, {'image': 0.0, 'audio': 0.0})
            for modality, x, r in (('image', image, recon[0]), ('audio', audio, recon[1])):
                errors[modality] += float(F.mse_loss(r.float(), x, reduction='sum'))
    return {name: {m: e / counts[m] for m, e in errors.items()} for name, errors in sums.items()}


def figure_items(dataset, count, seed, runtime):
    """A fixed, seeded set of test items: (indices, image, audio) on the device."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(dataset), size=min(count, len(dataset)), replace=False))
    batch = torch.utils.data.default_collate([dataset[int(i)] for i in index])
    image, audio, _ = runtime.to_device(batch)
    return index.tolist(), image, audio


def figure_arrays(rows, backbone, mask, image, audio, runtime):
    """{modality: {row title: (N, C, H, W) numpy}}: the originals, then every row."""
    recon = decode_rows(rows, backbone, mask, image, audio, runtime)
    arrays = {}
    for k, (modality, original) in enumerate((('image', image), ('audio', audio))):
        arrays[modality] = {'original': original.float().cpu().numpy()}
        arrays[modality].update({name: r[k].float().cpu().numpy() for name, r in recon.items()})
    return arrays


def fine_tune(cfg, backbone, mask, keep, loader, runtime):
    """A copy of backbone whose decoders are trained for probe_epochs on `keep`-only
    codes (plain MSE of both modalities); the codes come from the frozen backbone."""
    torch.manual_seed(cfg['probe_seed'])
    tuned = copy.deepcopy(backbone).eval()
    masker = models.Masker(embedding_dim=cfg['embedding_dim'], keep=keep)
    optimizer = torch.optim.Adam(tuned.decoders.parameters(), lr=cfg['learning_rate'])
    tuned.decoders.train()
    for epoch in range(1, cfg['probe_epochs'] + 1):
        set_epoch(loader, epoch)
        for image, audio in batches(loader, runtime, f'{keep} decoders, epoch {epoch}'):
            with torch.no_grad(), runtime.autocast():
                codes = backbone(image, audio, decode=False)
                codes = masker(codes.quantized_image, codes.quantized_audio, mask)
            with runtime.autocast():
                recon_image, recon_audio = tuned.decode(*codes)
            loss = F.mse_loss(recon_image.float(), image) + F.mse_loss(recon_audio.float(), audio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return tuned.eval()


# ----------------------------------------------------------------------------- linear probes

def channel_subsets(shared, dim, present):
    """{subset: (2D,) bool}; shared, present: (2D,) bool with image channels first."""
    image = np.arange(2 * dim) < dim
    masks = {'all': np.ones_like(shared), 'shared': shared, 'private': ~shared,
             'image_shared': image & shared, 'image_private': image & ~shared,
             'audio_shared': ~image & shared, 'audio_private': ~image & ~shared}
    return {name: masks[name] & present for name in SUBSETS}


def fit_predict(kind, x_train, y_train, x_test, cfg):
    """Standardised codes -> logistic regression (classes) or ridge (continuous)."""
    head = (LogisticRegression(C=cfg['probe_C'], max_iter=5000) if kind == 'class'
            else Ridge(alpha=cfg['probe_alpha']))
    return make_pipeline(StandardScaler(), head).fit(x_train, y_train).predict(x_test)


def _r2(y, pred):
    """R^2 along the last axis; NaN where y is constant (a degenerate resample)."""
    total = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    residual = ((y - pred) ** 2).sum(-1)
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(total > 0, 1 - residual / total, np.nan)


def scores(kind, y, pred, resamples):
    """(score of the test split, (B,) scores of the bootstrap resamples (B, n))."""
    if kind == 'class':
        correct = (pred == y).astype(float)
        return float(correct.mean()), correct[resamples].mean(1)
    return float(_r2(y, pred)), _r2(y[resamples], pred[resamples])


def random_splits(shared, dim, count, seed):
    """count (2D,) bool masks: each modality's shared channels drawn at random, as
    many as the learned mask keeps there (the control for the sets' sizes)."""
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        split = np.zeros_like(shared)
        for start in (0, dim):
            kept = int(shared[start:start + dim].sum())
            split[start + rng.choice(dim, kept, replace=False)] = True
        splits.append(split)
    return splits


def random_diffs(label, features, controls, cfg):
    """Shared minus private score of the label for each random split's subsets."""
    diffs = []
    for subsets in controls:
        score = {}
        for name in ('shared', 'private'):
            channels = subsets[name]
            pred = fit_predict(label.kind, features['train'][:, channels], label.train,
                               features['test'][:, channels], cfg)
            score[name] = scores(label.kind, label.test, pred, np.zeros((0, len(pred)), int))[0]
        diffs.append(score['shared'] - score['private'])
    return np.array(diffs)


def chance_level(label):
    """Classes: the test share of the most frequent training class; continuous: R^2 0."""
    if label.kind != 'class':
        return 0.0
    values, counts = np.unique(label.train, return_counts=True)
    return float(np.mean(label.test == values[counts.argmax()]))


def interval(samples):
    low, high = np.nanpercentile(samples, CI)
    return float(low), float(high)


def probe_label(label, features, subsets, resamples, cfg, controls=()):
    """One label's decodability from every subset, and the claim's difference
    (compared with the random splits' subsets `controls`, if any)."""
    constant = [split for split, values in (('train', label.train), ('test', label.test))
                if len(np.unique(values)) < 2 and (split == 'train' or label.kind != 'class')]
    if constant:  # nothing to fit, or no R^2 to score
        return {'kind': label.kind, 'role': label.role,
                'skipped': f'constant in {" and ".join(constant)}'}
    result = {'kind': label.kind, 'role': label.role, 'chance': chance_level(label),
              'subsets': {}}
    boot = {}
    for name, channels in subsets.items():
        if not channels.any():
            result['subsets'][name] = {'empty': True}
            continue
        pred = fit_predict(label.kind, features['train'][:, channels], label.train,
                           features['test'][:, channels], cfg)
        score, boot[name] = scores(label.kind, label.test, pred, resamples)
        low, high = interval(boot[name])
        result['subsets'][name] = {'score': score, 'low': low, 'high': high,
                                   'channels': int(channels.sum())}
    result['claim'] = claim(result, boot)
    if controls and 'diff' in result['claim']:
        compare(result['claim'], random_diffs(label, features, controls, cfg))
    return result


def compare(claim_, diffs):
    """Add how the learned split's difference ranks among random same-size splits'."""
    diff = claim_['diff']
    beyond = 'above' if diff >= diffs.max() else 'below' if diff <= diffs.min() else None
    claim_['random'] = {'count': len(diffs), 'min': float(diffs.min()),
                        'max': float(diffs.max()), 'beyond': beyond}
    claim_['verdict'] += (f'; {"within" if beyond is None else beyond} the range of '
                          f'{len(diffs)} random same-size splits')


def claim(result, boot):
    """Shared minus private decodability with its paired bootstrap interval, a verdict."""
    parts = result['subsets']
    empty = [s for s in ('shared', 'private') if parts[s].get('empty')]
    if empty:
        return {'verdict': f'not scored: the {" and ".join(empty)} set is empty',
                'agrees': None}
    diff = parts['shared']['score'] - parts['private']['score']
    low, high = interval(boot['shared'] - boot['private'])
    found = 'shared' if low > 0 else 'private' if high < 0 else None
    expected = {'emotion-relevant': 'shared', 'emotion-irrelevant': 'private'}.get(
        result['role'])
    agrees = None if found is None or expected is None else found == expected
    return {'diff': diff, 'low': low, 'high': high, 'found': found, 'agrees': agrees,
            'verdict': verdict(found, expected, parts['all'], result['chance'])}


def verdict(found, expected, everything, chance):
    """One line: does the shared/private difference go the way the paper says?"""
    prefix = 'not above chance from all channels; ' if everything['low'] <= chance else ''
    if found is None:
        return prefix + 'no significant difference between shared and private'
    more = f'more decodable from {found}'
    if expected is None:
        return prefix + f'{more} (no expectation: set by emotion-relevant and -irrelevant factors)'
    return prefix + (f'as claimed: {more}' if found == expected else f'against the claim: {more}')


def skill(result, subset):
    """0 = chance, 1 = perfect: (acc - chance) / (1 - chance), or R^2; NaN if not scored."""
    part = result.get('subsets', {}).get(subset, {})
    if 'score' not in part:
        return float('nan')
    if result['kind'] != 'class':
        return part['score']
    return (part['score'] - result['chance']) / max(1 - result['chance'], 1e-12)


def run_probes(labels, features, subsets, cfg, controls=()):
    """{label name: probe_label(...)}, every label against the same resamples."""
    rng = np.random.default_rng(cfg['probe_seed'])
    n = len(features['test'])
    resamples = rng.integers(0, n, size=(cfg['bootstrap'], n))
    return {label.name: probe_label(label, features, subsets, resamples, cfg, controls)
            for label in progress_bar(labels, desc='linear probes', leave=False, lines=False)}


# ----------------------------------------------------------------------------- report

def _cell(part, kind):
    if part is None:
        return '-'
    if part.get('empty'):
        return 'empty'
    scale, unit = (100, '%') if kind == 'class' else (1, '')
    fmt = '.1f' if kind == 'class' else '.2f'
    return (f"{scale * part['score']:{fmt}}{unit} "
            f"[{scale * part['low']:{fmt}}, {scale * part['high']:{fmt}}]")


def _chance_cell(result):
    return f"{100 * result['chance']:.1f}%" if result['kind'] == 'class' else 'R^2 0'


def decodability_table(report):
    lines = ['| label | role | chance | ' + ' | '.join(s.replace('_', ' ') for s in SUBSETS)
             + ' |', '|---' * (len(SUBSETS) + 3) + '|']
    for name, r in report['labels'].items():
        if 'skipped' in r:
            lines.append(f"| {name} | {r['role']} | - | {r['skipped']} |"
                         + ' |' * (len(SUBSETS) - 1))
            continue
        cells = [_cell(r['subsets'].get(s), r['kind']) for s in SUBSETS]
        lines.append(f"| {name} | {r['role']} | {_chance_cell(r)} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def claim_table(report):
    lines = ['| label | role | shared - private [95% CI] | verdict |', '|---|---|---|---|']
    for name, r in report['labels'].items():
        c = r.get('claim')
        if c is None:
            continue
        scale, unit = (100, ' pts') if r['kind'] == 'class' else (1, ' R^2')
        diff = '-' if 'diff' not in c else (
            f"{scale * c['diff']:+.2f}{unit} "
            f"[{scale * c['low']:+.2f}, {scale * c['high']:+.2f}]")
        lines.append(f"| {name} | {r['role']} | {diff} | {c['verdict']} |")
    return '\n'.join(lines)


def recon_table(report):
    rec = report['reconstruction']
    if rec is None:
        return 'No decoders (base_type 3): no reconstructions.'
    lines = ['| decoded from | image MSE | audio MSE |', '|---|---|---|']
    lines += [f"| {name} | {e['image']:.5f} | {e['audio']:.3f} |"
              for name, e in rec['mse'].items()]
    return '\n'.join(lines)


def tally(report):
    """{role: {'as claimed': n, 'against': n, 'no difference': n, 'not scored': n}}."""
    counts = {}
    for r in report['labels'].values():
        if 'claim' not in r or r['role'] == 'mixed':
            continue
        c = r['claim']
        key = ('not scored' if 'diff' not in c else 'no difference' if c['found'] is None
               else 'as claimed' if c['agrees'] else 'against')
        role = counts.setdefault(r['role'], dict.fromkeys(
            ('as claimed', 'against', 'no difference', 'not scored'), 0))
        role[key] += 1
    return counts


def summary_lines(report):
    m = report['mask']
    lines = [f"mask: shared image channels {len(m['shared_image'])}/{m['dim']}, "
             f"shared audio channels {len(m['shared_audio'])}/{m['dim']}"]
    emotion = report['labels'].get('emotion', {})
    if 'subsets' in emotion:
        parts = ', '.join(f"{s} {_cell(emotion['subsets'][s], 'class')}"
                          for s in ('all', 'shared', 'private'))
        lines.append(f"emotion accuracy: {parts}; {emotion['claim']['verdict']}")
    for role, counts in tally(report).items():
        lines.append(f'{role} labels: ' + ', '.join(f'{n} {k}' for k, n in counts.items()))
    return lines


def markdown(report):
    r = report['run']
    head = [f"# Probe of run {r['name']}", '',
            f"base_type {r['base_type']}, mode {r['mode']}, threshold_fn {r['threshold_fn']}, "
            f"checkpoint of epoch {r['epoch']}; {r['dataset']} from {r['data_path']}: "
            f"{r['train_items']} training / {r['test_items']} test items. Probes fit on "
            f"the training split, scored on the test split; intervals: 95% bootstrap over "
            f"the test items ({report['config']['bootstrap']} resamples).", '',
            *[f'- {line}' for line in summary_lines(report)], '',
            f"Shared channels: image {report['mask']['shared_image']}, "
            f"audio {report['mask']['shared_audio']} (0-based within each modality).", '']
    return '\n'.join(head + [
        '## Reconstruction error over the test split (plain MSE)', '', recon_table(report), '',
        '## Decodability from pooled codes', '',
        'Accuracy for classes, R^2 for continuous factors (value [95% interval]).', '',
        decodability_table(report), '', '## The claim: shared minus private', '',
        claim_table(report), ''])


def heatmap(out_dir, report):
    names = [n for n, r in report['labels'].items() if 'subsets' in r]
    values = [[skill(report['labels'][n], s) for s in SUBSETS] for n in names]
    plots.plot_decodability(out_dir / 'decodability.png', values, names,
                            [s.replace('_', ' ') for s in SUBSETS],
                            f"decodability by channel subset, run {report['run']['name']}")


# ----------------------------------------------------------------------------- main

def resolve(argv):
    """The saved run's config with this header's machine and probe settings (a
    UserError, before any work, for a bad value or a run that cannot be probed)."""
    cfg = configure(header(), argv, {**CHOICES, **PROBE_CHOICES})
    if not cfg['timestamp']:
        raise ConfigError('needs --timestamp=<a run folder of '
                          f"{cfg['results_dir']}/>")
    run_dir, saved = saved_config(cfg, script=None)
    saved.update({k: cfg[k] for k in PROBE_KEYS})
    check_run(saved, run_dir)
    return run_dir, saved


def load_data(cfg, runtime):
    """Train and test datasets with centre frames, and unshuffled loaders over them."""
    data_cfg = {**cfg, 'dataset': LABEL_SOURCES[cfg['dataset']][0]}
    data = make_datasets(data_cfg, splits=('train', 'test'), train=False)
    return data, {s: make_loader(d, cfg, runtime, train=False) for s, d in data.items()}


def reconstruct(cfg, probed, data, loaders, runtime):
    """(test-split errors of every variant and tuned view, the figures' arrays);
    (None, {}) without decoders."""
    if probed.probe is None:
        return None, {}
    mask = torch.as_tensor(probed.shared, dtype=torch.float32, device=runtime.device)
    tuned = {}
    if cfg['probe_epochs']:
        train = make_loader(data['train'], cfg, runtime, train=True)
        tuned = {keep: fine_tune(cfg, probed.backbone, mask, keep, train, runtime)
                 for keep in ('shared', 'private')}
    rows = decoders_of(cfg, probed.probe, tuned)
    items, image, audio = figure_items(data['test'], cfg['probe_items'], cfg['probe_seed'],
                                       runtime)
    errors = recon_errors(rows, probed.backbone, mask, loaders['test'], runtime)
    return ({'items': items, 'tuned_epochs': cfg['probe_epochs'], 'mse': errors},
            figure_arrays(rows, probed.backbone, mask, image, audio, runtime))


def run_info(cfg, run_dir, probed, data):
    keys = ('base_type', 'mode', 'threshold_fn', 'threshold', 'dataset', 'data_path')
    return {'name': run_dir.name, 'epoch': probed.epoch, **{k: cfg[k] for k in keys},
            'train_items': len(data['train']), 'test_items': len(data['test'])}


def probe_run(cfg, run_dir):
    """Every measurement, then the probe folder written: (its path, the report)."""
    seed_everything(cfg['probe_seed'])
    runtime = Runtime(cfg)
    data, loaders = load_data(cfg, runtime)
    probed = load_probed(cfg, run_dir, runtime)
    dim = cfg['embedding_dim']
    features = {s: pooled_codes(probed.backbone, loaders[s], runtime, dim, f'{s} codes')
                for s in ('train', 'test')}
    labels = make_labels(LABEL_SOURCES[cfg['dataset']][1], data['train'], data['test'])
    present = ~np.isnan(features['train']).any(0)
    subsets = channel_subsets(probed.shared, dim, present)
    controls = [channel_subsets(split, dim, present) for split in random_splits(
        probed.shared, dim, cfg['probe_permutations'], cfg['probe_seed'])]
    reconstruction, figures = reconstruct(cfg, probed, data, loaders, runtime)
    report = {'run': run_info(cfg, run_dir, probed, data),
              'config': {k: cfg[k] for k in PROBE_KEYS},
              'mask': {'dim': dim, 'shared_image': np.flatnonzero(probed.shared[:dim]).tolist(),
                       'shared_audio': np.flatnonzero(probed.shared[dim:]).tolist()},
              'subsets': {s: np.flatnonzero(c).tolist() for s, c in subsets.items()},
              'reconstruction': reconstruction,
              'labels': run_probes(labels, {s: np.nan_to_num(f) for s, f in features.items()},
                                   subsets, cfg, controls)}
    report['summary'] = summary_lines(report)
    return write(run_dir, report, figures), report


def write(run_dir, report, figures):
    """run_dir/probe-<time>/: probe.json, probe.md, decodability.png, recon_*.png."""
    out_dir = new_run_dir(run_dir, prefix='probe-')
    save_json(out_dir / 'probe.json', report)
    atomic.write_bytes(out_dir / 'probe.md', markdown(report))
    heatmap(out_dir, report)
    for modality, rows in figures.items():
        plots.plot_variants(out_dir / f'recon_{modality}.png', rows,
                            f'{modality}: reconstructions from code subsets '
                            f"(test items {report['reconstruction']['items']})")
    return out_dir


def run(argv=None):
    """Resolve, probe, write; append a summary to the run's log."""
    argv = sys.argv[1:] if argv is None else argv
    run_dir, cfg = resolve(argv)
    started = time.time()
    out_dir, report = probe_run(cfg, run_dir)
    log = Log(run_dir / 'log.txt')
    try:
        log(f'Probe of the saved model, {time.strftime("%Y-%m-%d %H:%M:%S")} '
            f'({time.time() - started:.0f} s): {out_dir}')
        for line in report['summary']:
            log('  ' + line)
    finally:
        log.close()
    return out_dir, report


if __name__ == '__main__':
    run_script(run)
