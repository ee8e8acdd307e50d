"""Run a grid of main.py settings over seeds and tabulate it with paired statistics.

    python3 -m tools.sweep configs/demo.py --base_type=0,1,2,3 --seed=0,1,2
    python3 -m tools.sweep configs/demo.py my_grid.py   # a list in a config file is an axis
    python3 -m tools.sweep configs/demo.py --amp=bf16,off --seed=0,1,2,3,4   # bf16 vs fp32
    python3 -m tools.sweep --summarize=sweeps/20261121-101500   # rebuild a sweep's tables
    python3 -m tools.sweep --summarize=20261121-101500,20261121-102233   # or of these runs

Every `--key=value` other than the sweep's own constants below is a main.py
constant; `--key=v1,v2,...` (or a list in a config file) makes it a grid axis. Each
combination is an ordinary main.py run in results_dir/<timestamp>/. A combination
that already has a finished run (a run folder with metrics.json whose config equals
the combination's, machine settings aside, trained on the splits data_path holds
now, in the precision this machine would use) is not run again; a run of it that
was stopped after an epoch (a killed sweep) is resumed from its last.pt: re-running
the same command resumes a sweep. Every combination is checked before any run starts.

When the runs are done the sweep writes sweep_dir/<YYYYmmdd-HHMMSS>/:
  runs.csv    one row per run: the varied settings (the precision computed in, 'bf16'
              autocast or 'fp32', counts as one), seed, test accuracy, macro-F1,
              mask ratios, best epoch, run folder
  table.md    per setting: mean +- sd over seeds and n; per comparison with the
  table.csv   reference (the proposed model, base_type 0, with the same other
              settings; fp32 where only the precision varies): the paired
              difference over the seeds both have, its 95% t-based CI, the paired
              t-test (scipy.stats.ttest_rel) and, from WILCOXON_MIN_N pairs on, the
              Wilcoxon signed-rank test
  sweep.png   accuracy and macro-F1 per setting, bars with sd error bars
"""
import csv
import io
import itertools
import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import numpy as np
import torch
from scipy import stats

import main
from cmvq import atomic, configurator, plots
from cmvq.config import RUNTIME_KEYS
from cmvq.errors import UserError, run_script
from cmvq.experiment import resolve_run
from cmvq.preflight import split_fingerprint
from cmvq.runs import new_run_dir
from cmvq.runtime import precision, resolve_device

# ------------------------------------------------------------------------------------------
# config: the sweep's own constants; any other --key is a main.py constant (see above)
summarize = None            # None: run the grid; a sweep folder, or comma-separated run
#                             folders / timestamps (in results_dir): only rebuild the tables
sweep_dir = 'sweeps'        # tables go to sweep_dir/<YYYYmmdd-HHMMSS>/
jobs = 0                    # 0: one run per GPU when several, else one at a time in this
#                             process; N > 0: N runs at a time, each in a subprocess
# ------------------------------------------------------------------------------------------

WILCOXON_MIN_N = 6          # below 6 pairs no two-sided Wilcoxon p can reach 0.05
METRICS = ('accuracy', 'macro_f1')
MASK_KEYS = ('private1', 'shared1', 'private2', 'shared2', 'complementarity')
# The reference of the paired comparisons: the proposed model where base_type varies,
# else fp32 (the released code's precision) where the precision varies.
REFERENCES = (('base_type', 0), ('precision', 'fp32'))


def _sweep_choices():
    def _jobs(v):
        """an int >= 0"""
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return {'jobs': _jobs}


# ----------------------------------------------------------------------------- the grid

def split_argv(argv, own_keys):
    """argv -> (the sweep's own overrides, main.py axes {key: [values]}).

    Config files contribute their assignments (a list is an axis); --key=v1,v2
    is an axis of the comma-separated values, each parsed as a Python literal.
    """
    own, axes = [], {}
    for arg in argv:
        if not arg.startswith('--'):
            for key, value in configurator.read_config_file(arg).items():
                axes[key] = list(value) if isinstance(value, list) else [value]
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            raise configurator.ConfigError(f'{arg!r}: overrides are written --key=value')
        if key in own_keys:
            own.append(arg)
        else:
            axes[key] = [configurator.parse_value(t) for t in text.split(',')]
    return own, axes


def combinations(axes):
    """Every combination of the axes, as a list of {key: value}, in axis order."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(axes[k] for k in keys))]


def run_argv(combo):
    """The main.py arguments of one combination (values written as Python literals)."""
    return [f'--{k}={v!r}' for k, v in combo.items()]


def resolve_all(combos):
    """Every combination's resolved config, or ConfigError naming the bad one."""
    cfgs = []
    for combo in combos:
        try:
            cfg = resolve_run(main.header(), run_argv(combo))
        except configurator.ConfigError as e:
            raise configurator.ConfigError(f'{e} (in combination {combo})') from None
        if cfg['timestamp']:
            raise configurator.ConfigError('a sweep trains: timestamp must be None')
        cfgs.append(cfg)
    return cfgs


