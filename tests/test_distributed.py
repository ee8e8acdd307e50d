"""Data-parallel training on CPU (gloo, 2 processes) against one process.

The step test spawns two processes that train on halves of the global batches
(torch.multiprocessing); the run tests launch main.py under torchrun.
"""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cmvq import distributed as dist
from cmvq.config import model_config
from cmvq.runtime import Runtime
from cmvq.train import run_epoch
import main
import model as models
from conftest import REPO
from test_runner import EXTRA_FILES, SEED_FILES

CFG = {**main.header(), 'num_hiddens': 16, 'num_residual_hiddens': 4, 'embedding_dim': 8,
       'num_embeddings': 16, 'device': 'cpu', 'amp': 'off', 'channels_last': False}
GLOBAL_BATCH, ITEMS = 8, 16  # two steps of one epoch


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def batches(cfg):
    """The global batches of epoch 1 as this process's sampler cuts them: for rank r
    of N, items r, r + N, ... of the shuffled epoch, GLOBAL_BATCH / N per step."""
    gen = torch.Generator().manual_seed(5)
    data = (torch.rand(ITEMS, 3, 128, 128, generator=gen),
            torch.randn(ITEMS, 1, 256, 256, generator=gen),
            torch.randint(0, 6, (ITEMS,), generator=gen))
    sampler = dist.train_sampler(range(ITEMS), shuffle=True, seed=cfg['seed'])
    sampler.set_epoch(1)
    order = torch.tensor(list(sampler))
    local = GLOBAL_BATCH // dist.context().world_size
    return [tuple(t[order[i:i + local]] for t in data) for i in range(0, len(order), local)]


def train_two_steps(cfg):
    """The model after two SGD steps through run_epoch, and the logged history.

    Dropout is off: each rank draws its own masks, so with dropout no two runs agree.
    SGD, not Adam: Adam turns float-noise gradients (biases before BatchNorm) into
    full-size steps, so its parameters differ by ~lr however exact the sync is."""
    torch.manual_seed(cfg['seed'])
    net = models.build_model(model_config(cfg))
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    runtime = Runtime(cfg)
    trainer = dist.wrap(net, runtime.device, sync_bn=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    result = run_epoch(trainer, batches(cfg), runtime, (1.0, 1.0), cfg, optimizer)
    return {k: v.clone() for k, v in net.state_dict().items()}, result.history


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init(torch.device('cpu'))
    try:
        torch.save(train_two_steps(CFG), f'{out}/rank{rank}.pt')
    finally:
        dist.close()


def test_two_process_step_equals_one_process_step(tmp_path):
    """Same seed and global batch: the loss, every parameter, the EMA codebooks and
    the BatchNorm statistics after two steps match one process on the whole batch."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    state, history = train_two_steps(CFG)
    assert len(history['loss']) == ITEMS // GLOBAL_BATCH
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    for key in ('loss', 'class_error', 'recon_error1', 'recon_error2', 'vq_loss'):
        assert ranks[0][1][key] == pytest.approx(history[key], rel=1e-4), key
    assert any('ema_w' in k for k in state) and any('running_var' in k for k in state)
    for key, value in state.items():
        for rank_state, _ in ranks:
            torch.testing.assert_close(rank_state[key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key: f'{k}: {m}')
    moved = state['backbone.quantizers.image.embedding']
    assert not torch.equal(moved, train_state_at_init()['backbone.quantizers.image.embedding'])


def train_state_at_init():
    torch.manual_seed(CFG['seed'])
    return models.build_model(model_config(CFG)).state_dict()


def torchrun(script, *argv):
    """script under torchrun with 2 CPU processes (gloo); patient with a busy machine."""
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         '--rdzv-conf', 'read_timeout=600', str(REPO / script), *argv],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_torchrun_run_leaves_one_complete_folder_that_reevaluates(tiny_splits, tmp_path):
    """Rank 0 alone writes; test metrics cover the whole split once (7 items over 2
    ranks: 4 + 3, no padding); one process re-evaluating the checkpoint agrees."""
    results = tmp_path / 'results'
    # fp32: bf16 kernels may round differently at the two runs' batch sizes
    proc = torchrun('main.py', *tiny_splits(results, '--num_epoch=1', '--amp=off'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(results.iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    assert not [f for f in SEED_FILES + EXTRA_FILES if not (run_dir / f).is_file()]
    log = (run_dir / 'log.txt').read_text()
    assert log.count('Epoch 1/1') == 1 and 'process 0 of 2 (torchrun)' in log
    assert json.loads((run_dir / 'environment.json').read_text())['processes'] == 2
    test = json.loads((run_dir / 'metrics.json').read_text())['test']
    test_items = len(pickle.loads((data_path(tiny_splits) / 'test_videos.pkl').read_bytes()))
    assert test['num_samples'] == test_items == 7
    again = main.main(tiny_splits(results, f'--timestamp={run_dir.name}', '--amp=off'))
    for key in ('accuracy', 'confusion_matrix', 'per_class_accuracy', 'mask', 'groups'):
        assert again[key] == test[key], key
    assert again['class_error'] == pytest.approx(test['class_error'], rel=1e-5)


def data_path(tiny_splits):
    return Path(tiny_splits('')[0].split('=', 1)[1])
