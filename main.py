"""CM-VQVAE: train, validate and test on CREMA-D, RML or EmoVoxCeleb; or evaluate a saved run.

    python3 main.py                              # the header below, as it is
    python3 main.py configs/demo.py              # a config file overrides the header
    python3 main.py --mode=audio-only --seed=1   # so do --key=value pairs
    python3 main.py --timestamp=20261121-101500  # evaluate results/20261121-101500
    python3 main.py --timestamp=20261121-101500 --robustness=True   # missing/noisy modalities
    python3 main.py --resume=20261121-101500     # continue an interrupted run
    python3 main.py --dataset=RML --data_path=data_rml_by_user --num_epoch=10
    python3 main.py --dataset=RML --pretrained=True --pretrained_timestamp=20261121-101500
    torchrun --nproc_per_node=2 main.py ...      # data-parallel over 2 processes/GPUs

A run writes results/<YYYYmmdd-HHMMSS>/ (README.md lists every file). The run itself
(preflight, epochs, test, outputs) is cmvq/experiment.py.
"""
import sys

from cmvq import configurator
from cmvq.errors import run_script

# ------------------------------------------------------------------------------------------
# config: edit here, or override with a config file / --key=value (values are type-checked)
message = 'CM-VQVAE on CREMA-D'  # recorded at the top of the log
timestamp = None            # None: train; 'YYYYmmdd-HHMMSS': evaluate results/<timestamp>
dataset = 'CREMA-D'         # 'CREMA-D', 'RML', 'EmoVoxCeleb', 'RML_feat'
pretrained = False          # RML only: start from a saved run's VQ-VAE modules
pretrained_timestamp = None  # pretrained=True: that run, 'YYYYmmdd-HHMMSS' in results_dir
reset_mask = False          # pretrained=True: reset the transferred mask to its initial value
mode = 'multimodal'         # 'multimodal', 'image-only', 'audio-only'
base_type = 0               # 0 proposed; 1 no reconstruction, no mask; 2 no mask;
#                             3 no reconstruction; 4 two-ResNet18 comparison model
data_path = 'data_cremad'   # split configs: read_cremad.py (data_cremad), prepare/read_rml.py
#                             (data_rml: by clip; data_rml_by_user: subjects held out)
media_root = None           # None: clip paths as stored in data_path; a CREMA-D (RML) folder:
#                             remap them onto it (e.g. the published run's split files)
balanced = False            # deprecated; True is an error
num_epoch = 50              # epochs (int > 0)
batch_size = 128            # the global batch (int > 0); torchrun: split over processes
shuffle = True              # shuffle the training loader (True, False)
learning_rate = 1e-3        # Adam learning rate (> 0)
num_hiddens = 128           # encoder/decoder width h (multiple of 4)
num_residual_hiddens = 32   # residual block bottleneck width r
num_residual_layers = 2     # residual blocks per stack (>= 0)
embedding_dim = 64          # codebook vector size D (multiple of 4)
num_embeddings = 512        # codebook size K
commitment_cost = 0.25      # beta of the VQ loss
decay = 0.99                # [0, 1): > 0 EMA codebook, 0 plain VQ
mask_scale = 1e-2           # initial mask magnitude (> 0)
mask_init = '1s'            # '1s' fills mask_scale; 'uniform' draws U(-mask_scale, mask_scale)
threshold_fn = 'binarizer'  # 'binarizer', 'ternarizer', 'attention', 'randomizer'
threshold = None            # None means 5e-3
regularization = True       # adds 1e-4 * sum(mask) to the loss (True, False)
recon_loss = 'mse'          # 'mse' (released code), 'mse/var' (divided by the training variance)
modify_modal = False        # RML only: add emotion-irrelevant skin colour / pitch per item
audio_geometry = None       # RML only: None ('RML', or the pretrained source's), 'RML', 'CREMA-D'
subsample = None            # EmoVoxCeleb only: None, or N: keep every ceil(len/N)-th item
layer = 7                   # RML_feat only: audio features of this transformer layer (1..24)
# additions to the paper's constants
seed = 0                    # drives initialisation, shuffles and frame draws (int >= 0)
device = 'auto'             # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
num_workers = 2             # DataLoader worker processes (0: load in the main process)
amp = 'auto'                # 'auto' (bf16 autocast on CUDA and on CPUs with native bf16),
#                             'bf16', 'off'
channels_last = 'auto'      # 'auto' (on: measured faster on CUDA and CPU), True, False
compile = False             # torch.compile the model (True, False); off with a message
#                             where the platform cannot compile
sync_bn = True              # torchrun: BatchNorm statistics of the global batch (True, False)
cache = True                # decode each clip once into cache_dir (True, False)
cache_dir = 'cache'         # decode-once cache folder (memory-mapped arrays)
data_on_gpu = 'auto'        # 'auto' (on with CUDA + cache when the arrays fit in half the
#                             free GPU memory), True (keep them on the GPU), False
frame_jitter = None         # training frame within +-frame_jitter of the centre frame;
#                             None: the dataset's (CREMA-D 15, RML 22)
results_dir = 'results'     # run folders go to results_dir/<timestamp>
tensorboard = False         # True: also log per-epoch scalars, the mask and reconstructions
#                             to results_dir/<run>/tb/ (tensorboard --logdir ...)
resume = None               # 'YYYYmmdd-HHMMSS': continue that interrupted training run from
#                             its last.pt (its own config; machine settings from here)
robustness = False          # with timestamp: test the saved run with a modality removed or
#                             corrupted, instead of the plain re-evaluation
allow_split_change = False  # evaluation: test anyway when data_path's test split changed
#                             since the run trained (the result then says so)
twin_actors = 0             # > 0: if data_path is missing, synthesize a twin of this many
#                             actors at twin_root and build its split configs (the demo)
twin_root = 'synth_cremad/CREMA-D'  # where that twin goes
# ------------------------------------------------------------------------------------------


def header():
    """This file's header constants (also the defaults of main_separate.py)."""
    return {k: globals()[k] for k in configurator.config_keys(globals())}


def main(argv=None):
    """Train, resume or evaluate as the header and argv say; returns the test metrics."""
    argv = sys.argv[1:] if argv is None else argv
    configurator.answer_help(header(), argv)  # before the library (torch) loads: instant
    from cmvq import distributed, experiment
    try:
        return experiment.main(header(), argv)
    finally:
        distributed.close()


if __name__ == '__main__':
    run_script(main)
