"""Nothing executed: a crafted split file, variance, label list or checkpoint is refused
in one line naming it, and the code it carries never runs (its marker file is never made)."""
import pickle
import shutil

import numpy as np
import pytest
import torch

import datasets
import main
from cmvq import pickles
from cmvq.errors import UserError
from cmvq.runs import read_checkpoint
from conftest import REPO, SHARED, fake_run


class Payload:
    """Unpickling this calls exec, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").close()',)


def craft(path, marker, protocol=pickle.DEFAULT_PROTOCOL):
    """A pickle at path whose loading (by plain pickle.load) would create marker."""
    path.write_bytes(pickle.dumps([Payload(marker)], protocol=protocol))


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """The test's own check: what the project refuses would have run."""
    craft(tmp_path / 'x.pkl', tmp_path / 'marker')
    pickle.loads((tmp_path / 'x.pkl').read_bytes())
    assert (tmp_path / 'marker').exists()


@pytest.mark.parametrize('name', ['train_videos.pkl', 'train_labels.pkl', 'train_image_var.pkl'])
def test_a_crafted_split_file_runs_nothing_and_stops_main(tiny_splits, tmp_path, name):
    argv = tiny_splits(tmp_path / 'results')
    data = tmp_path / 'data'
    shutil.copytree(argv[0].split('=', 1)[1], data)
    craft(data / name, tmp_path / 'marker')
    with pytest.raises(UserError, match=f'{name} cannot be read as a pickle: it would call '
                                        'builtins.exec while loading') as error:
        main.main([*argv, f'--data_path={data}'])
    assert '\n' not in str(error.value)
    assert not (tmp_path / 'marker').exists() and not (tmp_path / 'results').exists()


@pytest.mark.parametrize('protocol', [0, 2, 4, 5])
def test_every_reader_refuses_at_any_protocol(tmp_path, protocol):
    """EmoVoxCeleb index and label lists, RML_feat labels, make_features' split reader:
    all through pickles.read."""
    from prepare import make_features
    marker = tmp_path / 'marker'
    for kind in datasets.EMO_SPLIT_FILES:
        (tmp_path / f'train_{kind}.pkl').write_bytes(pickle.dumps([], protocol=protocol))
    craft(tmp_path / 'train_index.pkl', marker, protocol)
    with pytest.raises(UserError, match='train_index.pkl cannot be read'):
        datasets.load_emo_split(tmp_path, 'train')
    (tmp_path / 'train_videos.pkl').write_bytes(pickle.dumps(['s1/ha1.avi'], protocol=protocol))
    craft(tmp_path / 'train_labels.pkl', marker, protocol)
    with pytest.raises(UserError, match='train_labels.pkl cannot be read'):
        make_features.load_clips(tmp_path, 'train', 'RML')
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [0, 2, 4, 5])
def test_plain_data_and_numpy_arrays_still_load(tmp_path, protocol):
    """What the released formats hold: containers, scalars, numpy scalars and arrays
    (EmoVoxCeleb's per-video logits), sets and bytes."""
    value = [np.arange(16, dtype=np.float32).reshape(2, 8), np.float64(0.25), np.int64(3),
             {'a': (1, 2.5, None, True)}, {1, 2}, frozenset('x'), b'\x00\xff', 's1/ha1.avi']
    (tmp_path / 'x.pkl').write_bytes(pickle.dumps(value, protocol=protocol))
    assert repr(pickles.read(tmp_path / 'x.pkl')) == repr(value)


def test_the_published_split_files_still_load():
    for path in sorted((SHARED / 'cm-vqvae-split').glob('*.pkl')):
        assert pickles.read(path) == pickle.loads(path.read_bytes()), path


def test_a_crafted_checkpoint_runs_nothing(tiny_splits, tmp_path):
    """model.pt on --timestamp, last.pt on --resume: weights_only refuses the payload."""
    argv = tiny_splits(tmp_path / 'results')
    run = fake_run(argv)
    marker = tmp_path / 'marker'
    state = torch.load(run / 'model.pt')
    torch.save({**state, 'extra': Payload(marker)}, run / 'last.pt')
    with pytest.raises(UserError, match=r'last.pt holds exec, not only tensors'):
        read_checkpoint(run / 'last.pt')
    with pytest.raises(UserError, match='last.pt holds exec'):
        main.main([*argv, f'--resume={run.name}'])
    torch.save({**state, 'extra': Payload(marker)}, run / 'model.pt')
    with pytest.raises(UserError, match='model.pt holds exec'):
        main.main([*argv, f'--timestamp={run.name}'])
    assert not marker.exists()
    assert not (run / 'log.txt').exists()


def test_every_torch_load_reads_weights_only():
    """The project's source passes weights_only=True to every torch.load (an explicit
    False would bring back code execution)."""
    import re
    calls = []
    for path in REPO.rglob('*.py'):
        if 'tests' in path.parts:
            continue
        calls += [(path.name, m) for m in re.findall(r'torch\.load\(([^()]*(?:\([^()]*\))?)\)',
                                                     path.read_text())]
    assert calls and all('weights_only=True' in args for _, args in calls), calls


def test_readme_says_a_config_file_is_code():
    readme = ' '.join((REPO / 'README.md').read_text().split())
    assert 'A config file is Python code run by the scripts: run only your own.' in readme