# ----------------------------------------------------------------------------- runs

def comparable(cfg):
    """The settings that define a run's result (machine settings and message aside)."""
    keys = set(cfg) - set(RUNTIME_KEYS)
    return json.loads(json.dumps({k: cfg[k] for k in sorted(keys)}))


def identity(cfg, splits, used):
    """What makes two runs the same setting: the comparable config, the sha1 of each
    split of data_path (splits.json) and the precision computed in (bf16 autocast,
    channels_last; environment.json)."""
    return comparable(cfg), {s: v['sha1'] for s, v in (splits or {}).items()}, used


def wanted(cfg):
    """identity() of a run of cfg started now: data_path's splits as they are today and
    the precision this machine would use (splits None when data_path cannot be read)."""
    try:
        splits = split_fingerprint(cfg)
    except UserError:
        splits = None
    return identity(cfg, splits, precision(cfg, resolve_device(cfg)))


def saved_runs(results_dir):
    """{run folder: (identity, finished)} of the runs in results_dir, newest last;
    finished: the run wrote metrics.json."""
    runs = {}
    for path in sorted(Path(results_dir).glob('*/config.json')):
        run = path.parent
        try:
            runs[run] = (identity(*(json.loads((run / name).read_text()) for name in
                                    ('config.json', 'splits.json')),
                                  json.loads((run / 'environment.json').read_text())
                                  .get('precision')), (run / 'metrics.json').is_file())
        except (OSError, ValueError):
            continue  # not a run folder of this version (a run lacking splits.json...)
    return runs


def find_run(cfg, runs, finished=True):
    """The newest run of cfg's identity (finished, or stopped before finishing), or None."""
    want = wanted(cfg)
    matches = [path for path, (ident, done) in runs.items() if ident == want and
               done == finished]
    return max(matches, key=lambda p: p.name) if matches else None


def run_in_process(argv, device=None):
    main.main(argv)


def run_subprocess(argv, device=None):
    extra = [f'--device={device!r}'] if device else []
    subprocess.run([sys.executable, str(Path(main.__file__)), *argv, *extra], check=True)


def plan_grid(combos, cfgs):
    """[(combination, main.py arguments, cfg)] of the combinations without a finished
    run. A run of the combination that stopped after an epoch (last.pt, no
    metrics.json: a killed sweep) is resumed; one that stopped before is named and
    replaced by a new run."""
    todo = []
    for combo, cfg in zip(combos, cfgs, strict=True):
        runs = saved_runs(cfg['results_dir'])
        if find_run(cfg, runs) is not None:
            continue
        argv, stopped = run_argv(combo), find_run(cfg, runs, finished=False)
        if stopped is not None and (stopped / 'last.pt').is_file():
            print(f'sweep: {stopped} of {combo} stopped before it finished: resuming it')
            argv.append(f'--resume={stopped.name}')
        elif stopped is not None:
            print(f'sweep: {stopped} of {combo} stopped before its first epoch ended (no '
                  'last.pt): a new run replaces it')
        todo.append((combo, argv, cfg))
    return todo


def run_grid(combos, cfgs, jobs):
    """Run (or resume) each combination without a finished run; returns the failures'
    messages."""
    todo = plan_grid(combos, cfgs)
    print(f'sweep: {len(combos)} combinations, {len(combos) - len(todo)} already finished, '
          f'{len(todo)} to run')
    gpus = torch.cuda.device_count()
    parallel = jobs or (gpus if gpus > 1 else 0)
    runner = run_subprocess if parallel else run_in_process
    devices = Queue()
    for i in range(max(parallel, 1)):
        # one GPU per concurrent run where the device setting leaves the choice open
        devices.put(f'cuda:{i % gpus}' if gpus > 1 else None)

    def one(item):
        combo, argv, cfg = item
        device = devices.get()
        device = device if cfg['device'] in ('auto', 'cuda') else None
        try:
            runner(argv, device)
            return None
        except (Exception, SystemExit) as e:  # one failed run must not end the sweep
            if isinstance(e, SystemExit) and e.code == 128 + signal.SIGTERM:
                raise  # SIGTERM stopped the run (atomic.sigterm_raises): it stops the sweep
            return f'{combo}: {type(e).__name__}: {e}'
        finally:
            devices.put(device)
    if parallel:
        with ThreadPoolExecutor(parallel) as pool:
            failures = list(pool.map(one, todo))
    else:
        failures = [one(item) for item in todo]
    return [f for f in failures if f]


# ----------------------------------------------------------------------------- statistics

