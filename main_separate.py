"""Two-stage CM-VQVAE: train the VQ-VAEs, then the TaskSolver on their frozen codes.

    python main_separate.py [config file] [--key=value ...]
    python main_separate.py configs/demo.py     # the demo, 12 + 12 epochs
    torchrun --nproc_per_node=2 main_separate.py ...   # data-parallel, as main.py

Stage 1 trains both VQ-VAEs on reconstruction alone (best by validation loss,
results/<timestamp>/model_vae.pt); stage 2 freezes them and trains the masked
TaskSolver on their quantized maps (best by validation classification loss,
model_solver.pt); then the test as in main.py. Every constant of main.py's header
applies (base_type 0: masked solver, 2: unmasked); the two below are added and
default to num_epoch. `timestamp` evaluates a saved two-stage run (main.py
evaluates one-stage runs; each script names the other for the other's runs).
"""
import sys

import torch
from torch import nn

import distributed as dist
import experiment as ex
import main
import model as models
import transfer
from configurator import ConfigError
from errors import run_script

# ------------------------------------------------------------------------------------------
# config: main.py's header, plus
num_epoch_vae = None        # stage 1 epochs: VQ-VAEs on reconstruction (None: num_epoch)
num_epoch_solver = None     # stage 2 epochs: TaskSolver on the frozen codes (None: num_epoch)
# ------------------------------------------------------------------------------------------


class FrozenCodes(nn.Module):
    """A frozen ModelVQVAE feeding a ModelSolver: forward(image, audio) -> ModelOutput.

    The VQ-VAE stays in eval mode (fixed BN statistics and codebooks) and gets
    no gradient. Its decoders run only outside training (validation, test, the
    saved reconstructions): training steps need just the codes.
    """

    def __init__(self, vqvae, solver):
        super().__init__()
        self.vqvae, self.solver = vqvae.requires_grad_(False), solver

    def train(self, mode=True):
        super().train(mode)
        self.vqvae.eval()
        return self

    def forward(self, image, audio):
        with torch.no_grad():
            codes = self.vqvae(image, audio, decode=not self.training)  # (B, D, 32, 32)
        out = self.solver(codes.quantized_image, codes.quantized_audio)
        return out._replace(recon_image=codes.recon_image, recon_audio=codes.recon_audio,
                            perplexity_image=codes.perplexity_image,
                            perplexity_audio=codes.perplexity_audio)

    def mask_ratios(self):
        return self.solver.mask_ratios()

    def mask_regularization(self):
        return self.solver.mask_regularization()

    def get_mask(self):
        return self.solver.get_mask()

    def codebooks(self):
        return self.vqvae.codebooks()


def build(cfg, runtime):
    mcfg = ex.model_config(cfg)
    return (runtime.prepare(models.build_vqvae(mcfg)),
            runtime.prepare(models.build_solver(mcfg)))


def load_two_stage(cfg, run_dir, runtime):
    """Rebuild both stages from the run's config and load their checkpoints."""
    vqvae, solver = build(cfg, runtime)
    for net, name in ((vqvae, 'model_vae.pt'), (solver, 'model_solver.pt')):
        checkpoint = ex.load_checkpoint(run_dir / name)
        net.load_state_dict(checkpoint['model'])
    return FrozenCodes(vqvae, solver), checkpoint['epoch']


@main.logged
def train(cfg, run_dir, log):
    runtime, loaders, variances = ex.setup(cfg, log)
    vqvae, solver = build(cfg, runtime)
    if cfg['pretrained']:
        transfer.apply([vqvae, solver], cfg, log)
    log(f'Stage 1: VQ-VAEs, {models.count_parameters(vqvae):,} trainable parameters, '
        f'{cfg["num_epoch_vae"]} epochs on reconstruction')
    stage1 = ex.fit(vqvae, loaders, runtime, variances, cfg, log, run_dir / 'model_vae.pt',
                    num_epoch=cfg['num_epoch_vae'], monitor='loss')
    vqvae.load_state_dict(ex.load_checkpoint(run_dir / 'model_vae.pt')['model'])
    net = FrozenCodes(vqvae, solver)
    log(f'Stage 2: TaskSolver on frozen codes, {models.count_parameters(net):,} trainable '
        f'parameters, {cfg["num_epoch_solver"]} epochs')
    history = ex.fit(net, loaders, runtime, variances, cfg, log, run_dir / 'model_solver.pt',
                     num_epoch=cfg['num_epoch_solver'], save=solver)
    net, best_epoch = load_two_stage(cfg, run_dir, runtime)
    log(f'Best stage-2 epoch {best_epoch}; testing its checkpoint')
    test = ex.evaluate(net, loaders['test'], runtime, variances, cfg, groups=True)
    log(ex.test_block(test))
    if dist.is_main():
        main.finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch, stage1)
    log(f'Done; results in {run_dir}')
    return test


def resolve(argv):
    """main.py's header and the two stage lengths, checked; a stage length of None
    follows num_epoch (so configs/demo.py's num_epoch sets both)."""
    defaults = {**main.header(), 'num_epoch_vae': num_epoch_vae,
                'num_epoch_solver': num_epoch_solver}
    cfg = main.resolve(defaults, argv)
    if cfg['dataset'] == 'RML_feat':
        raise ConfigError("dataset='RML_feat' has no two-stage form (the seed trains its "
                          'Model_Feat end to end): use main.py')
    if cfg['base_type'] not in (0, 2):
        raise ConfigError(f"base_type={cfg['base_type']!r} has no two-stage form; "
                          f"allowed: 0 (masked solver), 2 (unmasked)")
    for key in ('num_epoch_vae', 'num_epoch_solver'):
        cfg[key] = cfg[key] or cfg['num_epoch']
    return cfg


def run(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(argv)
    if cfg['robustness'] or cfg['resume']:
        raise ConfigError('robustness and resume apply to main.py runs only')
    dist.init(ex.resolve_device(cfg))
    if cfg['timestamp']:
        run_dir, cfg = main.saved_config(cfg, 'main_separate.py')
        ex.preflight(cfg, splits=('test',))
        ex.check_test_split(cfg, run_dir)
        return main.evaluate_saved(cfg, run_dir, ex.Log(run_dir / 'log.txt', dist.context().rank),
                                   load_two_stage)
    with dist.main_first():
        main.prepare_data(cfg)
    ex.preflight(cfg)
    run_dir, log = main.start_run(cfg, argv)
    return train(cfg, run_dir, log)


if __name__ == '__main__':
    try:
        run_script(run)
    finally:
        dist.close()
