"""Training-set variances of a split config, used to normalise the reconstruction losses.

    python3 read_variances.py --data_path=data_cremad      # prints both variances

The split builders write train_image_var.pkl (the variance of the training clips'
face-crop pixels in [0, 1]) and train_audio_var.pkl (of their log-mel values).
recon_loss='mse/var' divides each reconstruction term by its variance; the
released loss ('mse') reads them but leaves the division out.
"""
import math
from pathlib import Path

import numpy as np

from cmvq import pickles
from cmvq.configurator import configure
from cmvq.errors import BadValueError, MissingError, run_script

# ----------------------------------------------------------------------------- config
data_path = 'data_cremad'       # split config folder (read_cremad.py) or feature folder
layer = None                    # feature folders (RML_feat): the audio layer, 1-based
# -----------------------------------------------------------------------------
FILES = ('train_image_var.pkl', 'train_audio_var.pkl')


def read_variances(data_path, layer=None, builder='read_cremad.py'):
    """data_path (a split config folder) -> (image_var, audio_var) as floats.

    A feature folder (prepare/make_features.py) holds one audio variance per layer:
    ``layer`` (1-based) picks one. A value that is not a finite number > 0 (it
    divides the reconstruction loss) raises BadValueError naming the file and what
    rebuilds it (builder: the command that wrote data_path).
    """
    values = []
    for name in FILES:
        path = Path(data_path) / name
        if not path.is_file():
            raise MissingError(f'{path} does not exist: build the split config with '
                               f'{builder} --data_path={data_path}')
        value = pickles.read(path)
        if isinstance(value, (list, tuple)):  # per layer
            if layer is None or not 1 <= layer <= len(value):
                raise BadValueError(f'{path} holds {len(value)} per-layer variances: give a '
                                    f'layer in 1..{len(value)}, not {layer!r}')
            value = value[layer - 1]
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                or not math.isfinite(value) or value <= 0):
            raise BadValueError(f'{path} holds {value!r}: a variance must be a finite number '
                                f'> 0; rebuild it with {builder} --data_path={data_path}')
        values.append(float(value))
    return tuple(values)


def main(argv=None):
    cfg = configure(globals(), argv, choices={'layer': _layer})
    image_var, audio_var = read_variances(cfg['data_path'], cfg['layer'])
    print(f'{cfg["data_path"]}: train image variance {image_var:.6g}, '
          f'audio variance {audio_var:.6g}')
    return image_var, audio_var


def _layer(v):
    """None or an int >= 1"""
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


if __name__ == '__main__':
    run_script(main)
