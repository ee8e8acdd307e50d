"""What a finished training run leaves beside its checkpoint: the released code's
pickles (history, reconstructions, codebooks), metrics.json and the plots.

Index convention of the released file names: 1 = image, 2 = audio.
"""
import collections

import torch

import datasets
import model as models
from cmvq import distributed, plots
from cmvq.runs import save_json, save_pickle


def finish(cfg, run_dir, net, loaders, runtime, history, test, best_epoch, stage1=None):
    """Pickles, metrics.json and plots of a finished training run; stage1: the VQ-VAE
    stage's history of a two-stage run (its reconstruction and perplexity series)."""
    save_history(run_dir, history, stage1)
    arrays = save_reconstructions(run_dir, net, loaders['test'], runtime)
    save_json(run_dir / 'metrics.json', {'test': test, 'best_epoch': best_epoch,
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


def save_history(run_dir, history, stage1=None):
    """The seed's pickles: train_/val_ class_error, res_perplexity1/2, res_recon_error1/2.

    A two-stage run passes its VQ-VAE stage's history as stage1: the reconstruction
    and perplexity pickles then hold that stage's series, the class-error ones the
    solver stage's (history), and history.json holds both (stage 1 under 'stage1').
    """
    names = {'class_error': 'class_error', 'perplexity1': 'res_perplexity1',
             'perplexity2': 'res_perplexity2', 'recon_error1': 'res_recon_error1',
             'recon_error2': 'res_recon_error2'}
    for split in ('train', 'val'):
        for key, name in names.items():
            source = stage1 if stage1 is not None and key != 'class_error' else history
            save_pickle(run_dir / f'{split}_{name}.pkl', source[split].get(key, []))
    save_json(run_dir / 'history.json',
              history if stage1 is None else {**history, 'stage1': stage1})


@torch.no_grad()
def last_batch(loader):
    """The last batch `loader` yields, loading only that one where it can (a
    DataLoader whose sampler has a fixed order, such as an evaluation loader's
    ShardSampler: its batch sampler gives the indices)."""
    if isinstance(loader, torch.utils.data.DataLoader) and isinstance(
            loader.sampler, (torch.utils.data.SequentialSampler, distributed.ShardSampler)):
        indices = list(loader.batch_sampler)[-1]
        return loader.collate_fn([loader.dataset[i] for i in indices])
    return collections.deque(loader, maxlen=1)[0]


@torch.no_grad()
def save_reconstructions(run_dir, model, loader, runtime, num=8):
    """What the released main.py pickles after its test, as CPU torch tensors:
    valid_originals{1,2}.pkl / valid_reconstructions{1,2}.pkl, the inputs and
    reconstructions of the last batch of `loader` (the test loader; None without
    decoders), and weight{1,2}.pkl, the codebooks (K, D) (None without VQ).
    Returns numpy copies of the first `num` items for the plots."""
    model.eval()
    image, audio, _ = runtime.to_device(last_batch(loader))
    with runtime.autocast():
        out = model(image, audio)
    pairs = {1: (image, out.recon_image), 2: (audio, out.recon_audio)}
    arrays = {}
    for k, (original, recon) in pairs.items():
        original = original.float().cpu().contiguous()
        recon = None if recon is None else recon.float().cpu().contiguous()
        save_pickle(run_dir / f'valid_originals{k}.pkl', original)
        save_pickle(run_dir / f'valid_reconstructions{k}.pkl', recon)
        arrays[k] = (original[:num].numpy(), None if recon is None else recon[:num].numpy())
    for k, codebook in enumerate(model.codebooks(), start=1):
        save_pickle(run_dir / f'weight{k}.pkl',
                    None if codebook is None else codebook.float().cpu().clone())
    return arrays
