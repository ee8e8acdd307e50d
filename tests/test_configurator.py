"""--key=value and config-file overrides of header constants."""
import re
import runpy
import sys

import pytest

from configurator import ConfigError, configure
from conftest import REPO

DEFAULTS = {'mode': 'multimodal', 'num_epoch': 50, 'learning_rate': 1e-3, 'shuffle': True,
            'threshold': None, 'data_path': 'data_cremad', 'sys': __import__('sys'),
            'CODES': ('IEO', 'DFA'), '_private': 1}   # not configuration
CHOICES = {'mode': ('multimodal', 'image-only', 'audio-only')}


def test_defaults_without_overrides():
    cfg = configure(DEFAULTS, [], CHOICES)
    assert cfg == {k: v for k, v in DEFAULTS.items() if k not in ('sys', 'CODES', '_private')}


def test_overrides_are_parsed_and_typed():
    cfg = configure(DEFAULTS, ['--mode=audio-only', '--num_epoch=3', '--learning_rate=1',
                               '--shuffle=False', '--threshold=0.01'], CHOICES)
    assert cfg['mode'] == 'audio-only' and cfg['num_epoch'] == 3
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)
    assert cfg['shuffle'] is False and cfg['threshold'] == 0.01


def test_a_listed_choice_of_another_type_than_the_default_is_accepted():
    defaults, choices = {'channels_last': 'auto'}, {'channels_last': ('auto', True, False)}
    assert configure(defaults, ['--channels_last=True'], choices)['channels_last'] is True
    with pytest.raises(ConfigError, match='has type int'):
        configure(defaults, ['--channels_last=1'], choices)


@pytest.mark.parametrize('arg, message', [
    ('--nope=1', "unknown config key 'nope'"),
    ('--num_epoch=2.5', 'expected int'),
    ('--shuffle=1', 'expected bool'),
    ('--num_epoch=True', 'expected int'),
    ('--mode=video-only', "allowed: 'multimodal', 'image-only', 'audio-only'"),
    ('--mode', 'written --key=value'),
])
def test_bad_overrides_name_what_is_allowed(arg, message):
    with pytest.raises(ConfigError, match=message):
        configure(DEFAULTS, [arg], CHOICES)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        configure(DEFAULTS, ['--epochs=3'], CHOICES)
    assert 'num_epoch' in str(err.value) and 'learning_rate' in str(err.value)


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / 'x.py'
    path.write_text("mode = 'image-only'\nnum_epoch = 7\n")
    cfg = configure(DEFAULTS, [str(path), '--num_epoch=9'], CHOICES)
    assert cfg['mode'] == 'image-only' and cfg['num_epoch'] == 9


def test_config_file_errors(tmp_path):
    path = tmp_path / 'x.py'
    path.write_text('num_epochs = 7\n')
    with pytest.raises(ConfigError, match="unknown config key 'num_epochs'"):
        configure(DEFAULTS, [str(path)], CHOICES)
    with pytest.raises(ConfigError, match='does not exist'):
        configure(DEFAULTS, [str(tmp_path / 'missing.py')], CHOICES)


def test_predicate_choices_describe_themselves():
    def positive(v):
        """an int > 0"""
        return v > 0
    with pytest.raises(ConfigError, match='allowed: an int > 0'):
        configure(DEFAULTS, ['--num_epoch=0'], {'num_epoch': positive})


# Every entry script with a header: a __main__ block, and a call that resolves the header.
SCRIPTS = sorted(p.name for p in REPO.glob('*.py') if p.name != 'configurator.py'
                 and "__name__ == '__main__'" in p.read_text()
                 and re.search(r'\bconfigure(_or_exit)?\(|\bresolve\(', p.read_text()))


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_the_settings_with_comments_and_exits_0(script, monkeypatch, capsys):
    flag = '-h' if script < 'n' else '--help'  # both spellings, spread over the scripts
    monkeypatch.setattr(sys, 'argv', [str(REPO / script), flag])
    with pytest.raises(SystemExit) as done:  # in-process: a subprocess per script is slow
        runpy.run_path(str(REPO / script), run_name='__main__')
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert f'usage: python3 {script}' in out
    commented = [line for line in out.splitlines() if line.startswith('  --')
                 and len(line.split()) > 1]
    assert len(commented) >= 3, out


def test_main_help_shows_the_loss_option(capsys):
    import main
    with pytest.raises(SystemExit):
        main.resolve(main.header(), ['--help'])
    assert "--recon_loss='mse'" in capsys.readouterr().out


def test_seed_spelling_of_the_dataset_is_accepted():
    import main
    cfg = main.resolve(main.header(), ['--dataset=CREMAD'])
    assert cfg['dataset'] == 'CREMA-D'
