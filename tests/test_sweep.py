"""sweep.py: the table statistics against a hand-computed case, and a tiny grid end to end."""
import csv
import math
import signal

import pytest

from tools import sweep
from cmvq.configurator import ConfigError


def test_paired_statistics_match_a_hand_computed_case():
    reference = [0.80, 0.82, 0.78]
    other = [0.75, 0.80, 0.70]
    # differences -0.05, -0.02, -0.08: mean -0.05, sd 0.03, se 0.03 / sqrt(3);
    # t(0.975, df 2) = 4.302653; t = -0.05 / se = -2.886751; with 2 degrees of
    # freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 0.101975.
    p = sweep.paired(other, reference)
    half = 4.302653 * 0.03 / math.sqrt(3)
    assert p['n'] == 3 and p['diff'] == pytest.approx(-0.05)
    assert p['ci_low'] == pytest.approx(-0.05 - half, abs=1e-6)
    assert p['ci_high'] == pytest.approx(-0.05 + half, abs=1e-6)
    t = 0.05 / (0.03 / math.sqrt(3))
    assert p['p_ttest'] == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-6)
    assert math.isnan(p['p_wilcoxon'])            # 3 pairs: too few for Wilcoxon
    d = sweep.describe(reference)
    assert d == {'mean': pytest.approx(0.80), 'sd': pytest.approx(0.02), 'n': 3}


def test_wilcoxon_from_six_pairs():
    # all six differences positive and distinct: the exact two-sided p is 2 / 2^6
    p = sweep.paired([1, 2, 3, 4, 5, 6], [0.9, 1.8, 2.7, 3.6, 4.5, 5.4])
    assert p['p_wilcoxon'] == pytest.approx(2 / 64)


def test_summary_groups_settings_and_pairs_seeds():
    def row(base_type, seed, acc):
        return {'config': {'base_type': base_type, 'seed': seed, 'num_epoch': 2},
                'seed': seed, 'accuracy': acc, 'macro_f1': acc / 2}
    rows = [row(0, 0, 0.80), row(0, 1, 0.82), row(0, 2, 0.78),
            row(1, 0, 0.75), row(1, 1, 0.80), row(1, 2, 0.70), row(1, 3, 0.5)]
    keys, settings, comparisons = sweep.summarize_rows(rows)
    assert keys == ['base_type']
    assert [s['accuracy']['n'] for s in settings] == [3, 4]
    (c,) = comparisons
    rows.append(row(3, 5, 0.9))                  # no seed in common with base_type 0
    assert len(sweep.summarize_rows(rows)[2]) == 1
    assert c['seeds'] == [0, 1, 2]                 # seed 3 has no partner
    assert c['accuracy']['diff'] == pytest.approx(-0.05)
    assert c['macro_f1']['diff'] == pytest.approx(-0.025)
    md = sweep.table_md(settings, comparisons)
    assert '| base_type=1 - base_type=0 | 3 | accuracy | -5.00 (-12.45, +2.45) | 0.102 | n/a |' \
        in md


def test_a_precision_axis_is_compared_with_fp32():
    def row(precision, seed, acc):
        return {'config': {'base_type': 0, 'precision': precision}, 'seed': seed,
                'accuracy': acc, 'macro_f1': acc}
    rows = [row('bf16', 0, 0.80), row('bf16', 1, 0.90), row('fp32', 0, 0.70),
            row('fp32', 1, 0.86)]
    keys, _, (c,) = sweep.summarize_rows(rows)
    assert keys == ['precision'] and c['reference'] == (('precision', 'fp32'),)
    assert c['accuracy']['diff'] == pytest.approx(0.07)


def test_grid_runs_resumes_and_summarizes(tiny_splits, tmp_path):
    results = tmp_path / 'results'
    argv = [*tiny_splits(results, '--num_epoch=1'), '--base_type=0,1', '--seed=0,1',
            f'--sweep_dir={tmp_path / "sweeps"}']
    out = sweep.main_sweep(argv)
    runs = list(csv.DictReader(open(out / 'runs.csv')))
    assert len(runs) == 4 and len(list(results.iterdir())) == 4
    assert {(r['base_type'], r['seed']) for r in runs} == {('0', '0'), ('0', '1'),
                                                           ('1', '0'), ('1', '1')}
    table = list(csv.DictReader(open(out / 'table.csv')))
    assert [t['n'] for t in table] == ['2', '2'] and table[1]['reference'] == 'base_type=0'
    assert (out / 'table.md').is_file() and (out / 'sweep.png').is_file()
    again = sweep.main_sweep(argv)                  # every run finished: nothing reruns
    assert len(list(results.iterdir())) == 4
    assert (again / 'table.md').read_text() == (out / 'table.md').read_text()
    rebuilt = sweep.main_sweep([f'--summarize={out}', f'--sweep_dir={tmp_path / "sweeps"}'])
    assert (rebuilt / 'table.csv').read_text() == (out / 'table.csv').read_text()


def test_sigterm_during_a_run_stops_the_sweep(tiny_splits, tmp_path, monkeypatch):
    started = []

    def terminated(argv, device=None):  # what main.main raises when SIGTERM stops a run
        started.append(argv)
        raise SystemExit(128 + signal.SIGTERM)
    monkeypatch.setattr(sweep, 'run_in_process', terminated)
    with pytest.raises(SystemExit):
        sweep.main_sweep([*tiny_splits(tmp_path / 'results'), '--seed=0,1',
                          f'--sweep_dir={tmp_path / "sweeps"}'])
    assert len(started) == 1


def test_a_bad_combination_stops_before_any_run(tiny_splits, tmp_path):
    with pytest.raises(ConfigError, match="base_type=7"):
        sweep.main_sweep([*tiny_splits(tmp_path / 'results'), '--base_type=0,7'])
    assert not (tmp_path / 'results').exists()
