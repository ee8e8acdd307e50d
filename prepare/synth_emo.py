"""Synthetic EmoVoxCeleb twin: face tracks, voices and a teacher's logits per frame.

    python3 -m prepare.synth_emo              # 24 speakers x 8 tracks in synth_emo/
    python3 -m prepare.synth_emo --num_speakers=6 --tracks_per_speaker=4 --root=/tmp/emo

What the twin holds and how it is rendered: cmvq/twins/emo.py.
"""
from cmvq.configurator import configure
from cmvq.errors import run_script
from cmvq.twins import emo as twin

# ----------------------------------------------------------------------------- config
root = 'synth_emo/EmoVoxCeleb'  # output folder (must be empty, missing, or a twin made here)
num_speakers = 24               # 3..1251: speakers id10001..
tracks_per_speaker = 8          # face tracks (utterances) per speaker
seed = 0                        # any int >= 0
workers = 0                     # processes; 0: all cores
nuisance = 0.5                  # 0..1 strength of emotion-irrelevant variation
duration_scale = 1.0            # 1.0: 2.5-4 s utterances; tests use less
# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(globals(), argv)
    twin.generate(**cfg)  # the header's keys are generate's keywords


if __name__ == '__main__':
    run_script(main)
