"""--key=value and config-file overrides of header constants."""
import runpy
import sys

import pytest

from cmvq.configurator import ConfigError, configure
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


def test_a_key_with_choices_is_checked_by_them_alone():
    defaults, choices = {'channels_last': 'auto'}, {'channels_last': ('auto', True, False)}
    assert configure(defaults, ['--channels_last=True'], choices)['channels_last'] is True
    with pytest.raises(ConfigError, match="channels_last=1 is not allowed; allowed: 'auto', "
                                          'True, False'):
        configure(defaults, ['--channels_last=1'], choices)


@pytest.mark.parametrize('arg, value', [('--subjects=s3', ('s3',)),
                                        ('--subjects=s3,s4', ('s3', 's4')),
                                        ("--subjects=('s3', 's4')", ('s3', 's4')),
                                        ('--sizes=0.8,0.1,0.1', (0.8, 0.1, 0.1)),
                                        ('--sizes=5', (5,))])
def test_tuple_settings_take_plain_comma_lists(arg, value):
    defaults = {'subjects': ('s7',), 'sizes': (0.8, 0.1, 0.1)}
    assert configure(defaults, [arg])[arg[2:].split('=')[0]] == value


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


def _scripts():
    """Every runnable with a __main__ block: top-level scripts, prepare/ and tools/ modules."""
    files = [*REPO.glob('*.py'), *REPO.glob('prepare/*.py'), *REPO.glob('tools/*.py')]
    return sorted(str(p.relative_to(REPO)) for p in files
                  if "__name__ == '__main__'" in p.read_text())


@pytest.mark.parametrize('script', _scripts())
def test_help_prints_the_settings_with_comments_and_exits_0(script, monkeypatch, capsys):
    flag = '-h' if script < 'n' else '--help'  # both spellings, spread over the scripts
    monkeypatch.setattr(sys, 'argv', [str(REPO / script), flag])
    with pytest.raises(SystemExit) as done:  # in-process: a subprocess per script is slow
        if '/' in script:
            runpy.run_module(script[:-3].replace('/', '.'), run_name='__main__')
        else:
            runpy.run_path(str(REPO / script), run_name='__main__')
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    settings = [line for line in out.splitlines() if line.startswith('  --')]
    assert 'usage: python3 ' in out and out.split('\n', 1)[0].strip(), out
    assert all(len(line.split()) > 1 for line in settings), out  # each with its comment


def test_main_help_shows_the_loss_option(capsys):
    import main
    with pytest.raises(SystemExit):
        main.main(['--help'])
    assert "--recon_loss='mse'" in capsys.readouterr().out


def test_release_spelling_of_the_dataset_is_accepted():
    import main
    from cmvq.config import resolve
    cfg = resolve(main.header(), ['--dataset=CREMAD'])
    assert cfg['dataset'] == 'CREMA-D'
