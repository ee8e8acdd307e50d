"""CM-VQVAE: train, validate and test on CREMA-D, RML or EmoVoxCeleb; or evaluate a saved run.

    python main.py                              # the header below, as it is
    python main.py configs/demo.py              # a config file overrides the header
    python main.py --mode=audio-only --seed=1   # so do --key=value pairs
    python main.py --timestamp=20261121-101500  # evaluate results/20261121-101500
    python main.py --dataset=RML --data_path=data_rml_by_user --num_epoch=10
    python main.py --dataset=RML --pretrained=True --pretrained_timestamp=20261121-101500
    torchrun --nproc_per_node=2 main.py ...     # data-parallel over 2 processes/GPUs

A run writes results/<YYYYmmdd-HHMMSS>/ (see README.md for every file).
"""
import json
import sys
import time
import traceback

import datasets
import distributed as dist
import experiment as ex
import model as models
from configurator import ConfigError, configure
from errors import BadValueError, MissingError, UserError, one_line, run_script
import transfer

# ------------------------------------------------------------------------------------------
# config: edit here, or override with a config file / --key=value (values are type-checked)
message = 'CM-VQVAE on CREMA-D'  # recorded at the top of the log
timestamp = None            # None: train; 'YYYYmmdd-HHMMSS': evaluate results/<timestamp>
dataset = 'CREMA-D'         # 'CREMA-D', 'RML', 'EmoVoxCeleb', 'RML_feat'
pretrained = False          # RML only: start from a saved run's VQ-VAE modules (transfer.py)
pretrained_timestamp = None  # pretrained=True: that run, 'YYYYmmdd-HHMMSS' in results_dir
reset_mask = False          # pretrained=True: reset the transferred mask to its initial value
mode = 'multimodal'         # 'multimodal', 'image-only', 'audio-only'
base_type = 0               # 0 proposed; 1 no reconstruction, no mask; 2 no mask;
#                             3 no reconstruction; 4 two-ResNet18 comparison model
data_path = 'data_cremad'   # split configs: read_cremad.py (data_cremad), read_rml.py
#                             (data_rml: by clip; data_rml_by_user: subjects held out)
media_root = None           # None: clip paths as stored in data_path; a CREMA-D (RML) folder:
#                             remap them onto it (e.g. the published run's split files)
balanced = False            # deprecated; True is an error
num_epoch = 50              # epochs (int > 0)
batch_size = 128            # the global batch (int > 0); torchrun: split over processes
shuffle = True              # shuffle the training loader (True, False)
learning_rate = 1e-3        # Adam learning rate (> 0)
num_hiddens = 128           # encoder/decoder width h (multiple of 4)
num_residual_hiddens = 32   # residual block bottleneck width r
num_residual_layers = 2     # residual blocks per stack (>= 0)
embedding_dim = 64          # codebook vector size D (multiple of 4)
num_embeddings = 512        # codebook size K
commitment_cost = 0.25      # beta of the VQ loss
decay = 0.99                # [0, 1): > 0 EMA codebook, 0 plain VQ
mask_scale = 1e-2           # initial mask magnitude (> 0)
mask_init = '1s'            # '1s' fills mask_scale; 'uniform' draws U(-mask_scale, mask_scale)
threshold_fn = 'binarizer'  # 'binarizer', 'ternarizer', 'attention', 'randomizer'
threshold = None            # None means 5e-3
regularization = True       # adds 1e-4 * sum(mask) to the loss (True, False)
recon_loss = 'mse'          # 'mse' (released code), 'mse/var' (divided by the training variance)
modify_modal = False        # RML only: add emotion-irrelevant skin colour / pitch per item
audio_geometry = None       # RML only: None ('RML', or the pretrained source's), 'RML', 'CREMA-D'
subsample = None            # EmoVoxCeleb only: None, or N: keep every ceil(len/N)-th item
layer = 7                   # RML_feat only: audio features of this transformer layer (1..24)
# additions to the paper's constants
seed = 0                    # drives initialisation, shuffles and frame draws (int >= 0)
device = 'auto'             # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
num_workers = 2             # DataLoader worker processes (0: load in the main process)
amp = 'auto'                # 'auto' (bf16 autocast on CUDA and on CPUs with native bf16),
#                             'bf16', 'off'
channels_last = 'auto'      # 'auto' (on: measured faster on CUDA and CPU), True, False
compile = False             # torch.compile the model (True, False); off with a message
#                             where the platform cannot compile
sync_bn = True              # torchrun: BatchNorm statistics of the global batch (True, False)
cache = True                # decode each clip once into cache_dir (True, False)
cache_dir = 'cache'         # decode-once cache folder (memory-mapped arrays)
data_on_gpu = False         # CUDA + cache: keep the cached arrays on the GPU, sample there
frame_jitter = None         # training frame within +-frame_jitter of the centre frame;
#                             None: the dataset's (CREMA-D 15, RML 22)
results_dir = 'results'     # run folders go to results_dir/<timestamp>
tensorboard = False         # True: also log per-epoch scalars, the mask and reconstructions
#                             to results_dir/<run>/tb/ (tensorboard --logdir ...)
resume = None               # 'YYYYmmdd-HHMMSS': continue that interrupted training run from
#                             its last.pt (its own config; machine settings from here)
robustness = False          # with timestamp: test the saved run with a modality removed or
#                             corrupted (robustness.py), instead of the plain re-evaluation
allow_split_change = False  # evaluation: test anyway when data_path's test split changed
#                             since the run trained (the result then says so)
twin_actors = 0             # > 0: if data_path is missing, synthesize a twin of this many
#                             actors at twin_root and build its split configs (the demo)
twin_root = 'synth_cremad/CREMA-D'  # where that twin goes
# ------------------------------------------------------------------------------------------

