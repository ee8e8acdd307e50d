"""One error style: a user's mistake is one line on stderr, exit status 1, nothing written."""
import os
import subprocess
import sys

import pytest

from cmvq import errors
from conftest import REPO


def run_script(cwd, script, *argv):
    """A top-level script by its path, a prepare/ or tools/ module with -m (from cwd, with
    the checkout on PYTHONPATH)."""
    command = [str(REPO / script)] if script.endswith('.py') else ['-m', script]
    return subprocess.run([sys.executable, *command, *argv], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, 'PYTHONPATH': str(REPO)})


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.fixture
def workspace(tmp_path):
    """A folder holding an empty CREMA-D root and a non-empty data_path."""
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'splits').mkdir()
    (tmp_path / 'splits' / 'train_videos.pkl').write_bytes(b'old')
    return tmp_path


@pytest.mark.parametrize('script, argv, message', [
    ('read_cremad.py', ['--root=empty', '--data_path=new'],
     "empty/SentenceFilenames.csv is missing: root='empty' must be a CREMA-D checkout (it is "
     'empty)'),
    ('read_cremad.py', ['--root=empty', '--data_path=splits'],
     "data_path='splits' already exists and is not empty; pass --overwrite=True"),
    ('read_cremad.py', ['--split_by=speaker'], "split_by='speaker' is not allowed"),
    ('main.py', ['--data_path=splits', '--timestamp=20000101-000000'],
     "run 'results/20000101-000000' does not exist; runs main.py can evaluate: none"),
    ('main_separate.py', ['--base_type=1'], 'base_type=1 has no two-stage form'),
    ('prepare.synth_cremad', ['--root=twin', '--nuisance=2.0'], 'nuisance=2.0 must be a number'),
])
def test_a_user_error_is_one_line_and_writes_nothing(workspace, script, argv, message):
    before = listing(workspace)
    proc = run_script(workspace, script, *argv)
    assert proc.returncode == 1
    assert proc.stdout == ''
    assert proc.stderr.count('\n') == 1, proc.stderr             # one line, no traceback
    name = script if script.endswith('.py') else script.split('.')[-1] + '.py'
    assert proc.stderr.startswith(f'{name}: ') and message in proc.stderr
    assert listing(workspace) == before
    assert (workspace / 'splits' / 'train_videos.pkl').read_bytes() == b'old'


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy():
        raise KeyError('bug')
    with pytest.raises(KeyError):
        errors.run_script(buggy)


def test_user_errors_keep_their_builtin_types():
    assert issubclass(errors.MissingError, FileNotFoundError)
    assert issubclass(errors.ExistsError, FileExistsError)
    assert issubclass(errors.BadValueError, ValueError)
    assert errors.one_line(errors.UserError('first\n  second\n')) == 'first; second'


def test_help_lists_every_setting_with_what_is_allowed(tmp_path):
    proc = run_script(tmp_path, 'main_separate.py', '--help')
    assert proc.returncode == 0 and proc.stderr == ''
    assert proc.stdout.startswith('Two-stage CM-VQVAE')
    lines = proc.stdout.splitlines()
    assert "  --mode='multimodal'                 'multimodal', 'image-only', 'audio-only'" in lines
    assert any(line.startswith('  --num_epoch_vae=None') and 'None: num_epoch' in line
               for line in lines)
    # a comment continued on the next header line is joined
    assert any('--base_type=0' in line and '4 two-ResNet18' in line for line in lines)
    assert listing(tmp_path) == []
