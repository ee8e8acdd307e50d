"""Shared fixtures: tiny synthetic CREMA-D and RML twins, made once per test session."""
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
# The paper's layout at toy widths: the inputs keep their real sizes, the convs get cheap.
TINY_MODEL = {**PAPER, 'num_hiddens': 8, 'num_residual_hiddens': 4, 'embedding_dim': 8,
              'num_embeddings': 16}

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
