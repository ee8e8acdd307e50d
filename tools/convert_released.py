"""Turn a run folder of the released CM-VQVAE code into a run folder of this project.

    python3 -m tools.convert_released --src=path/to/results/20230315-015820
    python3 main.py --timestamp=20230315-015820     # then evaluate it here

The released main.py leaves in results/<timestamp>/ a bare model.state_dict() as
model.pt (its module names: _encoder_image._conv_1.weight, ...) and a log.txt whose
CONFIG block lists the constants of the run. This reads both, builds the matching
project model from that config, loads the weights with cmvq.released (an
unknown or missing key stops with its name), and writes results_dir/<timestamp>/
with config.json, model.pt and log.txt, as main.py would have. Nothing is written
unless every check passes.

Older released logs (like the published run's) have no 'Mode' or 'Baseline' line:
give them as --mode=... --base_type=... then.
"""
import json
import time
from pathlib import Path

import torch

import main
from cmvq import atomic
from cmvq.config import CHOICES, DATASET_ALIASES, TIMESTAMP_FORMAT, build_model, check_config
from cmvq.configurator import check_value, configure, parse_value
from cmvq.errors import BadValueError, ExistsError, MissingError, run_script
from cmvq.released import load_released
from cmvq.runs import save_json, save_torch

# ------------------------------------------------------------------------------------------
# config: edit here, or override with --key=value
src = ''                    # the released run folder (model.pt + log.txt)
results_dir = 'results'     # the converted run goes to results_dir/<src's name>
data_path = None            # None: the log's 'Data path'; else the split configs to evaluate on
mode = None                 # None: the log's 'Mode' (older logs have none: then give it)
base_type = None            # None: the log's 'Baseline' (older logs have none: then give it)
# ------------------------------------------------------------------------------------------

# Labels of the released log's CONFIG block -> header constants of main.py.
CONFIG_LABELS = {
    'Dataset': 'dataset', 'Pretrained': 'pretrained', 'Mode': 'mode', 'Baseline': 'base_type',
    'Data path': 'data_path', 'Balanced': 'balanced', 'Num epoch': 'num_epoch',
    'Batch size': 'batch_size', 'Learning rate': 'learning_rate',
    'Num hiddens': 'num_hiddens', 'Num residual hiddens': 'num_residual_hiddens',
    'Num residual layers': 'num_residual_layers', 'Embedding dimension': 'embedding_dim',
    'Num embeddings': 'num_embeddings', 'Commitment cost': 'commitment_cost',
    'Decay': 'decay', 'Mask init': 'mask_init', 'Mask scale': 'mask_scale',
    'Threshold function': 'threshold_fn', 'Threshold': 'threshold',
    'Regularization': 'regularization',
}
# What the model needs from the log (or the command line, for mode and base_type).
REQUIRED = ('dataset', 'mode', 'base_type', 'num_hiddens', 'num_residual_hiddens',
            'num_residual_layers', 'embedding_dim', 'num_embeddings', 'commitment_cost',
            'decay', 'mask_init', 'mask_scale', 'threshold_fn', 'threshold')


def parse_log(text):
    """(message, saved epoch or None, {constant: value}) from a released log.txt."""
    lines = text.splitlines()
    if 'CONFIG:' not in lines:
        raise BadValueError("log.txt has no 'CONFIG:' block: not a released run's log")
    values = {}
    for line in lines[lines.index('CONFIG:') + 1:]:
        if not line.startswith('- '):
            break
        label, sep, value = line[2:].partition(': ')
        if not sep or label not in CONFIG_LABELS:
            raise BadValueError(f'log.txt CONFIG has an unknown line {line!r}; known labels: '
                                f'{", ".join(CONFIG_LABELS)}')
        values[CONFIG_LABELS[label]] = parse_value(value.strip())
    epoch = next((int(line.split()[-1].rstrip(':')) for line in lines
                  if line.startswith('Model saved in epoch')), None)
    return lines[0].strip(), epoch, values


def released_config(values, overrides):
    """main.py's header with the log's values (type-checked) and the given overrides."""
    defaults = main.header()
    cfg = {**defaults, 'recon_loss': 'mse', 'timestamp': None}  # the released loss
    for key, value in {**values, **{k: v for k, v in overrides.items() if v is not None}}.items():
        cfg[key] = check_value(key, value, defaults[key], CHOICES)
    cfg['dataset'] = DATASET_ALIASES.get(cfg['dataset'], cfg['dataset'])
    missing = [k for k in REQUIRED if k not in values and overrides.get(k) is None]
    if missing:
        raise BadValueError(f"log.txt CONFIG lacks {', '.join(missing)} (older released logs "
                            f"do): give {' '.join(f'--{k}=...' for k in missing)}")
    check_config(cfg)
    return cfg


def convert(src, results_dir='results', **overrides):
    """Check everything, then write results_dir/<src name>/; returns that folder."""
    src = Path(src)
    for name in ('model.pt', 'log.txt'):
        if not (src / name).is_file():
            raise MissingError(f'{src / name} does not exist: --src must be a released run '
                               f'folder (model.pt + log.txt)')
    message, epoch, values = parse_log((src / 'log.txt').read_text())
    cfg = released_config(values, overrides)
    state = torch.load(src / 'model.pt', map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or 'model' in state:
        raise BadValueError(f"{src / 'model.pt'} is not a released bare state_dict")
    net = load_released(build_model(cfg), state)
    timestamp = src.name if _is_timestamp(src.name) else time.strftime(TIMESTAMP_FORMAT)
    run_dir = Path(results_dir) / timestamp
    if run_dir.exists():
        raise ExistsError(f'{run_dir} exists; choose another --results_dir')
    cfg['message'] = f'{message} (converted from the released run {src})'
    run_dir.mkdir(parents=True)
    save_json(run_dir / 'config.json', cfg)
    save_torch(run_dir / 'model.pt', {'model': net.state_dict(), 'config': cfg,
                                         'epoch': epoch, 'val_class_error': None})
    log = (f'[0001] Message: {cfg["message"]}\n[0002] Converted: {len(state)} tensors of '
           f'{src / "model.pt"} into {type(net).__name__}, saved epoch {epoch}; config from '
           f'its log.txt: {json.dumps(cfg)}\n')
    atomic.write_bytes(run_dir / 'log.txt', log.encode())
    return run_dir


def _is_timestamp(name):
    try:
        time.strptime(name, TIMESTAMP_FORMAT)
        return True
    except ValueError:
        return False


def run(argv=None):
    cfg = configure(globals(), argv)
    if not cfg['src']:
        raise BadValueError('give the released run folder: --src=path/to/results/<timestamp>')
    run_dir = convert(cfg['src'], cfg['results_dir'], data_path=cfg['data_path'],
                      mode=cfg['mode'], base_type=cfg['base_type'])
    print(f'Wrote {run_dir}; evaluate it with: python3 main.py '
          f"--results_dir={cfg['results_dir']} --timestamp={run_dir.name}")
    return run_dir


if __name__ == '__main__':
    run_script(run)
