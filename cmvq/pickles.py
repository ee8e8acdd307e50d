"""Reading the released code's pickle files: split configs, variances, label lists.

The released code stores its split configs as pickles ({split}_videos.pkl,
{split}_labels.pkl, train_*_var.pkl, ...). Every pickle the project reads goes
through read() here, so a damaged or foreign file is one line naming it.
"""
import functools
import pickle
from pathlib import Path

import numpy as np

from cmvq.atomic import file_key
from cmvq.errors import BadValueError, MissingError


def read(path):
    """The object pickled in path; BadValueError naming the file if it is not a pickle.
    Read once per process for a given path, size and mtime (a run start asks for each
    split file several times); callers must not modify the object."""
    return _read(*file_key(path))


@functools.lru_cache(maxsize=64)
def _read(path, *stat):
    try:
        with open(path, 'rb') as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            IndexError, TypeError) as e:
        raise BadValueError(f'{path} cannot be read as a pickle: {e}') from None


def load_split_files(data_path, split, builder='read_cremad.py', flat=False):
    """(paths, labels) of a split config as stored; a missing file names its builder.

    Raises BadValueError naming the file for contents of the wrong type (paths:
    a list of str; labels: a list of lists of ints, or with flat=True one list of
    ints, as RML's one emotion list)."""
    files = [Path(data_path) / f'{split}_{kind}.pkl' for kind in ('videos', 'labels')]
    for f in files:
        if not f.is_file():
            raise MissingError(f'split config file {f} does not exist: build '
                               f'{data_path} with {builder} --data_path={data_path}')
    paths, labels = (read(f) for f in files)
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise BadValueError(f'{files[0]} holds {_kind(paths)}, expected a list of clip paths '
                            '(str)')
    lists = [labels] if flat else labels
    if (not isinstance(labels, (list, tuple)) or
            not all(isinstance(x, (list, tuple, np.ndarray)) for x in lists) or
            not all(is_int(v) for x in lists for v in x)):
        raise BadValueError(f'{files[1]} holds {_kind(labels)}, expected a list of '
                            + ('ints (one label per clip)' if flat else 'label lists of ints'))
    return list(paths), labels


def _kind(value):
    inner = f' of {type(value[0]).__name__}' if isinstance(value, (list, tuple)) and value else ''
    return f'a {type(value).__name__}{inner}'


def is_int(value):
    """An int or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
