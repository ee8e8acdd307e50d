"""A main_separate.py run: the two-stage form of CM-VQVAE.

Stage 1 trains both VQ-VAEs on reconstruction alone (best by validation loss,
model_vae.pt); stage 2 freezes them (model.ModelTwoStage) and trains the TaskSolver
on their quantized maps (best by validation classification loss, model_solver.pt);
then the test and the outputs of a main.py run.
"""
import sys

import model as models
from cmvq import distributed, transfer
from cmvq.config import model_config, optional_positive_int
from cmvq.configurator import ConfigError
from cmvq.experiment import evaluate_saved, prepare_data, resolve_run
from cmvq.outputs import finish
from cmvq.preflight import check_splits, preflight, split_fingerprint
from cmvq.runs import (Log, check_checkpoints, load_model, load_weights, logged, saved_config,
                       start_run)
from cmvq.runtime import resolve_device
from cmvq.train import evaluate, fit, setup, test_block


# main_separate.py's own keys (None: num_epoch)
CHOICES = {'num_epoch_vae': optional_positive_int, 'num_epoch_solver': optional_positive_int}


def main(defaults, argv=None):
    """main_separate.py: defaults is its header; returns the test metrics."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(defaults, argv)
    if cfg['robustness']:
        raise ConfigError('robustness=True: evaluate the run with python3 main.py '
                          f'--timestamp={cfg["timestamp"] or "<run>"} --robustness=True '
                          '(main.py evaluates two-stage runs under corruption too)')
    if cfg['resume']:
        raise ConfigError('resume applies to main.py runs (main_separate.py saves no last.pt); '
                          'start the two-stage run again')
    distributed.init(resolve_device(cfg))
    if cfg['timestamp']:
        run_dir, cfg = saved_config(cfg, 'main_separate.py')
        preflight(cfg, splits=('test',))
        check_splits(cfg, run_dir)
        check_checkpoints(run_dir)
        return evaluate_saved(cfg, run_dir, Log(run_dir / 'log.txt', distributed.context().rank))
    with distributed.main_first():
        prepare_data(cfg)
    preflight(cfg)
    if cfg['pretrained']:
        transfer.check(cfg)
    run_dir, log = start_run(cfg, argv, split_fingerprint(cfg))
    return train(cfg, run_dir, log)


def resolve(defaults, argv):
    """The checked settings; a stage length of None follows num_epoch (so
    configs/demo.py's num_epoch sets both)."""
    cfg = resolve_run(defaults, argv, CHOICES)
    if cfg['dataset'] == 'RML_feat':
        raise ConfigError("dataset='RML_feat' has no two-stage form (the released code trains "
                          'its Model_Feat end to end): use main.py')
    if cfg['base_type'] not in (0, 2):
        raise ConfigError(f"base_type={cfg['base_type']!r} has no two-stage form; "
                          f"allowed: 0 (masked solver), 2 (unmasked)")
    for key in ('num_epoch_vae', 'num_epoch_solver'):
        cfg[key] = cfg[key] or cfg['num_epoch']
    return cfg


@logged
def train(cfg, run_dir, log):
    runtime, loaders, variances = setup(cfg, log)
    mcfg = model_config(cfg)
    vqvae = runtime.prepare(models.build_vqvae(mcfg))
    solver = runtime.prepare(models.build_solver(mcfg))
    if cfg['pretrained']:
        transfer.apply([vqvae, solver], cfg, log)
    log(f'Stage 1: VQ-VAEs, {models.count_parameters(vqvae):,} trainable parameters, '
        f'{cfg["num_epoch_vae"]} epochs on reconstruction')
    stage1 = fit(vqvae, loaders, runtime, variances, cfg, log, run_dir / 'model_vae.pt',
                 num_epoch=cfg['num_epoch_vae'], monitor='loss')
    load_weights(vqvae, run_dir / 'model_vae.pt')
    net = models.ModelTwoStage(vqvae, solver)
    log(f'Stage 2: TaskSolver on frozen codes, {models.count_parameters(net):,} trainable '
        f'parameters, {cfg["num_epoch_solver"]} epochs')
    history = fit(net, loaders, runtime, variances, cfg, log, run_dir / 'model_solver.pt',
                  num_epoch=cfg['num_epoch_solver'], save=solver)
    net, best_epoch = load_model(cfg, run_dir, runtime)
    log(f'Best stage-2 epoch {best_epoch}; testing its checkpoint')
    test = evaluate(net, loaders['test'], runtime, variances, cfg, groups=True)
    log(test_block(test))
    if distributed.is_main():
        finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch, stage1)
    log(f'Done; results in {run_dir}')
    return test
