"""The training loop: epochs of train + validation, the best checkpoint, resume state.

fit() trains for num_epoch epochs and keeps the checkpoint with the lowest
validation classification loss (the released code's rule); evaluate() is the
deterministic pass used for validation and test; run_epoch() is one pass of
either. Under torchrun the model is wrapped in DDP and every metric covers the
whole split.
"""
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score

import datasets
from cmvq import distributed
from cmvq import groups as group_metrics
from cmvq.errors import UserError, one_line
from cmvq.loaders import make_loaders, set_epoch, train_variances
from cmvq.loss import class_criterion, class_targets, compute_loss, describe_loss
from cmvq.progress import progress_bar
from cmvq.runs import load_checkpoint, save_torch
from cmvq.runtime import Runtime, seed_everything, uncompiled


def setup(cfg, log):
    """Seed, runtime, the three loaders and the training variances of a new run."""
    seed_everything(cfg['seed'])
    runtime = Runtime(cfg)
    log(runtime.describe())
    loaders = make_loaders(cfg, runtime, log=log)
    variances = train_variances(cfg)
    log(f'Data: {cfg["data_path"]}: ' + ', '.join(
        f'{s} {len(dl.dataset)}' for s, dl in loaders.items())
        + f'; train variances image {variances[0]:.4g}, audio {variances[1]:.4g}')
    log(describe_loss(cfg))
    return runtime, loaders, variances


class EpochResult(NamedTuple):
    history: dict         # per-batch lists of the logged quantities
    preds: np.ndarray     # (items,) predicted classes of all ranks; empty without logits
    targets: np.ndarray   # (items,) their labels
    sizes: list           # items per batch of this rank


# Steps between two checks that the losses are finite: a check waits for the device
# (a host sync), so it is not done every step.
FINITE_CHECK_STEPS = 32


def run_epoch(model, loader, runtime, variances, cfg, optimizer=None, desc=''):
    """One pass over loader; trains when an optimizer is given -> EpochResult.

    model may be wrapped (DDP, torch.compile). Under torchrun the training history
    is the mean over ranks of each step (the global batch's values, ranks holding
    equal shares) and the predictions are gathered from all ranks. Nothing waits
    for the device within a step: losses and predictions stay there, and the losses
    are checked every FINITE_CHECK_STEPS steps and at the end (check_finite)."""
    training = optimizer is not None
    criterion = class_criterion(cfg['dataset'])
    if not runtime.compile:  # compile=False, or its first step failed (first_compiled_step)
        model = uncompiled(model)
    model.train(training)
    plain = distributed.unwrap(model)
    history, preds, targets, sizes, checked = {}, [], [], [], 0

    def step(net, batch):
        image, audio, (emotion, *_) = runtime.to_device(batch)
        with runtime.autocast():
            out = net(image, audio)
        loss, parts = compute_loss(out, image, audio, emotion, variances, plain,
                                   cfg['regularization'], cfg['recon_loss'], criterion)
        if training:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return out, loss, parts, emotion
    grad = nullcontext() if training else torch.no_grad()
    with grad:
        for batch in progress_bar(loader, desc=desc, leave=False, lines=False,
                                  enabled=distributed.is_main()):
            if training and not sizes and model is not uncompiled(model):
                model, (out, loss, parts, emotion) = first_compiled_step(step, model, batch,
                                                                         runtime)
            else:
                out, loss, parts, emotion = step(model, batch)
            sizes.append(len(emotion))
            terms = list(parts)  # the loss terms, for check_finite's message
            parts['loss'] = loss
            for key, p in (('perplexity1', out.perplexity_image),
                           ('perplexity2', out.perplexity_audio)):
                if p is not None:
                    parts[key] = p
            for key, value in parts.items():  # stay on the device: no sync per batch
                history.setdefault(key, []).append(value.detach().float())
            if out.logits is not None:
                preds.append(out.logits.argmax(1))
                targets.append(class_targets(emotion, cfg['dataset']))
            if len(sizes) - checked == FINITE_CHECK_STEPS:
                check_finite(history, terms, desc, checked)
                checked = len(sizes)
    if len(sizes) > checked:
        check_finite(history, terms, desc, checked)
    history = {k: torch.stack(v) for k, v in history.items()}  # (steps,) each
    if training and history:  # one all-reduce of (keys, steps) per epoch
        means = distributed.mean_over_ranks(torch.stack(list(history.values())))
        history = dict(zip(history, means, strict=True))
    history = {k: v.cpu().tolist() for k, v in history.items()}
    preds, targets = (distributed.interleave(x) for x in zip(*distributed.all_gather(
        (_concat(preds), _concat(targets))), strict=True))
    return EpochResult(history, preds, targets, sizes)