def describe(values):
    """mean, sample sd (ddof 1; nan for one value) and n."""
    values = np.asarray(values, float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else float('nan')
    return {'mean': float(values.mean()), 'sd': sd, 'n': len(values)}


def paired(values, reference, level=0.95):
    """Paired comparison of two equally long lists (pairs = same seed).

    diff = mean(values - reference) with its t-based `level` CI, the paired
    t-test and, with at least WILCOXON_MIN_N pairs, the Wilcoxon signed-rank test.
    """
    d = np.asarray(values, float) - np.asarray(reference, float)
    n = len(d)
    out = {'n': n, 'diff': float(d.mean()), 'ci_low': float('nan'), 'ci_high': float('nan'),
           'p_ttest': float('nan'), 'p_wilcoxon': float('nan')}
    if n > 1:
        half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
        out['ci_low'], out['ci_high'] = out['diff'] - half, out['diff'] + half
        if d.std() > 0:
            out['p_ttest'] = float(stats.ttest_rel(values, reference).pvalue)
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        out['p_wilcoxon'] = float(stats.wilcoxon(values, reference).pvalue)
    return out


# ----------------------------------------------------------------------------- tables

def run_row(run_dir):
    """One runs.csv row from a finished run folder: its config, the precision it computed
    in ('bf16' autocast or 'fp32', from environment.json) and its test metrics."""
    cfg = json.loads((run_dir / 'config.json').read_text())
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    used = json.loads((run_dir / 'environment.json').read_text()).get('precision')
    if used is None:  # a run from before environment.json recorded it: as resolved here
        used = precision(cfg, resolve_device(cfg))
    test = metrics['test']
    mask = test.get('mask') or {}
    return {'config': {**comparable(cfg), 'precision': 'bf16' if used['bf16_autocast']
                       else 'fp32'}, 'seed': cfg['seed'], 'run': str(run_dir),
            'accuracy': test['accuracy'], 'macro_f1': test['macro_f1'],
            **{k: mask.get(k) for k in MASK_KEYS}, 'best_epoch': metrics.get('best_epoch')}


def varied_keys(rows):
    """The settings that differ between rows, seed aside, in a stable order."""
    keys = sorted({k for r in rows for k in r['config']} - {'seed'})
    return [k for k in keys if len({json.dumps(r['config'].get(k)) for r in rows}) > 1]


def setting_of(row, keys):
    return tuple((k, row['config'].get(k)) for k in keys)


def setting_name(setting):
    return ', '.join(f'{k}={v}' for k, v in setting) or 'all runs'


def reference_for(keys, groups):
    """(key, value) of the reference: the first of REFERENCES whose key varies, else the
    first setting's value of the first varied key."""
    for key, value in REFERENCES:
        if key in keys:
            return key, value
    return keys[0], next(iter(groups))[0][1]


def summarize_rows(rows):
    """Per-setting summaries and paired comparisons -> (keys, settings, comparisons)."""
    keys = varied_keys(rows)
    groups = {}
    for row in rows:
        groups.setdefault(setting_of(row, keys), {})[row['seed']] = row  # newest wins
    settings = [{'setting': s, **{m: describe([r[m] for r in g.values()]) for m in METRICS},
                 'seeds': sorted(g)} for s, g in groups.items()]
    comparisons = []
    if keys:
        key, value = reference_for(keys, groups)
        for s, g in groups.items():
            ref = tuple((k, value if k == key else v) for k, v in s)
            if ref == s or ref not in groups:
                continue
            seeds = sorted(set(g) & set(groups[ref]))
            if not seeds:  # no seed in common: nothing to pair
                continue
            comparisons.append({'setting': s, 'reference': ref, 'seeds': seeds, **{
                m: paired([g[i][m] for i in seeds], [groups[ref][i][m] for i in seeds])
                for m in METRICS}})
    return keys, settings, comparisons


def _pct(x, signed=False):
    return 'n/a' if x is None or np.isnan(x) else f'{100 * x:{"+" if signed else ""}.2f}'


def _p(x):
    return 'n/a' if np.isnan(x) else f'{x:.3g}'


def table_md(settings, comparisons):
    """table.md: settings (mean +- sd in %), then the paired comparisons."""
    lines = ['| setting | n | test accuracy % (mean +- sd) | macro-F1 % (mean +- sd) |',
             '|---|---|---|---|']
    for s in settings:
        lines.append(f"| {setting_name(s['setting'])} | {s['accuracy']['n']} | "
                     + ' | '.join(f"{_pct(s[m]['mean'])} +- {_pct(s[m]['sd'])}"
                                  for m in METRICS) + ' |')
    if comparisons:
        lines += ['', '| setting - reference | pairs | metric | difference % (95% CI) | '
                  'paired t-test p | Wilcoxon p |', '|---|---|---|---|---|---|']
        for c in comparisons:
            for m in METRICS:
                p = c[m]
                lines.append(f"| {setting_name(c['setting'])} - {setting_name(c['reference'])}"
                             f" | {p['n']} | {m} | {_pct(p['diff'], True)} "
                             f"({_pct(p['ci_low'], True)}, {_pct(p['ci_high'], True)}) | "
                             f"{_p(p['p_ttest'])} | {_p(p['p_wilcoxon'])} |")
    return '\n'.join(lines) + '\n'


def table_csv(keys, settings, comparisons):
    """table.csv: one row per setting; the comparison columns are empty for a reference."""
    by_setting = {c['setting']: c for c in comparisons}
    fields = [*keys, 'n', 'seeds', *[f'{m}_{q}' for m in METRICS for q in ('mean', 'sd')],
              *[f'{m}_{q}' for m in METRICS
                for q in ('diff', 'ci_low', 'ci_high', 'p_ttest', 'p_wilcoxon')], 'reference']
    rows = []
    for s in settings:
        row = {**dict(s['setting']), 'n': s['accuracy']['n'], 'seeds': ' '.join(
            map(str, s['seeds']))}
        for m in METRICS:
            row[f'{m}_mean'], row[f'{m}_sd'] = s[m]['mean'], s[m]['sd']
        c = by_setting.get(s['setting'])
        if c:
            for m in METRICS:
                for q in ('diff', 'ci_low', 'ci_high', 'p_ttest', 'p_wilcoxon'):
                    row[f'{m}_{q}'] = c[m][q]
            row['reference'] = setting_name(c['reference'])
        rows.append(row)
    return _csv(fields, rows)


def runs_csv(keys, rows):
    fields = [*keys, 'seed', *METRICS, *MASK_KEYS, 'best_epoch', 'run']
    return _csv(fields, [{**{k: r['config'].get(k) for k in keys}, **r} for r in rows])


def _csv(fields, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir, run_dirs):
    """runs.csv, table.md, table.csv and sweep.png of these finished runs in out_dir."""
    rows = [run_row(Path(p)) for p in run_dirs]
    keys, settings, comparisons = summarize_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out_dir / 'runs.csv', runs_csv(keys, rows))
    atomic.write_bytes(out_dir / 'table.csv', table_csv(keys, settings, comparisons))
    md = table_md(settings, comparisons)
    atomic.write_bytes(out_dir / 'table.md', md)
    plots.plot_sweep(out_dir / 'sweep.png', [setting_name(s['setting']) for s in settings],
                     {m: [(s[m]['mean'], s[m]['sd']) for s in settings] for m in METRICS})
    return md


