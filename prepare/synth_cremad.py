"""Synthetic CREMA-D twin: the same tree, formats and names, with known factors.

    python3 -m prepare.synth_cremad           # 91 actors x 82 clips in synth_cremad/CREMA-D
    python3 -m prepare.synth_cremad --num_actors=4 --workers=2 --root=/tmp/twin
    python3 -m prepare.synth_cremad --like=../shared/crema-d   # the clips of a real listing

What the twin holds and how it is rendered: cmvq/twins/cremad.py.
"""

from cmvq.configurator import configure
from cmvq.errors import run_script
from cmvq.pools import available_cores
from cmvq.twins import cremad as twin

# ----------------------------------------------------------------------------- config
root = 'synth_cremad/CREMA-D'   # output folder (must be empty, missing, or a twin made here)
num_actors = 91                 # 1..91: actors 1001..(1000 + num_actors)
seed = 0                        # any int >= 0
like = None                     # None, or a CREMA-D checkout / folder holding its two CSVs
workers = 0                     # processes; 0: all cores
nuisance = 0.5                  # 0..1 strength of emotion-irrelevant variation
sentences = 'all'               # 'all' or comma list of codes, e.g. 'DFA,IEO'
duration_scale = 1.0            # 1.0: CREMA-D-like 2-3 s clips; tests use 0.5
measure = False                 # True: then print linear-probe accuracies (image/audio/joint)
# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(globals(), argv)
    measure = cfg.pop('measure')
    twin.generate(**cfg)  # the header's keys are generate's keywords
    if measure:
        features = twin.probe_features(cfg['root'], cfg['workers'] or available_cores())
        for split in ('clip', 'actor'):
            scores = twin.learnability(cfg['root'], split=split, features=features)
            print(f'learnability (split by {split}): ' + ', '.join(
                f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}'
                for k, v in scores.items()))


if __name__ == '__main__':
    run_script(main)
