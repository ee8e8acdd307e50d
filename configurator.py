"""Override a script's header constants from the command line.

Every entry script keeps its configuration as plain constants at the top of the
file (the primary way to configure) and then calls

    cfg = configure(globals(), sys.argv[1:], choices=CHOICES)
    globals().update(cfg)

Arguments are either a Python config file (``configs/demo.py``), whose top-level
assignments override the defaults, or ``--key=value`` pairs. Values are parsed as
Python literals when possible (``--lr=3e-4``, ``--shuffle=False``,
``--timestamp=None``) and otherwise taken as strings (``--mode=audio-only``).

Every override is checked: an unknown key, a value of the wrong type or a value
outside ``choices`` raises ``ConfigError`` whose message lists what is allowed.
Nothing is applied until every argument has been checked.
"""
import ast
import re
import sys
from pathlib import Path

from errors import BadValueError, exit_with

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
    """Return ``value`` coerced to the type of ``default``; raise ConfigError if it cannot be."""
    allowed = (choices or {}).get(key)
    listed = isinstance(allowed, tuple) and any(type(a) is type(value) and a == value
                                                for a in allowed)
    if default is not None and value is not None and not listed:  # e.g. 'auto' or True
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float) and isinstance(value, int):
            value, ok = float(value), True
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f'{key}={value!r} has type {type(value).__name__}, '
                              f'expected {type(default).__name__} (default {default!r})')
    if allowed is not None and not _is_allowed(value, allowed):
        raise ConfigError(f'{key}={value!r} is not allowed; allowed: {_describe(allowed)}')
    return value


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
    """Top-level assignments of a Python config file, as a dict."""
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
    except FileNotFoundError:
        raise ConfigError(f'config file {path!r} does not exist') from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and type(v) in _CONFIG_TYPES}


def configure(defaults, argv=None, choices=None):
    """Resolve the header constants ``defaults`` with the overrides in ``argv``.

    defaults: mapping name -> default value (a module's globals() is fine: only
        plain constants are taken). choices: optional mapping name -> allowed
        values (a tuple, or a predicate whose docstring describes it).
    Returns a new dict with every header constant, overrides applied.
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = {k: defaults[k] for k in config_keys(defaults)}
    if '-h' in argv or '--help' in argv:
        print(help_text(cfg))
        sys.exit(0)
    overrides = []
    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f'{arg!r}: overrides are written --key=value')
            overrides.append((key, parse_value(text), arg))
        else:
            overrides += [(k, v, arg) for k, v in read_config_file(arg).items()]
    for key, value, source in overrides:
        if key not in cfg:
            raise ConfigError(f'unknown config key {key!r} (from {source!r}); '
                              f'valid keys: {", ".join(sorted(cfg))}')
        cfg[key] = check_value(key, value, defaults[key], choices)
    for key, value in cfg.items():  # the defaults themselves must be valid too
        if choices and key in choices and not _is_allowed(value, choices[key]):
            raise ConfigError(f'{key}={value!r} is not allowed; '
                              f'allowed: {_describe(choices[key])}')
    return cfg


def help_text(cfg, script=None):
    """--help: the script's docstring, then every constant with its default and the
    comment of its header line (allowed values), found in the script or the project
    modules it imported (main_separate.py shows main.py's header too)."""
    script = Path(script or sys.argv[0]).resolve()
    files = [Path(f) for f in (getattr(m, '__file__', None) for m in list(sys.modules.values()))
             if isinstance(f, str) and Path(f).is_absolute()]
    sources = [script] + [f for f in files if f.parent == script.parent and f.is_file()]
    comments = {}
    for source in dict.fromkeys(sources):
        key = None
        for line in source.read_text().splitlines():
            match = re.match(r'^([a-z_][a-z0-9_]*) *=.*?#\s?(.*)$', line)
            more = re.match(r'^# {8,}(.*)$', line)  # a comment continued under its line
            if match and match[1] in cfg and match[1] not in comments:
                key, comments[key] = match[1], match[2]
            elif more and key:
                comments[key] += ' ' + more[1]
            else:
                key = None
    doc = ast.get_docstring(ast.parse(script.read_text())) or ''
    lines = [doc, '', f'usage: python3 {script.name} [config.py ...] [--key=value ...]',
             'settings (default, then what is allowed):']
    for k, v in cfg.items():
        flag = f'--{k}={v!r}'
        sep = '\n' + ' ' * 38 if len(flag) > 34 else ' ' * (36 - len(flag))
        lines.append(f'  {flag}{sep}{comments.get(k, "")}'.rstrip())
    return '\n'.join(lines)


def configure_or_exit(defaults, argv=None, choices=None):
    """``configure`` for entry scripts: a bad override prints one line and exits with status 1
    (errors.run_script does the same for a ConfigError raised by ``configure``)."""
    try:
        return configure(defaults, argv, choices)
    except ConfigError as e:
        exit_with(e)
