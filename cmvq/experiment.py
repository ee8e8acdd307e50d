"""A main.py run: train a new model, resume an interrupted run, or evaluate a saved one.

    new run:    preflight (and the pretrained source) -> results/<timestamp>/ -> fit
                (best val class_error) -> test of the best checkpoint -> pickles,
                metrics.json, plots
    resume:     the run's own config (num_epoch may grow) and last.pt, its splits
                unchanged -> the remaining epochs -> as above
    timestamp:  the run's own config and model.pt -> test -> eval-<time>.json
                (robustness=True, of a main.py or main_separate.py run: under missing
                and corrupted modalities)
Everything that can fail is checked before the run folder (or, for a saved run, its
log) is touched.
"""
import sys
import time

import model as models
from cmvq import distributed, transfer
from cmvq.config import RUNTIME_KEYS, TIMESTAMP_FORMAT, build_model, resolve
from cmvq.configurator import ConfigError, overrides
from cmvq.cremad import prepare_twin
from cmvq.errors import BadValueError, MissingError
from cmvq.loaders import frame_jitter, make_loaders, train_variances
from cmvq.outputs import finish
from cmvq.preflight import check_splits, preflight, split_fingerprint
from cmvq.robustness import evaluate_robustness
from cmvq.runs import (Log, check_checkpoints, load_model, logged, read_json, save_json,
                       save_json_new, saved_config, start_run)
from cmvq.runtime import Runtime, resolve_device, seed_everything
from cmvq.splits import SPLITS
from cmvq.tblog import TensorBoardLog
from cmvq.train import evaluate, fit, setup, test_block

# The settings a resumed run takes from argv (more epochs); every other one is its own.
RESUME_KEYS = ('num_epoch',)


def main(defaults, argv=None):
    """main.py: defaults is its header; returns the test metrics (or the robustness
    results)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve_run(defaults, argv)
    if cfg['timestamp'] and cfg['resume']:
        raise ConfigError('give timestamp (evaluate a run) or resume (continue one), not both')
    if cfg['robustness'] and not cfg['timestamp']:
        raise ConfigError('robustness=True evaluates a saved run: give --timestamp=<run>')
    distributed.init(resolve_device(cfg))
    rank = distributed.context().rank
    if cfg['timestamp']:
        # robustness: a run of either script (load_model rebuilds both kinds)
        run_dir, cfg = saved_config(cfg, None if cfg['robustness'] else 'main.py')
        preflight(cfg, splits=('test',))
        check_splits(cfg, run_dir)
        check_checkpoints(run_dir)
        log = Log(run_dir / 'log.txt', rank)
        if cfg['robustness']:
            return evaluate_robustness(cfg, run_dir, log)
        return evaluate_saved(cfg, run_dir, log)
    if cfg['resume']:
        return resume(cfg, argv, rank)
    with distributed.main_first():
        prepare_data(cfg)
    preflight(cfg)
    if cfg['pretrained']:
        transfer.check(cfg)
    run_dir, log = start_run(cfg, argv, split_fingerprint(cfg))
    return train(cfg, run_dir, log)


def resolve_run(defaults, argv, choices=None):
    """The checked settings of a run (config.resolve); a new RML run also gets its audio
    geometry (the pretrained source's, see transfer.resolve)."""
    cfg = resolve(defaults, argv, choices)
    return cfg if cfg['timestamp'] else transfer.resolve(cfg)


def prepare_data(cfg):
    """The demo's data: a synthetic twin and its split configs, made if missing."""
    if cfg['twin_actors']:
        prepare_twin(cfg['twin_root'], cfg['data_path'], seed=cfg['seed'],
                     workers=max(1, cfg['num_workers']), cache_dir=cfg['cache_dir'],
                     frame_jitter=frame_jitter(cfg), num_actors=cfg['twin_actors'])


@logged
def train(cfg, run_dir, log, resume=False, split_changed=None):
    """Train (or, resume=True, continue from last.pt), test the best checkpoint, write the
    outputs; split_changed: how the splits changed since the run started (a resume
    allowed anyway), recorded with the test."""
    runtime, loaders, variances = setup(cfg, log)
    net = runtime.prepare(build_model(cfg))
    log(f'Model: {type(net).__name__}, {models.count_parameters(net):,} trainable parameters')
    if cfg['pretrained'] and not resume:  # a resumed run's weights come from last.pt
        transfer.apply([net], cfg, log)
    board = None
    if cfg['tensorboard'] and distributed.is_main():
        board = TensorBoardLog(run_dir, loaders['val'], runtime)
    history = fit(net, loaders, runtime, variances, cfg, log, run_dir / 'model.pt',
                  last=run_dir / 'last.pt', resume=resume, on_epoch=board)
    if board:
        board.close()
    net, best_epoch = load_model(cfg, run_dir, runtime)
    log(f'Best epoch {best_epoch} (lowest val class_error); testing its checkpoint')
    test = evaluate(net, loaders['test'], runtime, variances, cfg, groups=True)
    if split_changed:
        test['split_changed'] = split_changed
    log(test_block(test))
    if distributed.is_main():
        finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch)
    log(f'Done in {sum(history["epoch_seconds"]):.1f} s of epochs; results in {run_dir}')
    return test