# Settings of the machine, not of the model: evaluating a saved run takes these
# from the current header and everything else from the run's config.json.
_RUNTIME_KEYS = ('message', 'timestamp', 'device', 'num_workers', 'amp', 'channels_last',
                'compile', 'cache', 'cache_dir', 'data_on_gpu', 'results_dir', 'media_root',
                'robustness', 'resume', 'tensorboard', 'allow_split_change')


def header():
    """This file's header constants (also the defaults of main_separate.py)."""
    from configurator import config_keys
    return {k: globals()[k] for k in config_keys(globals())}


def resolve(defaults, argv):
    """Overrides applied and checked, before any work; a bad value raises ConfigError
    (a UserError: the scripts print it as one line). The seed's dataset spelling
    'CREMAD' is taken as 'CREMA-D'."""
    cfg = configure(defaults, argv, ex.CHOICES)
    cfg['dataset'] = ex.DATASET_ALIASES.get(cfg['dataset'], cfg['dataset'])
    try:
        ex.check_config(cfg)
        if not cfg['timestamp']:  # a saved run's config already holds its geometry
            cfg = transfer.resolve(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def start_run(cfg, argv):
    """New run folder with log.txt, config.json and environment.json, written first.

    Under torchrun rank 0 makes it and tells the others its name; they log nothing
    but a failure."""
    ctx = dist.context()
    if not ctx.is_main:
        run_dir = dist.broadcast(None)
        return run_dir, ex.Log(run_dir / 'log.txt', ctx.rank)
    run_dir = dist.broadcast(ex.new_run_dir(cfg['results_dir']))
    log = ex.Log(run_dir / 'log.txt')
    log(f'Message: {cfg["message"]}')
    log(f'Run folder: {run_dir}')
    log('Config: ' + json.dumps(cfg))
    ex.save_json(run_dir / 'config.json', cfg)
    ex.save_json(run_dir / 'splits.json', ex.split_fingerprint(cfg))
    ex.save_json(run_dir / 'environment.json', {
        'argv': [sys.argv[0], *argv], 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
        'processes': ctx.world_size, 'versions': ex.versions()})
    return run_dir, log


def logged(fn):
    """Log why a run stopped before it propagates, so the log so far stays readable:
    a user's mistake (UserError) as its one line, anything else with its traceback."""
    def wrapper(cfg, run_dir, log, *args):
        try:
            return fn(cfg, run_dir, log, *args)
        except UserError as e:
            log.error(f'Run failed: {one_line(e)}')
            raise
        except BaseException:
            log.error('Run failed:\n' + traceback.format_exc())
            raise
        finally:
            log.close()
    return wrapper


@logged
def train(cfg, run_dir, log, resume=False):
    runtime, loaders, variances = ex.setup(cfg, log)
    net = runtime.prepare(models.build_model(ex.model_config(cfg)))
    log(f'Model: {type(net).__name__}, {models.count_parameters(net):,} trainable parameters')
    if cfg['pretrained']:
        transfer.apply([net], cfg, log)
    board = None
    if cfg['tensorboard'] and dist.is_main():
        import tblog
        board = tblog.TensorBoardLog(run_dir, loaders['val'], runtime)
    history = ex.fit(net, loaders, runtime, variances, cfg, log, run_dir / 'model.pt',
                     last=run_dir / 'last.pt', resume=resume, on_epoch=board)
    if board:
        board.close()
    net, best_epoch = load_model(cfg, run_dir, runtime)
    log(f'Best epoch {best_epoch} (lowest val class_error); testing its checkpoint')
    test = ex.evaluate(net, loaders['test'], runtime, variances, cfg, groups=True)
    log(ex.test_block(test))
    if dist.is_main():
        finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch)
    log(f'Done in {sum(history["epoch_seconds"]):.1f} s of epochs; results in {run_dir}')
    return test


def finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch, stage1=None):
    """Pickles, metrics.json and plots of a finished training run; stage1: the VQ-VAE
    stage's history of a two-stage run (its reconstruction and perplexity series)."""
    import plots
    ex.save_history(run_dir, history, stage1)
    arrays = ex.save_reconstructions(run_dir, net, loaders['test'], runtime)
    ex.save_json(run_dir / 'metrics.json', {'test': test, 'best_epoch': best_epoch,
                                            'epoch_seconds': history['epoch_seconds']})
    plots.plot_curves(run_dir, history)
    plots.plot_recon_perplexity(run_dir, stage1 or history, cfg['recon_loss'])
    if stage1 is not None:
        plots.plot_curves(run_dir, stage1, name='curves_vae.png')
    mask = net.get_mask()
    if mask is not None:
        threshold = models.DEFAULT_THRESHOLD if cfg['threshold'] is None else cfg['threshold']
        plots.plot_mask(run_dir, history['mask'], mask.cpu().numpy(), cfg['embedding_dim'],
                        threshold)
    plots.plot_confusion(run_dir, test['confusion_matrix'], datasets.CLASS_NAMES[cfg['dataset']])
    plots.plot_reconstructions(run_dir, arrays)


def saved_config(cfg, script='main.py', key='timestamp'):
    """The config of the saved run cfg[key] with this machine's runtime settings; a run
    that `script` did not train (or that never trained) is a UserError saying what to do."""
    run_dir = ex.find_run_dir(cfg['results_dir'], cfg[key], script)
    saved = json.loads((run_dir / 'config.json').read_text())
    # Runs saved before recon_loss existed trained with the variance-normalised loss.
    saved.setdefault('recon_loss', 'mse/var')
    return run_dir, {**saved, **{k: cfg[k] for k in _RUNTIME_KEYS}}


def load_model(cfg, run_dir, runtime):
    """The saved run's model, rebuilt from its config, with model.pt loaded."""
    net = runtime.prepare(models.build_model(ex.model_config(cfg)))
    checkpoint = ex.load_checkpoint(run_dir / 'model.pt')
    net.load_state_dict(checkpoint['model'])
    return net, checkpoint['epoch']


