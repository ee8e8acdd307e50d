"""Shared fixtures: tiny synthetic CREMA-D twins, made once per test session."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

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
    import synth_cremad
    root = tmp_path_factory.mktemp('twin') / 'CREMA-D'
    synth_cremad.generate(root=root, workers=2, **TINY)
    return root
