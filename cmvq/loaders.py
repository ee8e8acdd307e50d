"""The data of a run: its datasets, their loaders, and the training variances.

A training loader's draws (shuffle order, frames) are a function of (seed, epoch):
set_epoch(loader, epoch) before each epoch. Evaluation loaders yield every item in
order. Under torchrun each process loads its share (see make_loader).

data_on_gpu='auto' (resolve_data_on_gpu) samples from the decode-once cache held in
GPU memory (DeviceLoader) when the device is CUDA, the dataset has a cache and the
arrays fit in GPU_DATA_SHARE of the free GPU memory; else a DataLoader reads the cache.
"""
import numpy as np
import torch

import datasets
from cmvq import distributed
from read_variances import read_variances

# data_on_gpu='auto' holds the cached arrays on the GPU when they take at most this share
# of its free memory; the rest is left to the model, its activations and the optimizer.
GPU_DATA_SHARE = 0.5
DEVICE_DATASETS = ('CREMA-D', 'RML')  # those DeviceLoader samples (not with modify_modal)


def frame_jitter(cfg):
    """cfg['frame_jitter'], or when None the dataset's (CREMA-D 15, RML 22)."""
    if cfg['frame_jitter'] is not None:
        return cfg['frame_jitter']
    return datasets.default_frame_jitter(cfg['dataset'])


def dataset_options(cfg):
    """The keyword arguments cfg['dataset']'s class takes from the config."""
    if cfg['dataset'] == 'EmoVoxCeleb':
        return {'subsample': cfg.get('subsample'), 'seed': cfg['seed']}
    if cfg['dataset'] == 'RML_feat':
        return {'layer': cfg['layer']}
    options = {'root': cfg.get('media_root'), 'cache': cfg['cache'],
               'cache_dir': cfg['cache_dir'], 'frame_jitter': frame_jitter(cfg),
               'seed': cfg['seed']}
    if cfg['dataset'] in datasets.RML_DATASETS:
        options.update(modify_modal=cfg['modify_modal'],
                       audio_geometry=cfg.get('audio_geometry') or 'RML')
    return options


def make_datasets(cfg, splits=('train', 'val', 'test'), train=None):
    """The splits of cfg['data_path']. train=None: the training split draws its items
    at random, the others take the centre frame; False: every split takes the centre
    frame (deterministic features, e.g. for tools/probe.py)."""
    return {split: datasets.get_dataset(cfg['dataset'], cfg['data_path'], split,
                                        train=split == 'train' if train is None else train,
                                        **dataset_options(cfg))
            for split in splits}