@logged
def evaluate_saved(cfg, run_dir, log, load=load_model):
    """Rebuild the saved model (load(cfg, run_dir, runtime) -> (model, epoch)), test it,
    append to the run's log and write eval-<now>.json beside it."""
    log(f'Evaluation of the saved model, {time.strftime("%Y-%m-%d %H:%M:%S")}: '
        f'{cfg["message"]}')
    changed = ex.check_test_split(cfg, run_dir)
    if changed:
        log(f'WARNING: {changed}; evaluating anyway (allow_split_change=True)')
    ex.seed_everything(cfg['seed'])
    runtime = ex.Runtime(cfg)
    loader = ex.make_loaders(cfg, runtime, splits=('test',))['test']
    net, epoch = load(cfg, run_dir, runtime)
    test = ex.evaluate(net, loader, runtime, ex.train_variances(cfg), cfg,
                       groups=True)
    if changed:
        test['split_changed'] = changed
    log(ex.test_block(test, title=f'Test (checkpoint of epoch {epoch})'
                      + (' ON A CHANGED TEST SPLIT' if changed else '')))
    path = run_dir / f'eval-{time.strftime(ex.TIMESTAMP_FORMAT)}.json'
    if dist.is_main():
        path = ex.save_json_new(path, {'test': test, 'config': cfg})
    log(f'Wrote {path}')
    return test


def prepare_data(cfg):
    """The demo's data: a synthetic twin and its split configs, made if missing."""
    if cfg['twin_actors']:
        import read_cremad
        read_cremad.prepare_twin(cfg['twin_root'], cfg['data_path'], seed=cfg['seed'],
                                 workers=max(1, cfg['num_workers']), cache_dir=cfg['cache_dir'],
                                 frame_jitter=ex.frame_jitter(cfg), num_actors=cfg['twin_actors'])


def resumable(cfg):
    """(run folder, config) of the interrupted run cfg['resume'], or a UserError saying
    why it cannot go on."""
    run_dir, cfg = saved_config(cfg, key='resume')
    if (run_dir / 'metrics.json').is_file():
        raise BadValueError(f'resume={cfg["resume"]!r}: that run finished (metrics.json '
                            'exists); nothing to resume')
    if not (run_dir / 'last.pt').is_file():
        raise MissingError(f'resume={cfg["resume"]!r}: {run_dir / "last.pt"} is missing '
                           '(the run stopped before its first epoch ended); start a new run')
    return run_dir, cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(header(), argv)
    if cfg['timestamp'] and cfg['resume']:
        raise ConfigError('give timestamp (evaluate a run) or resume (continue one), '
                          'not both')
    dist.init(ex.resolve_device(cfg))
    rank = dist.context().rank
    if cfg['timestamp']:
        run_dir, cfg = saved_config(cfg)
        ex.preflight(cfg, splits=('test',))
        ex.check_test_split(cfg, run_dir)
        if cfg['robustness']:
            import robustness
            return robustness.evaluate_robustness(cfg, run_dir, ex.Log(run_dir / 'log.txt'))
        return evaluate_saved(cfg, run_dir, ex.Log(run_dir / 'log.txt', rank))
    if cfg['robustness']:
        raise ConfigError('robustness=True evaluates a saved run: give --timestamp=<run>')
    if cfg['resume']:
        run_dir, cfg = resumable(cfg)
        ex.preflight(cfg)
        log = ex.Log(run_dir / 'log.txt', rank)
        log(f'Resuming the run, {time.strftime("%Y-%m-%d %H:%M:%S")}: argv {argv}')
        return train(cfg, run_dir, log, True)
    with dist.main_first():
        prepare_data(cfg)
    ex.preflight(cfg)
    run_dir, log = start_run(cfg, argv)
    return train(cfg, run_dir, log)


if __name__ == '__main__':
    try:
        run_script(main)
    finally:
        dist.close()
