"""Training-set variances of a split config, used to normalise the reconstruction losses."""
import math
import pickle
from pathlib import Path

import numpy as np

from errors import BadValueError, MissingError

FILES = ('train_image_var.pkl', 'train_audio_var.pkl')


def read_variances(data_path, layer=None):
    """data_path (a split config folder) -> (image_var, audio_var) as floats.

    image_var: variance of the training clips' face-crop pixels in [0, 1];
    audio_var: variance of their log-mel values. Written by read_cremad.py. A
    feature folder (make_features.py) holds one audio variance per layer: ``layer``
    (1-based) picks one.
    A value that is not a finite number > 0 (it divides the reconstruction loss)
    raises BadValueError naming the file.
    """
    values = []
    for name in FILES:
        path = Path(data_path) / name
        if not path.is_file():
            raise MissingError(f'{path} does not exist: build the split config with '
                               f'read_cremad.py --data_path={data_path}')
        with open(path, 'rb') as f:
            try:
                value = pickle.load(f)
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise BadValueError(f'{path} cannot be read as a pickle: {e}') from None
        if isinstance(value, (list, tuple)):  # per layer
            if layer is None or not 1 <= layer <= len(value):
                raise BadValueError(f'{path} holds {len(value)} per-layer variances: give a '
                                    f'layer in 1..{len(value)}, not {layer!r}')
            value = value[layer - 1]
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                or not math.isfinite(value) or value <= 0):
            raise BadValueError(f'{path} holds {value!r}: a variance must be a finite number '
                                f'> 0; rebuild it with read_cremad.py --data_path={data_path}')
        values.append(float(value))
    return tuple(values)
