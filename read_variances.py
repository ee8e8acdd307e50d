"""Training-set variances of a split config, used to normalise the reconstruction losses."""
import pickle
from pathlib import Path

from errors import MissingError

FILES = ('train_image_var.pkl', 'train_audio_var.pkl')


def read_variances(data_path):
    """data_path (a split config folder) -> (image_var, audio_var) as floats.

    image_var: variance of the training clips' face-crop pixels in [0, 1];
    audio_var: variance of their log-mel values. Written by read_cremad.py.
    """
    values = []
    for name in FILES:
        path = Path(data_path) / name
        if not path.is_file():
            raise MissingError(f'{path} does not exist: build the split config with '
                               f'read_cremad.py --data_path={data_path}')
        with open(path, 'rb') as f:
            values.append(float(pickle.load(f)))
    return tuple(values)
