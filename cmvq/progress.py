"""Progress: a tqdm bar on a terminal, plain lines when output is redirected.

A bar's carriage-return updates would fill a redirected log (and glue the next log
line to a half-drawn bar), so off a terminal a job prints plain lines instead: one
when it ends, and on the way one at each tenth if 10 s have passed since the last.
A per-batch bar (lines=False) prints nothing.
"""
import sys
import time

from tqdm import tqdm


def progress_bar(iterable=None, *, total=None, desc='', unit='it', enabled=True, lines=True,
                 leave=True):
    """tqdm(iterable) on a terminal; elsewhere an iterator (with update/close and a
    context manager, like tqdm) that prints `desc: n/total unit (s)` lines."""
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total, desc, unit, enabled and lines)


class PlainProgress:
    """The redirected form of a progress bar (see the module docstring)."""

    EVERY = 10.0  # seconds between lines on the way

    def __init__(self, iterable, total, desc, unit, lines):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.lines, self.n, self.shown = lines, 0, 0
        self.start = self.last = time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.n += n
        if not (self.lines and self.total):
            return
        tenth, now = 10 * self.n // self.total, time.time()
        if tenth > self.shown and (self.n >= self.total or now - self.last >= self.EVERY):
            self.shown, self.last = tenth, now
            print(f'{self.desc}: {self.n}/{self.total} {self.unit} ({now - self.start:.0f} s)',
                  file=sys.stderr, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
