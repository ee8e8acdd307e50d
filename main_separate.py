"""Two-stage CM-VQVAE: train the VQ-VAEs, then the TaskSolver on their frozen codes.

    python3 main_separate.py [config file] [--key=value ...]
    python3 main_separate.py configs/demo.py     # the demo, 12 + 12 epochs
    python3 main_separate.py --timestamp=20261121-101500   # evaluate a two-stage run
    torchrun --nproc_per_node=2 main_separate.py ...       # data-parallel, as main.py

Stage 1 trains both VQ-VAEs on reconstruction alone (best by validation loss,
results/<timestamp>/model_vae.pt); stage 2 freezes them and trains the masked
TaskSolver on their quantized maps (best by validation classification loss,
model_solver.pt); then the test as in main.py. Every constant of main.py's header
applies (base_type 0: masked solver, 2: unmasked); the two below are added and
default to num_epoch. `timestamp` evaluates a saved two-stage run (main.py
evaluates one-stage runs; each script names the other for the other's runs). The
run itself is cmvq/two_stage.py.
"""
import sys

import main
from cmvq import configurator
from cmvq.errors import run_script

# ------------------------------------------------------------------------------------------
# config: main.py's header, plus
num_epoch_vae = None        # stage 1 epochs: VQ-VAEs on reconstruction (None: num_epoch)
num_epoch_solver = None     # stage 2 epochs: TaskSolver on the frozen codes (None: num_epoch)
# ------------------------------------------------------------------------------------------


def header():
    """main.py's header and the two stage lengths."""
    return {**main.header(), 'num_epoch_vae': num_epoch_vae,
            'num_epoch_solver': num_epoch_solver}


def run(argv=None):
    """Train or evaluate a two-stage run as the headers and argv say; returns the test
    metrics."""
    argv = sys.argv[1:] if argv is None else argv
    configurator.answer_help(header(), argv)  # before the library (torch) loads
    from cmvq import distributed, two_stage
    try:
        return two_stage.main(header(), argv)
    finally:
        distributed.close()


if __name__ == '__main__':
    run_script(run)
