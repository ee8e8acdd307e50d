"""Reading the released code's pickle files: split configs, variances, label lists.

The released code stores its split configs as pickles ({split}_videos.pkl,
{split}_labels.pkl, train_*_var.pkl, ...). Every pickle the project reads goes
through read() here, so a damaged or foreign file is one line naming it.

A pickle can name any callable and have it called while loading: a crafted split
file would run code on the first main.py. read() therefore unpickles with an
allow-list (SafeUnpickler): the builtin containers and scalars, and the numpy
callables that rebuild arrays, scalars and dtypes (EmoVoxCeleb label lists hold
arrays, the released variances are numpy scalars), none of which runs code.
Anything else is refused before it is called.
"""
import builtins
import codecs
import functools
import importlib
import pickle
from pathlib import Path

import numpy as np

from cmvq.atomic import file_key
from cmvq.errors import BadValueError, MissingError

# Builtins that pickles of plain data name (sets, bytes under protocols < 3).
_BUILTINS = ('set', 'frozenset', 'bytes', 'bytearray', 'complex')
# numpy's reconstruction callables (with numpy.dtype and numpy.ndarray): an empty
# ndarray filled by its __setstate__, a scalar from its dtype and bytes, an array from
# a protocol-5 buffer.
_NUMPY = {('multiarray', '_reconstruct'), ('multiarray', 'scalar'), ('numeric', '_frombuffer')}


def _latin1_encode(text, encoding):
    """_codecs.encode as protocols < 3 use it for bytes: latin-1 only."""
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'_codecs.encode with {encoding!r} is not allowed')
    return codecs.encode(text, 'latin1')


def _numpy_core(module, name):
    """numpy._core.<module>.<name> (numpy >= 1.26; numpy.core is its deprecated alias)."""
    return getattr(importlib.import_module(f'numpy._core.{module}'), name)


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the allow-listed globals (module docstring)."""

    def find_class(self, module, name):
        if module in ('builtins', '__builtin__') and name in _BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ('_codecs', 'encode'):
            return _latin1_encode
        if module == 'numpy' and name in ('dtype', 'ndarray'):
            return getattr(np, name)
        for prefix in ('numpy.core.', 'numpy._core.'):
            if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY:
                return _numpy_core(module[len(prefix):], name)
        raise pickle.UnpicklingError(f'it would call {module}.{name} while loading (refused: '
                                     'only plain data and numpy arrays are loaded)')


def read(path):
    """The object pickled in path; BadValueError naming the file if it is not a pickle
    of plain data (SafeUnpickler). Read once per process for a given path, size and
    mtime (a run start asks for each split file several times); callers must not
    modify the object."""
    return _read(*file_key(path))


@functools.lru_cache(maxsize=64)
def _read(path, *stat):
    try:
        with open(path, 'rb') as f:
            return SafeUnpickler(f, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            IndexError, TypeError, KeyError, MemoryError) as e:
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