class DeviceLoader:
    """Batches sampled from the decode-once cache held in device memory.

    The whole cache moves to `device` once: frames (N, 2J+1, 128, 128, 3) uint8
    and log-mels (N, 256, 256) float32 (~1.7 MB a clip: ~13 GB for CREMA-D, which
    an H200 holds easily). Each batch is then an index gather plus one uint8 ->
    float conversion on the device, so loading never starves the GPU. Batches
    match the DataLoader's: (image (B, 3, 128, 128) in [0, 1], audio (B, 1, 256,
    256), emotion, race, gender, sentence), with the same frame rule (training:
    uniform within +-J of the centre, evaluation: the centre frame). Each epoch's
    draws come from a generator seeded by (seed, epoch) (see set_epoch).
    """

    def __init__(self, dataset, *, batch_size, train, sampler, drop_last, device, seed):
        arrays = dataset.arrays()
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.sampler, self.drop_last = sampler, drop_last
        self.jitter = (arrays['frames'].shape[1] - 1) // 2
        rows = held_rows(dataset, sampler, train)  # M items: all, or this rank's shard
        self.frames = _to_device(arrays['frames'], device, rows)  # (M, 2J+1, 128, 128, 3) uint8
        self.specs = _to_device(arrays['specs'], device, rows)    # (M, 256, 256) float32
        self.labels = torch.as_tensor(dataset.item_labels()[rows], device=device)  # (M, 4)
        self.seed, self.epoch = seed, 0
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        device = self.frames.device
        if self.train:  # every item is held: rows are the sampler's item indices
            order = torch.as_tensor(list(self.sampler), device=device)  # this rank's items
            self.generator.manual_seed(datasets.epoch_seed(self.seed, self.epoch))
            # one draw per item of the split, picked by index: an item's frame depends on
            # (seed, epoch, index) only, not on its rank or its place in the batch
            offsets = torch.randint(0, 2 * self.jitter + 1, (len(self.dataset),),
                                    device=device, generator=self.generator)
        else:  # the held rows are the sampler's items, in its order
            order = torch.arange(len(self.frames), device=device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            offset = offsets[idx] if self.train else torch.full_like(idx, self.jitter)
            image = self.frames[idx, offset].permute(0, 3, 1, 2).float().div_(255)
            audio = self.specs[idx].unsqueeze(1)
            yield (image, audio, *self.labels[idx].unbind(1))


def held_rows(dataset, sampler, train):
    """The items a DeviceLoader holds, in the order it uses them: a training loader
    all of them (each epoch's shuffle may give this rank any), an evaluation loader
    its sampler's (under torchrun, this rank's shard)."""
    return np.arange(len(dataset)) if train else np.fromiter(sampler, np.int64)


def held_bytes(dataset, train):
    """Device memory a DeviceLoader of dataset would take here (frames and log-mels)."""
    arrays = dataset.arrays()
    rows = len(dataset) if train else len(distributed.ShardSampler(dataset))
    return rows * (arrays['frames'][0].nbytes + arrays['specs'][0].nbytes)


def resolve_data_on_gpu(cfg, runtime, data):
    """cfg['data_on_gpu'] as a bool for the loaders of data, a list of (dataset, train),
    and the log line of an 'auto' decision (None for an explicit True or False).

    'auto' is on when the device is CUDA, cache=True, the dataset has a DeviceLoader
    (CREMA-D, RML without modify_modal) and what this process would hold fits in
    GPU_DATA_SHARE of the GPU's free memory; under torchrun, on only if so on every
    process (all sample alike)."""
    if cfg['data_on_gpu'] != 'auto':
        return cfg['data_on_gpu'], None
    problem, need, free = None, 0, 0
    if runtime.device.type != 'cuda':
        problem = f'the device is {runtime.device}'
    elif not cfg['cache']:
        problem = 'cache=False'
    elif cfg['dataset'] not in DEVICE_DATASETS or cfg.get('modify_modal'):
        problem = f"no GPU sampler for {cfg['dataset']}" + (
            ' with modify_modal' if cfg.get('modify_modal') else '')
    else:
        need = sum(held_bytes(dataset, train) for dataset, train in data)
        free = torch.cuda.mem_get_info(runtime.device)[0]
        if need > GPU_DATA_SHARE * free:
            problem = (f'the cached arrays take {need / 1e9:.1f} GB, more than '
                       f'{GPU_DATA_SHARE:.0%} of the {free / 1e9:.1f} GB free on {runtime.device}')
    problems = [p for p in distributed.all_gather(problem) if p is not None]
    if problems:
        return False, (f"data_on_gpu='auto': off ({problems[0]}); a DataLoader with "
                       f"{cfg['num_workers']} workers reads the cache")
    return True, (f"data_on_gpu='auto': on (the cached arrays take {need / 1e9:.1f} GB of "
                  f'the {free / 1e9:.1f} GB free on {runtime.device}); batches are sampled there')


def _to_device(array, device, rows, chunk=256):
    """Copy rows of a (memory-mapped) array to the device in chunks: no full host copy."""
    dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
    out = torch.empty((len(rows), *array.shape[1:]), dtype=dtype, device=device)
    for start in range(0, len(rows), chunk):
        part = array[rows[start:start + chunk]]  # a host copy of one chunk of rows
        out[start:start + chunk] = torch.from_numpy(part)
    return out


def make_loader(dataset, cfg, runtime, *, train):
    """DataLoader seeded from cfg['seed'] (a DeviceLoader when data_on_gpu, see
    resolve_data_on_gpu) over
    this process's items. Training: a per-epoch shuffle seeded by (seed, epoch) (if
    cfg['shuffle']) whose draws (order, frames) are a function of (seed, epoch): call
    set_epoch(loader, epoch) before each epoch. Evaluation: every item in order. Under
    torchrun of N processes each takes 1/N of the items and cfg['batch_size'] / N per
    batch: batch_size is the global batch, and the N ranks' t-th batches together are
    the one-process run's t-th batch."""
    world = distributed.context().world_size
    sampler = (distributed.train_sampler(dataset, shuffle=cfg['shuffle'], seed=cfg['seed']) if train
               else distributed.ShardSampler(dataset))
    batch_size = cfg['batch_size'] // world
    # As released, training keeps the last partial batch, except one of a single
    # item: the solver's BatchNorm1d cannot train on one value per channel.
    drop_last = train and len(sampler) % batch_size == 1 and len(sampler) > 1
    if resolve_data_on_gpu(cfg, runtime, [(dataset, train)])[0]:
        return DeviceLoader(dataset, batch_size=batch_size, train=train, sampler=sampler,
                            drop_last=drop_last, device=runtime.device, seed=cfg['seed'])
    generator = torch.Generator().manual_seed(cfg['seed'])
    workers = cfg['num_workers']
    if train:  # (epoch, index) keys: frame draws independent of workers and ranks
        sampler = datasets.EpochSampler(len(dataset), sampler=sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=runtime.pin_memory, generator=generator,
        persistent_workers=workers > 0, drop_last=drop_last)


def set_epoch(loader, epoch):
    """Select the draws of `epoch` for a training loader (before iterating it)."""
    (loader if isinstance(loader, DeviceLoader) else loader.sampler).set_epoch(epoch)


def make_loaders(cfg, runtime, splits=('train', 'val', 'test'), log=None):
    """{split: loader} of cfg's splits; log (if given) gets the data_on_gpu='auto' line."""
    with distributed.main_first():  # rank 0 builds a missing cache, the others then open it
        data = make_datasets(cfg, splits)
    on_gpu, line = resolve_data_on_gpu(cfg, runtime, [(ds, split == 'train')
                                                      for split, ds in data.items()])
    if line and log:
        log(line)
    cfg = {**cfg, 'data_on_gpu': on_gpu}
    return {split: make_loader(ds, cfg, runtime, train=split == 'train')
            for split, ds in data.items()}


def train_variances(cfg):
    """(image_var, audio_var) of cfg's training split (RML_feat: of its audio layer)."""
    return read_variances(cfg['data_path'], cfg['layer'] if cfg['dataset'] == 'RML_feat'
                          else None)