def first_compiled_step(step, model, batch, runtime):
    """step(model, batch) on a torch.compile'd model, whose first call compiles it ->
    (the model to go on with, step's result). If compiling or the step fails, the
    model and RNG states go back to before it and the step runs on the model without
    torch.compile, which goes on from there (runtime.fall_back: one line in fit's log,
    no traceback)."""
    plain = distributed.unwrap(model)
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    rng = rng_states(runtime.device)
    try:
        return model, step(model, batch)
    except Exception as error:  # noqa: BLE001 - any failure of the compiled step
        runtime.fall_back(error)
    plain.load_state_dict(state)  # undo what the failed attempt changed (BatchNorm, EMA)
    set_rng_states(rng, runtime.device)
    eager = uncompiled(model)
    return eager, step(eager, batch)


def rng_states(device):
    """The RNG states a step draws from (dropout, randomizer masks): CPU, and the CUDA
    device's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == 'cuda'
                                   else None)


def set_rng_states(states, device):
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


class NonFiniteLoss(UserError, FloatingPointError):
    """A NaN or Inf loss: the run stops; nothing is reported as a result."""


def check_finite(history, terms, desc, start):
    """Raise NonFiniteLoss naming the epoch (desc), the first batch from `start` on
    (0-based) whose loss is NaN or Inf, and its loss terms. One host sync.

    fit writes checkpoints only after an epoch's training and validation, both
    checked to their last batch first, so a saved checkpoint is never one trained
    on a non-finite loss. (The steps between a bad batch and its check change only
    the model in memory, which the stopped run never saves.)"""
    bad = ~torch.isfinite(torch.stack(history['loss'][start:]))  # (steps since start,)
    if not bool(bad.any()):
        return
    i = start + int(bad.nonzero()[0])
    values = ', '.join(f'{k} {float(history[k][i]):.4g}' for k in terms)
    raise NonFiniteLoss(f'non-finite loss {float(history["loss"][i]):.4g} in '
                        f'{desc or "evaluation"}, batch {i + 1} ({values}); the run stops and '
                        'reports no result (check the variances in data_path, or lower '
                        'learning_rate)')


def _concat(tensors):
    """List of (B,) label tensors -> one numpy array (empty if none)."""
    return torch.cat(tensors).cpu().numpy() if tensors else np.zeros(0, np.int64)


def classification_metrics(preds, targets, num_classes, names=datasets.EMOTIONS):
    """Accuracy, per-class accuracy, macro-F1 and confusion matrix (rows = truth)."""
    labels = list(range(num_classes))
    cm = confusion_matrix(targets, preds, labels=labels)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    return {'accuracy': float(cm.trace() / max(cm.sum(), 1)),
            'per_class_accuracy': {names[i]: float(a) for i, a in enumerate(per_class)},
            'macro_f1': float(f1_score(targets, preds, labels=labels, average='macro',
                                       zero_division=0)),
            'confusion_matrix': cm.tolist(), 'num_samples': int(cm.sum())}


def item_means(history, sizes):
    """Means over the items of all ranks of per-batch means (history lists, batch sizes).

    Exact for per-item losses; perplexity, a per-batch statistic, is batch-weighted."""
    sums = {k: float(np.dot(v, sizes)) for k, v in history.items()}
    shards = distributed.all_gather((sums, sum(sizes)))
    total = max(sum(n for _, n in shards), 1)
    return {k: sum(s[k] for s, _ in shards) / total for k in sums}


def evaluate(model, loader, runtime, variances, cfg, desc='test', groups=False):
    """Deterministic evaluation: eval mode, fixed frames, seeded randomizer masks.

    groups: also the accuracy per gender, race, age group and actor (groups.py;
    CREMA-D only).

    The seeding happens on a forked RNG so that training, which calls this every
    epoch, does not restart its dropout and mask draws from the same state."""
    devices = [runtime.device] if runtime.device.type == 'cuda' else []
    model = distributed.unwrap(model)  # no collectives: ranks may hold one batch more or less
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg['seed'])
        history, preds, targets, sizes = run_epoch(model, loader, runtime, variances, cfg,
                                                   desc=desc)
    metrics = item_means(history, sizes)
    if len(preds):
        names = datasets.CLASS_NAMES[cfg['dataset']]
        metrics.update(classification_metrics(preds, targets, len(names), names))
        if groups and cfg['dataset'] == 'CREMA-D':  # RMLDataset is a CREMADDataset too
            metrics['groups'] = split_groups(loader.dataset, preds, targets)
    metrics['mask'] = model.mask_ratios()
    return metrics


def split_groups(dataset, preds, targets):
    """groups.group_metrics of an evaluation, whose predictions come in split order."""
    labels = dataset.labels  # (N, 8)
    if len(preds) != len(labels) or not np.array_equal(targets, labels[:, datasets.EMOTION]):
        raise RuntimeError('group metrics need one prediction per clip in split order')
    return group_metrics.group_metrics(preds, targets, labels, dataset.paths)


def fit(model, loaders, runtime, variances, cfg, log, checkpoint, *, num_epoch=None,
        monitor='class_error', save=None, last=None, resume=False, on_epoch=None):
    """Train for num_epoch epochs; keep the checkpoint with the lowest val `monitor`.

    The checkpoint holds the state_dict of `save` (default: model) with the config.
    last: path of the training state written after every epoch (save_state);
    resume: continue from it (the epochs it holds are not trained again).
    on_epoch: optional hook on_epoch(epoch, train lists, val metrics, model) after
    each epoch's log block (tblog.TensorBoardLog).

    Returns the history: per-iteration train lists and per-epoch val lists, keyed
    like the seed's pickles (class_error, res_recon_error1/2, res_perplexity1/2).
    """
    num_epoch = num_epoch or cfg['num_epoch']
    # run_epoch goes on without torch.compile once the first compiled step fell back
    trainer = runtime.compiled(distributed.wrap(model, runtime.device, sync_bn=cfg['sync_bn']))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg['learning_rate'])
    history = {'train': {}, 'val': {}, 'mask': [], 'epoch_seconds': []}
    best, first = float('inf'), 1
    if resume:
        first, best, history = load_state(last, model, optimizer, loaders)
        log(f'Resumed from {last} after epoch {first - 1} (best val {monitor} {best:.4f})')
    if distributed.active():  # same weights everywhere (DDP broadcast them), own dropout draws
        torch.manual_seed(cfg['seed'] + 1000 * distributed.context().rank + first)
    for epoch in range(first, num_epoch + 1):
        start = time.time()
        set_epoch(loaders['train'], epoch)
        train, preds, targets, _ = run_epoch(trainer, loaders['train'], runtime, variances,
                                             cfg, optimizer, desc=f'epoch {epoch} train')
        if epoch == first and runtime.compile_failure:  # the first compiled step fell back
            log(runtime.compile_failure)
        val = evaluate(model, loaders['val'], runtime, variances, cfg, desc=f'epoch {epoch} val')
        for key, values in train.items():
            history['train'].setdefault(key, []).extend(values)
        for key, value in val.items():
            if isinstance(value, float):
                history['val'].setdefault(key, []).append(value)
        history['mask'].append(val['mask'])
        history['epoch_seconds'].append(time.time() - start)
        train_acc = float((preds == targets).mean()) if len(preds) else None
        log(epoch_block(epoch, num_epoch, train, train_acc, val, history['epoch_seconds'][-1]))
        if on_epoch is not None and distributed.is_main():
            on_epoch(epoch, train, val, model)
        if val.get(monitor, float('inf')) < best or epoch == 1:  # equal on every rank
            best = val.get(monitor, float('inf'))
            if distributed.is_main():
                save_torch(checkpoint, {'model': (save or model).state_dict(), 'config': cfg,
                                        'epoch': epoch, f'val_{monitor}': best})
            log(f'  saved {Path(checkpoint).name} (best val {monitor} {best:.4f})')
        if last is not None and distributed.is_main():
            save_state(last, model, optimizer, loaders, epoch, best, history)
    return history


def save_state(path, model, optimizer, loaders, epoch, best, history):
    """Everything a later epoch depends on, written atomically: model and optimizer
    state, the epoch done, best-so-far, history, and every RNG state (the training
    data draws are a function of (seed, epoch) and need none). Tensors and plain
    values only, so that load_state reads it with weights_only=True."""
    save_torch(path, {
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
        'best': best, 'history': history, 'rng': {
            'torch': torch.get_rng_state(), 'numpy': _numpy_rng(), 'python': _python_rng(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'loaders': {k: dl.generator.get_state() for k, dl in loaders.items()
                        if isinstance(getattr(dl, 'generator', None), torch.Generator)}}})


def load_state(path, model, optimizer, loaders):
    """Restore save_state's file into model, optimizer, loaders and the RNGs;
    returns (first epoch to train, best-so-far, history)."""
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        rng = state['rng']
        torch.set_rng_state(rng['torch'].cpu())
        _numpy_rng(rng['numpy'])
        _python_rng(rng['python'])
        if rng['cuda'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng['cuda']])
        for key, generator_state in rng['loaders'].items():
            loaders[key].generator.set_state(generator_state.cpu())
        return state['epoch'] + 1, state['best'], state['history']
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f'{path} is not the training state of this run '
                        f'({type(e).__name__}: {one_line(e)[:200]}); start a new run') from None


def _numpy_rng(state=None):
    """numpy's global RNG state as tensors and plain values; or, given one, restore it."""
    if state is None:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        return {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                'has_gauss': int(has_gauss), 'cached_gaussian': float(gauss)}
    np.random.set_state(('MT19937', state['keys'].numpy().astype(np.uint32), state['pos'],
                         state['has_gauss'], state['cached_gaussian']))
    return state


