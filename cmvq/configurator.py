"""Override a script's header constants from the command line.

Every entry script keeps its configuration as plain constants at the top of the
file (the primary way to configure) and then calls

    cfg = configure(globals(), sys.argv[1:], choices=CHOICES)
    globals().update(cfg)

Arguments are either a Python config file (``configs/demo.py``), whose top-level
assignments override the defaults, or ``--key=value`` pairs. Values are parsed as
Python literals when possible (``--lr=3e-4``, ``--shuffle=False``,
``--timestamp=None``) and otherwise taken as strings (``--mode=audio-only``); a
setting whose default is a tuple also takes a plain comma list (``--val_subjects=s3``,
``--val_subjects=s3,s4``).

Every override is checked by one validator: the key's entry in ``choices`` (a tuple
of allowed values, or a predicate whose docstring says what it accepts), or, for a
key without one, the type of its default. An unknown key or a value that fails raises
``ConfigError`` whose message says what is allowed. Nothing is applied until every
argument has been checked. A config file is Python code, run as it is: run only your
own.
"""
import ast
import os
import re
import sys
import traceback
import types
from pathlib import Path

from cmvq.errors import BadValueError

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout
# Types a header constant may have; modules, functions and imports are not config.
_CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))


class ConfigError(BadValueError):
    """A bad override; the message says what is allowed (a UserError: one line)."""


def config_keys(namespace):
    """Names of the header constants in ``namespace`` (a module's globals()).

    Header constants are lower-case; UPPER_CASE module constants (PEP 8) and
    _private names are not configuration.
    """
    return [k for k, v in namespace.items()
            if not k.startswith('_') and k.isidentifier() and not k.isupper()
            and type(v) in _CONFIG_TYPES]


def parse_value(text):
    """'3' -> 3, 'False' -> False, 'None' -> None, 'audio-only' -> 'audio-only'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_value(key, value, default, choices=None):
    """``value`` checked by the key's one validator (see the module docstring) and
    normalised: an int for a float default becomes a float, a str or a single value for
    a tuple default becomes a tuple. Raises ConfigError saying what is allowed."""
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if isinstance(default, tuple):
        value = _as_tuple(value)
    allowed = (choices or {}).get(key)
    if allowed is not None:
        if not _is_allowed(value, allowed):
            raise ConfigError(f'{key}={value!r} is not allowed; allowed: {_describe(allowed)}')
        return value
    if default is not None and value is not None:
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f'{key}={value!r} has type {type(value).__name__}, '
                              f'expected {type(default).__name__} (default {default!r})')
    return value


def _as_tuple(value):
    """'s3,s4' -> ('s3', 's4'); 's3' -> ('s3',); 0.5 -> (0.5,); a list -> a tuple."""
    if isinstance(value, str):
        return tuple(parse_value(part.strip()) for part in value.split(',') if part.strip())
    if isinstance(value, list):
        return tuple(value)
    return value if isinstance(value, tuple) or value is None else (value,)


def _is_allowed(value, allowed):
    if callable(allowed):
        return bool(allowed(value))
    return any(value == a and type(value) is type(a) or (value is None and a is None)
               for a in allowed)


def _describe(allowed):
    if callable(allowed):
        return allowed.__doc__ or allowed.__name__
    return ', '.join(repr(a) for a in allowed)


def read_config_file(path):
    """Top-level assignments of a Python config file, as a dict: numpy scalars become
    Python numbers and paths (os.PathLike) str; modules, classes and functions are
    skipped; any other type, a syntax error or an exception while running the file
    is a ConfigError naming the file (and line)."""
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
    except FileNotFoundError:
        raise ConfigError(f'config file {path!r} does not exist') from None
    except SyntaxError as e:
        raise ConfigError(f'config file {path}, line {e.lineno}: {e.msg}') from None
    except Exception as e:  # noqa: BLE001 - whatever the user's code raised
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if f.filename == str(path)), '?')
        raise ConfigError(f'config file {path}, line {line}: {type(e).__name__}: {e}') from None
    return {k: _plain(v, k, path) for k, v in namespace.items()
            if not k.startswith('_') and not _is_code(v)}


def _is_code(value):
    """Modules, classes and functions a config file imports or defines: not settings."""
    return isinstance(value, types.ModuleType) or callable(value)


def _plain(value, key, path):
    """A config file's value as a header constant's type (see read_config_file)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, key, path) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == 'numpy' and getattr(value, 'ndim', None) == 0:
        return value.item()  # a numpy scalar (np.int64(3) -> 3); numpy is not imported here
    if type(value) not in _CONFIG_TYPES:
        raise ConfigError(f'{key} in config file {path} is a {type(value).__name__}; '
                          'settings are bool, int, float, str, tuple, list or None')
    return value