# ----------------------------------------------------------------------------- entry

def runs_to_summarize(spec, results_dir):
    """A sweep folder (its runs.csv) or comma-separated run folders / timestamps."""
    path = Path(spec)
    if (path / 'runs.csv').is_file():
        with open(path / 'runs.csv') as f:
            runs = [Path(r['run']) for r in csv.DictReader(f)]
    else:
        runs = [Path(p) if Path(p).is_dir() else Path(results_dir) / p for p in spec.split(',')]
    missing = [str(r) for r in runs if not (r / 'metrics.json').is_file()]
    if missing:
        raise configurator.ConfigError(f'summarize={spec!r}: no finished run (metrics.json) '
                                       f'in {", ".join(missing)}')
    return runs


def main_sweep(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    defaults = {'summarize': summarize, 'sweep_dir': sweep_dir, 'jobs': jobs}
    configurator.answer_help(defaults, argv)  # main.py --help lists the keys of the grid
    own, axes = split_argv(argv, defaults)
    opts = configurator.configure(defaults, own, _sweep_choices())
    if opts['summarize']:
        results_dir = axes.get('results_dir', [main.header()['results_dir']])[0]
        runs = runs_to_summarize(opts['summarize'], results_dir)
    else:
        combos = combinations(axes)
        cfgs = resolve_all(combos)
    failures = []
    if not opts['summarize']:
        failures = run_grid(combos, cfgs, opts['jobs'])
        runs = [r for r in (find_run(cfg, saved_runs(cfg['results_dir'])) for cfg in cfgs)
                if r is not None]
    out_dir = None
    if runs:  # made only now: a sweep killed while running leaves no empty folder
        out_dir = new_run_dir(opts['sweep_dir'])
        print(write_tables(out_dir, runs))
    print(f'sweep: {len(runs)} runs tabulated' + (f' in {out_dir}' if out_dir else ''))
    if failures:
        raise UserError(f'{len(failures)} runs failed (the others are tabulated): '
                        + '; '.join(failures))
    return out_dir


if __name__ == '__main__':
    run_script(main_sweep)
