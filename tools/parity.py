"""Trainable parameters of every model at main.py's widths (the paper's).

    python3 -m tools.parity

docs/parity.md compares these counts with the released code's.
"""
import sys

import main
import model as models
from cmvq.config import model_config
from cmvq.configurator import answer_help
from cmvq.errors import run_script

# variant name -> its settings other than main.py's header
VARIANTS = {'Model decay=0': {'decay': 0.0}, 'Model decay=0.99': {},
            'Model image-only decay=0': {'decay': 0.0, 'mode': 'image-only'},
            'Model audio-only decay=0': {'decay': 0.0, 'mode': 'audio-only'},
            'base_type 1': {'base_type': 1},
            'base_type 2 decay=0': {'base_type': 2, 'decay': 0.0},
            'base_type 3': {'base_type': 3}, 'base_type 4': {'base_type': 4}}


def parity_counts():
    """{variant: trainable parameters} at main.py's header widths."""
    paper = model_config(main.header())
    return {name: models.count_parameters(models.build_model({**paper, **change}))
            for name, change in VARIANTS.items()}


def run(argv=None):
    answer_help({}, sys.argv[1:] if argv is None else argv)
    counts = parity_counts()
    for name, count in counts.items():
        print(f'{name:26s} {count:,}')
    return counts


if __name__ == '__main__':
    run_script(run)