@logged
def evaluate_saved(cfg, run_dir, log):
    """Rebuild the saved model (one- or two-stage), test it, append to the run's log and
    write eval-<now>.json beside it."""
    log(f'Evaluation of the saved model, {time.strftime("%Y-%m-%d %H:%M:%S")}: '
        f'{cfg["message"]}')
    changed = check_splits(cfg, run_dir)
    if changed:
        log(f'WARNING: {changed}; evaluating anyway (allow_split_change=True)')
    seed_everything(cfg['seed'])
    runtime = Runtime(cfg)
    loader = make_loaders(cfg, runtime, splits=('test',))['test']
    net, epoch = load_model(cfg, run_dir, runtime)
    test = evaluate(net, loader, runtime, train_variances(cfg), cfg, groups=True)
    if changed:
        test['split_changed'] = changed
    log(test_block(test, title=f'Test (checkpoint of epoch {epoch})'
                   + (' ON A CHANGED TEST SPLIT' if changed else '')))
    path = run_dir / f'eval-{time.strftime(TIMESTAMP_FORMAT)}.json'
    if distributed.is_main():
        path = save_json_new(path, {'test': test, 'config': cfg})
    log(f'Wrote {path}')
    return test


def resume(cfg, argv, rank):
    """Continue the interrupted run cfg['resume'] after every check (resumable, preflight,
    its splits unchanged); the settings argv changes (RESUME_KEYS) go to its config.json
    and log."""
    run_dir, cfg, changes = resumable(cfg, {k for k, _, _ in overrides(argv)})
    preflight(cfg)
    changed = check_splits(cfg, run_dir, SPLITS, action='resume')
    if changes:  # config.json says what the run trains for from now on
        save_json(run_dir / 'config.json', {**read_json(run_dir / 'config.json'),
                                            **{k: new for k, (_, new) in changes.items()}})
    log = Log(run_dir / 'log.txt', rank)
    log(f'Resuming the run, {time.strftime("%Y-%m-%d %H:%M:%S")}: argv {argv}')
    if changes:
        log('Resuming with ' + ', '.join(f'{k}={new!r} (the run had {old!r})'
                                         for k, (old, new) in changes.items())
            + "; every other setting is the run's own")
    if changed:
        log(f'WARNING: {changed}; resuming anyway (allow_split_change=True)')
    return train(cfg, run_dir, log, True, changed)


def resumable(cfg, given):
    """(run folder, config, {key: (the run's value, new value)}) of the interrupted run
    cfg['resume'], or a UserError saying why it cannot go on. given: the keys argv set;
    those of RESUME_KEYS apply (num_epoch: train on to more epochs), any other that
    differs from the run's own config is refused (machine settings aside)."""
    run_dir, saved = saved_config(cfg, key='resume')
    if (run_dir / 'metrics.json').is_file():
        raise BadValueError(f'resume={cfg["resume"]!r}: that run finished (metrics.json '
                            'exists); nothing to resume')
    if not (run_dir / 'last.pt').is_file():
        raise MissingError(f'resume={cfg["resume"]!r}: {run_dir / "last.pt"} is missing '
                           '(the run stopped before its first epoch ended); start a new run')
    done = check_checkpoints(run_dir, ('model.pt', 'last.pt'))['last.pt']
    changes = {k: (saved[k], cfg[k]) for k in sorted(given)
               if k in saved and k not in RUNTIME_KEYS and cfg[k] != saved[k]}
    refused = [k for k in changes if k not in RESUME_KEYS]
    if refused:
        raise BadValueError(f'resume={cfg["resume"]!r}: ' + ', '.join(
            f'{k}={changes[k][1]!r} (the run has {changes[k][0]!r})' for k in refused)
            + ': a resumed run keeps its own settings (num_epoch may change); drop '
            + ('it' if len(refused) == 1 else 'them') + ', or start a new run')
    if 'num_epoch' in changes and cfg['num_epoch'] < done:
        raise BadValueError(f'num_epoch={cfg["num_epoch"]}: run {cfg["resume"]} has trained '
                            f'{done} epochs already; give num_epoch >= {done}')
    return run_dir, {**saved, **{k: new for k, (_, new) in changes.items()}}, changes