def _python_rng(state=None):
    """random's state as tensors and plain values; or, given one, restore it."""
    if state is None:
        version, internal, gauss = random.getstate()  # internal: 625 ints < 2**32
        return {'version': version, 'internal': torch.tensor(internal, dtype=torch.int64),
                'gauss_next': gauss}
    random.setstate((state['version'], tuple(state['internal'].tolist()),
                     state['gauss_next']))
    return state


def epoch_block(epoch, num_epoch, train, train_acc, val, seconds):
    """The log's per-epoch block, in the released log's spirit."""
    def fmt(stats, acc):
        means = {k: float(np.mean(v)) if isinstance(v, list) else v for k, v in stats.items()}
        text = ', '.join(f'{k} {means[k]:.4f}' for k in
                         ('loss', 'class_error', 'recon_error1', 'recon_error2', 'vq_loss',
                          'perplexity1', 'perplexity2') if k in means)
        return text + (f', accuracy {100 * acc:.2f}%' if acc is not None else '')
    lines = [f'Epoch {epoch}/{num_epoch} ({seconds:.1f} s)',
             f'  train: {fmt(train, train_acc)}',
             f'  val:   {fmt(val, val.get("accuracy"))}']
    if val.get('mask'):
        m = val['mask']
        lines.append(f"  mask: private1 {m['private1']:.1f}%, shared1 {m['shared1']:.1f}%, "
                     f"private2 {m['private2']:.1f}%, shared2 {m['shared2']:.1f}%, "
                     f"complementarity {m['complementarity']:.1f}%")
    return '\n'.join(lines)


def test_block(metrics, title='Test'):
    """Log lines of an evaluation: system and per-class accuracy, macro-F1, mask."""
    lines = [f'{title}: accuracy {100 * metrics["accuracy"]:.2f}%, '
             f'macro-F1 {100 * metrics["macro_f1"]:.2f}%, '
             f'{metrics["num_samples"]} samples, class_error {metrics["class_error"]:.4f}']
    lines.append('  per class: ' + ', '.join(
        f'{k} {100 * v:.1f}%' for k, v in metrics['per_class_accuracy'].items()))
    lines.append('  confusion (rows truth, cols predicted): '
                 + ' | '.join(' '.join(f'{n:3d}' for n in row)
                              for row in metrics['confusion_matrix']))
    if metrics.get('groups'):
        lines += group_metrics.group_lines(metrics['groups'])
    if metrics.get('mask'):
        lines.append('  mask: ' + ', '.join(f'{k} {v:.1f}%' for k, v in metrics['mask'].items()))
    return '\n'.join(lines)


