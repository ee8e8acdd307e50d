"""Shared fixtures: tiny synthetic CREMA-D and RML twins, made once per test session."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

import main  # noqa: E402 - after the checkout is on sys.path
from cmvq.config import TOOL_KEYS, model_config  # noqa: E402

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
