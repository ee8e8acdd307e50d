"""--key=value and config-file overrides of header constants."""
import pytest

from configurator import ConfigError, configure

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
