"""Synthetic RML twin: RML's layout and formats, with known factors.

    python3 -m prepare.synth_rml                                  # 8 subjects x 6 x 15 = 720 clips
    python3 -m prepare.synth_rml --clips_per_emotion=4 --duration_scale=0.5 --root=/tmp/rml

What the twin holds and how it is rendered: cmvq/twins/rml.py.
"""
from cmvq.configurator import configure
from cmvq.errors import run_script
from cmvq.twins import rml as twin

# ----------------------------------------------------------------------------- config
root = 'synth_rml/RML'          # output folder (must be empty, missing, or a twin made here)
num_subjects = 8                # 1..8: subjects s1..s<num_subjects>
clips_per_emotion = 15          # clips per subject and emotion (RML: 15)
sentences_per_emotion = 10      # sentences per language and emotion (clip n: (n-1) % this)
seed = 0                        # any int >= 0
workers = 0                     # processes; 0: all cores
nuisance = 0.5                  # 0..1 strength of emotion-irrelevant variation
duration_scale = 1.0            # 1.0: RML-like 3-6 s clips; tests use less
# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(globals(), argv)
    twin.generate(**cfg)  # the header's keys are generate's keywords


if __name__ == '__main__':
    run_script(main)
