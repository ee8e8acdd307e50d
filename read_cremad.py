"""Build CREMA-D split configs: a CREMA-D tree -> data_path/.

    python3 read_cremad.py --root=/data/CREMA-D --data_path=data_cremad   # a real copy
    python3 read_cremad.py [--seed=0] [--split_by=actor] ...              # the twin below
    python3 read_cremad.py --root=/data/CREMA-D --split_by=ogm-ge --data_path=data_cremad_ogm

Writes, for split in train / val / test:
    {split}_videos.pkl  list of FLV paths, 'root/VideoFlash/NAME.flv' with root as
                        given: a relative root gives paths relative to the current
                        directory (like the released code; run from the checkout), an
                        absolute root gives absolute paths. main.py's media_root
                        remaps them onto another copy.
    {split}_labels.pkl  the 8 label lists of datasets.LABEL_NAMES, aligned with the paths
    {split}_stats.txt   class counts per label
and train_image_var.pkl / train_audio_var.pkl (floats: variance of the training
clips' evaluation face crops in [0, 1] and of their log-mels) and split.json
(seed, split_by, sizes, root, dropped clips).

The clip list is the tree's SentenceFilenames.csv. Clips are split first (so the
published sizes 5954 / 744 / 744 of all 7,442 names hold for any seed), then the
faulty clips, clips with no FLV and clips that fail their checks are dropped from
both paths and labels and named. Every clip is decoded once, into the decode-once
cache that training then reuses.

split_by='ogm-ge' is the split most papers on CREMA-D test on: OGM-GE's published
lists (lists/ogm-ge/). Test = their test list (744 clips); validation = a seeded
sample of their train list (6,698 clips), stratified by emotion, split_sizes[1] of
every split_sizes[0] + split_sizes[1] (744); train = the rest. OGM-GE had no
validation list; here the model is selected on validation, never on test. A twin of
a few actors holds part of the lists: the builder says how much of each.
"""
import datasets
from cmvq import cremad
from cmvq.cache import DEFAULT_WORKERS
from cmvq.configurator import configure
from cmvq.errors import run_script
from cmvq.splits import PAPER_SIZES, print_record

# ----------------------------------------------------------------------------- config
root = 'synth_cremad/CREMA-D'   # CREMA-D checkout (VideoFlash/, CSVs); default: the twin
data_path = 'data_cremad'       # output folder of the split configs
seed = 0                        # split seed
split_by = 'clip'               # 'clip' (the paper: actors overlap), 'actor' (disjoint
#                                 actors) or 'ogm-ge' (OGM-GE's lists: the field's test set)
split_sizes = PAPER_SIZES       # train, val, test of 7,442 clips; scaled for other counts
#                                 (ogm-ge: only val : train counts, the test list is fixed)
faulty = cremad.FAULTY          # clips dropped: the released code's list of faulty clips
overwrite = False               # True: replace an existing data_path (swapped as a whole)
workers = DEFAULT_WORKERS       # processes decoding clips
cache = True                    # decode through the decode-once cache (reused by training)
cache_dir = 'cache'             # where that cache lives
frame_jitter = datasets.CREMAD_JITTER  # training frame window of the cache: centre +- jitter
backend = 'pyav'                # FLV reader: 'pyav' or 'moviepy' (the released code's)
progress = True                 # progress bars (plain lines when output is redirected)
# -----------------------------------------------------------------------------
CHOICES = {'split_by': ('clip', 'actor', 'ogm-ge'), 'backend': ('pyav', 'moviepy')}


def main(argv=None):
    cfg = configure(globals(), argv, choices=CHOICES)
    record = cremad.build_splits(
        cfg['root'], cfg['data_path'], seed=cfg['seed'], split_by=cfg['split_by'],
        sizes=tuple(cfg['split_sizes']), faulty=tuple(cfg['faulty']), overwrite=cfg['overwrite'],
        workers=cfg['workers'], cache=cfg['cache'], cache_dir=cfg['cache_dir'],
        frame_jitter=cfg['frame_jitter'], backend=cfg['backend'], progress=cfg['progress'])
    print_record(record, cfg['data_path'], cremad.describe_lists(record))
    return record


if __name__ == '__main__':
    run_script(main)
