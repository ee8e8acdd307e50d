"""One error style for every script: a user's mistake is one line, a bug a traceback.

Code anywhere raises ``UserError`` (or a subclass: ``MissingError``, ``ExistsError``,
``BadValueError`` below, ``configurator.ConfigError``, ``synth_cremad.SynthError``,
``media.MediaError``) for a mistake the user can fix:
a bad value, a missing or existing folder, a missing CSV or clip. The message
names what is wrong and what to do. Each entry script ends with

    if __name__ == '__main__':
        errors.run_script(main)

which prints such an error as one line, ``<script>: <message>``, on stderr and
exits with status 1. Any other exception is a bug and keeps its traceback.
Imports no project file, so every module may use it.
"""
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


# The same, keeping the built-in type callers may already catch.
class MissingError(UserError, FileNotFoundError):
    """A file or folder the user must provide (data_path, a CSV, a clip, a run) is missing."""


class ExistsError(UserError, FileExistsError):
    """An output the user asked for already exists and must not be overwritten."""


class NoSpaceError(UserError, OSError):
    """Not enough free disk space for an output (e.g. the decode-once cache)."""


class BadValueError(UserError, ValueError):
    """A value outside what is allowed (a setting, a split file's contents)."""


def one_line(error):
    """The error's message on a single line (embedded newlines become '; ')."""
    return '; '.join(part.strip() for part in str(error).splitlines() if part.strip())


def exit_with(error):
    """Exit with status 1 after printing ``<script>: <message>`` as one line on stderr."""
    sys.exit(f'{Path(sys.argv[0]).name}: {one_line(error)}')


def run_script(main, *args):
    """main(*args) for a script's __main__ block: a UserError exits with one line."""
    try:
        return main(*args)
    except UserError as e:
        exit_with(e)