def configure(defaults, argv=None, choices=None):
    """Resolve the header constants ``defaults`` with the overrides in ``argv``.

    defaults: mapping name -> default value (a module's globals() is fine: only
        plain constants are taken). choices: optional mapping name -> allowed
        values (a tuple, or a predicate whose docstring describes it).
    Returns a new dict with every header constant, overrides applied.
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = {k: defaults[k] for k in config_keys(defaults)}
    answer_help(cfg, argv)
    for key, value, source in overrides(argv):
        if key not in cfg:
            raise ConfigError(f'unknown config key {key!r} (from {source!r}); '
                              f'valid keys: {", ".join(sorted(cfg))}')
        cfg[key] = check_value(key, value, defaults[key], choices)
    for key, value in cfg.items():  # the defaults themselves must be valid too
        if choices and key in choices and not _is_allowed(value, choices[key]):
            raise ConfigError(f'{key}={value!r} is not allowed; '
                              f'allowed: {_describe(choices[key])}')
    return cfg


def overrides(argv):
    """[(key, value, the argument it came from)] of argv's config files and --key=value
    pairs, in order (a later one wins)."""
    out = []
    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f'{arg!r}: overrides are written --key=value')
            out.append((key, parse_value(text), arg))
        else:
            out += [(k, v, arg) for k, v in read_config_file(arg).items()]
    return out


def answer_help(defaults, argv):
    """With -h or --help in argv: print help_text and exit 0 (cheap: nothing is imported)."""
    if '-h' in argv or '--help' in argv:
        print(help_text({k: defaults[k] for k in config_keys(defaults)}))
        sys.exit(0)


def help_text(cfg, script=None):
    """--help: the script's docstring, then every constant with its default and the
    comment of its header line (allowed values), found in the script or the project
    files it imported (main_separate.py shows main.py's header too)."""
    script = Path(script or sys.argv[0]).resolve()
    comments = {}
    for source in dict.fromkeys([script, *_project_files()]):
        key = None
        for line in source.read_text().splitlines():
            match = re.match(r'^([A-Za-z_][A-Za-z0-9_]*) *=.*?#\s?(.*)$', line)
            more = re.match(r'^# {8,}(.*)$', line)  # a comment continued under its line
            if match and match[1] in cfg and match[1] not in comments:
                key, comments[key] = match[1], match[2]
            elif more and key:
                comments[key] += ' ' + more[1]
            else:
                key = None
    doc = ast.get_docstring(ast.parse(script.read_text())) or ''
    lines = [doc, '', f'usage: {_command(script)} [config.py ...] [--key=value ...]',
             'settings (default, then what is allowed):']
    for k, v in cfg.items():
        flag = f'--{k}={v!r}'
        sep = '\n' + ' ' * 38 if len(flag) > 34 else ' ' * (36 - len(flag))
        lines.append(f'  {flag}{sep}{comments.get(k, "")}'.rstrip())
    return '\n'.join(lines)


def _project_files():
    """The project's Python files loaded in this process (scripts and library)."""
    files = (getattr(m, '__file__', None) for m in list(sys.modules.values()))
    return [Path(f) for f in files if isinstance(f, str) and Path(f).is_file()
            and Path(f).resolve().is_relative_to(PROJECT_ROOT)]


def _command(script):
    """How the script is run from the checkout root: python3 x.py or python3 -m dir.x."""
    relative = script.relative_to(PROJECT_ROOT) if script.is_relative_to(PROJECT_ROOT) \
        else Path(script.name)
    if len(relative.parts) == 1:
        return f'python3 {relative}'
    return 'python3 -m ' + '.'.join(relative.with_suffix('').parts)
