"""Atomic file writes: write to a temporary name beside the target, then rename.

A run that is killed midway leaves either the old file or the new one, never a
half-written file that looks complete. Used for every file the project writes
(split configs, media, caches' metadata, run folders, plots).
"""
import json
import os
import pickle
from pathlib import Path


def write(path, writer):
    """Call writer(temporary_path), then rename the result to path.

    The temporary name keeps the suffix (.flv, .wav, ...) so format detection by
    extension still works; a writer that fails leaves nothing behind.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.tmp{os.getpid()}{path.suffix}')
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data):
    """bytes, or str written as UTF-8 with its newlines as they are; fsync'ed."""
    data = data.encode() if isinstance(data, str) else data

    def writer(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    write(path, writer)


def write_json(path, obj, default=None):
    write_bytes(path, json.dumps(obj, indent=1, default=default) + '\n')


def write_pickle(path, obj):
    write_bytes(path, pickle.dumps(obj))
