"""Shared fixtures: tiny synthetic CREMA-D and RML twins, made once per test session."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - the project's imports come after the checkout is on sys.path

import main  # noqa: E402
import model as models  # noqa: E402
from cmvq.config import TOOL_KEYS, build_model, model_config  # noqa: E402
from cmvq.experiment import resolve_run  # noqa: E402
from cmvq.preflight import split_fingerprint  # noqa: E402
from cmvq.runs import save_json  # noqa: E402
from cmvq.runtime import precision, resolve_device  # noqa: E402

# The model settings of main.py's header (the paper's widths), with num_classes.
PAPER = model_config(main.header())

# A few dozen short clips: 3 actors x (DFA: 6 emotions + IEO: 16 emotion x level) = 66.
TINY = {'num_actors': 3, 'sentences': 'DFA,IEO', 'duration_scale': 0.5, 'seed': 0}


@pytest.fixture(scope='session')
def shared():
    """../shared: real CREMA-D metadata and the published run's split files."""
    if not (SHARED / 'crema-d' / 'SentenceFilenames.csv').exists():
        pytest.fail(f'{SHARED} is missing: the tests need ../shared beside the checkout')
    return SHARED


@pytest.fixture(scope='session')
def twin(tmp_path_factory):
    """Root of a tiny synthetic CREMA-D tree (VideoFlash/, AudioWAV/, CSVs)."""
    from cmvq.twins import cremad as synth_cremad
    root = tmp_path_factory.mktemp('twin') / 'CREMA-D'
    synth_cremad.generate(root=root, workers=2, **TINY)
    return root


# 3 subjects (s1, s2 filmed at 480, s3 at 240) x 6 emotions x 1 short clip = 18 clips.
TINY_RML = {'num_subjects': 3, 'clips_per_emotion': 1, 'duration_scale': 0.3, 'seed': 0}


@pytest.fixture(scope='session')
def rml_twin(tmp_path_factory):
    """Root of a tiny synthetic RML tree (s1/, s2/, s3/ of AVI clips, ground_truth.csv)."""
    from cmvq.twins import rml as synth_rml
    root = tmp_path_factory.mktemp('rml') / 'RML'
    synth_rml.generate(root=root, workers=2, progress=False, **TINY_RML)
    return root


# rml_data's held-out subjects (the twin's s1 trains).
HELD_OUT = dict(val_subjects=('s2',), test_subjects=('s3',))


@pytest.fixture(scope='session')
def rml_data(rml_twin, tmp_path_factory):
    """by_user split configs of the tiny RML twin and their cache: (folder, cache)."""
    from prepare import read_rml
    path = tmp_path_factory.mktemp('rml_data')
    read_rml.build_splits(rml_twin, path / 'by_user', split_by='user', workers=2,
                          cache_dir=path / 'cache', progress=False, **HELD_OUT)
    return path / 'by_user', path / 'cache'


# Tiny widths and 1-2 epochs: the workflow tests check behaviour, not accuracy.
TINY_RUN = ['--num_hiddens=16', '--num_residual_hiddens=4', '--embedding_dim=8',
            '--num_embeddings=16', '--batch_size=16', '--num_workers=0']


@pytest.fixture(scope='session')
def tiny_splits(twin, tmp_path_factory):
    """Split configs and a cache of the tiny twin: main.py arguments that use them
    (results in a fresh folder per call of the returned function)."""
    from cmvq import cremad
    path = tmp_path_factory.mktemp('tiny_splits')
    cremad.build_splits(twin, path / 'data', seed=0, workers=2,
                             cache_dir=path / 'cache', progress=False)

    def args(results, *extra):
        return [f'--data_path={path / "data"}', f'--cache_dir={path / "cache"}',
                f'--results_dir={results}', *TINY_RUN, *extra]
    return args


def tool_args(argv):
    """The --key=value arguments a tool that reads a saved run takes (config.TOOL_KEYS)."""
    return [a for a in argv if a.startswith('--') and a[2:].split('=')[0] in TOOL_KEYS]


def fake_run(argv, name='20260101-000000', two_stage=False):
    """A run folder in argv's results_dir, as main.py (two_stage: main_separate.py) leaves
    it after training argv's config, with untrained checkpoints of epoch 1: config.json,
    splits.json, environment.json, model.pt (model_vae.pt, model_solver.pt)."""
    cfg = resolve_run(main.header(), argv)
    run = Path(cfg['results_dir']) / name
    run.mkdir(parents=True)
    save_json(run / 'config.json', cfg)
    save_json(run / 'splits.json', split_fingerprint(cfg))
    save_json(run / 'environment.json', {'precision': precision(cfg, resolve_device(cfg))})
    torch.manual_seed(0)
    nets = ({'model_vae.pt': models.build_vqvae(model_config(cfg)),
             'model_solver.pt': models.build_solver(model_config(cfg))} if two_stage
            else {'model.pt': build_model(cfg)})
    for file, net in nets.items():
        torch.save({'model': net.state_dict(), 'config': cfg, 'epoch': 1}, run / file)
    return run


# The loss terms (and perplexities) a run logs per base_type, regularization on:
# 1 no reconstruction, VQ or mask term; 2 no mask term; 3 no reconstruction or VQ term.
VQ_VAE_TERMS = {'recon_error1', 'recon_error2', 'vq_loss', 'perplexity1', 'perplexity2'}
LOGGED_TERMS = {0: {'loss', 'class_error', 'mask_regularization', *VQ_VAE_TERMS},
                1: {'loss', 'class_error'}, 2: {'loss', 'class_error', *VQ_VAE_TERMS},
                3: {'loss', 'class_error', 'mask_regularization'}, 4: {'loss', 'class_error'}}


def check_ablation_run(run_dir, test, eval_args):
    """A finished main.py run logged the terms of its base_type's ablation, and
    evaluating its timestamp again (eval_args: the machine settings) reproduces its
    test metrics."""
    base_type = json.loads((run_dir / 'config.json').read_text())['base_type']
    history = json.loads((run_dir / 'history.json').read_text())
    assert set(history['train']) == LOGGED_TERMS[base_type]
    assert set(history['val']) == LOGGED_TERMS[base_type] | {'accuracy', 'macro_f1'}
    again = main.main([*eval_args, f'--timestamp={run_dir.name}'])
    for key in ('accuracy', 'macro_f1', 'confusion_matrix', 'per_class_accuracy', 'mask'):
        assert again[key] == test[key], key
    for key in LOGGED_TERMS[base_type]:
        assert again[key] == pytest.approx(test[key], rel=1e-6), key
