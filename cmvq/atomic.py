"""Atomic writes: write to a temporary name beside the target, then rename.

A run that is killed midway leaves either the old file (or folder) or the new
one, never a half-written one that looks complete. Used for every file the
project writes (split configs, media, caches' metadata, run folders, plots) and,
with ``write_folder``, for whole folders (split configs, decode caches).
``file_key`` tells a reader that keeps what it read (a split file, a clip's hash)
whether the file may have changed since.

Temporary folders are named ``.<name>.tmp-<host>-<pid>-<random>`` beside their
target, so that ``remove_stale_temps`` can remove the leftovers of a killed
process (SIGKILL, power loss) on the next start without touching the folder of
a process that is still writing.
"""
import contextlib
import ctypes
import errno
import glob
import itertools
import json
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

from cmvq.errors import ExistsError, NoSpaceError


def write(path, writer):
    """Call writer(temporary_path), then rename the result to path.

    The temporary name keeps the suffix (.flv, .wav, ...) so format detection by
    extension still works; a writer that fails leaves nothing behind, and a full disk
    is a NoSpaceError naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.tmp{os.getpid()}{path.suffix}')
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise NoSpaceError(f'disk full while writing {path} (the file there is unchanged);'
                               ' free space on that disk') from None
        raise


def disk_full(error):
    """True if error, or one it was raised from or while handling (torch.save turns
    ENOSPC into a RuntimeError), is ENOSPC or EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def write_bytes(path, data):
    """bytes, or str written as UTF-8 with its newlines as they are; fsync'ed."""
    data = data.encode() if isinstance(data, str) else data

    def writer(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    write(path, writer)


def write_new(path, data):
    """Write bytes/str to ``path`` or, if that name exists, to ``<stem>-2<suffix>``,
    ``-3``, ...: never over another file, even one written concurrently (the
    finished temporary file is hard-linked to the name, which fails if it exists).
    Returns the path written."""
    path = Path(path)
    tmp = path.with_name(f'.{path.stem}.tmp{os.getpid()}{path.suffix}')
    write_bytes(tmp, data)
    try:
        for k in itertools.count(1):
            name = path if k == 1 else path.with_name(f'{path.stem}-{k}{path.suffix}')
            try:
                os.link(tmp, name)
                return name
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj, default=None):
    write_bytes(path, json.dumps(obj, indent=1, default=default) + '\n')


def write_pickle(path, obj):
    write_bytes(path, pickle.dumps(obj))


def file_key(path):
    """(real path, inode, size, mtime, ctime): changes whenever the file's content can
    have changed (a rewrite in place with its mtime restored still moves the ctime)."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


# ----------------------------------------------------------------------------- folders

def temp_folder(target):
    """A new empty temporary folder beside ``target`` (same file system: rename works)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f'.{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-'
    return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))


def remove_stale_temps(parent, name=None, say=print):
    """Remove the temporary folders in ``parent`` (of target ``name``; None: of any
    target) left by dead processes of this host; say one line per folder removed.
    Returns the removed paths."""
    marker = f'.tmp-{socket.gethostname()}-'
    pattern = f'.{glob.escape(name) if name else "*"}{glob.escape(marker)}*'
    removed = []
    for path in sorted(Path(parent).glob(pattern)):
        pid = path.name.rsplit(marker, 1)[1].split('-')[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            say(f'removed {path}: temporary folder of a killed process (pid {pid})')
            removed.append(path)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_folder(target, fill, overwrite=False):
    """Call fill(temporary folder), then rename that folder to ``target``.

    An interruption (an exception, SIGTERM, or SIGKILL followed by
    remove_stale_temps, which the next write of ``target`` runs first) leaves
    ``target`` as it was. overwrite=False refuses a
    non-empty target with ExistsError (a FileExistsError), decided by the rename
    itself, so two concurrent writers cannot both succeed; overwrite=True swaps
    the folders in one atomic exchange (Linux renameat2), then removes the old one.
    """
    target = Path(target)
    remove_stale_temps(target.parent, target.name)
    tmp = temp_folder(target)
    try:
        with sigterm_raises():
            fill(tmp)
            _publish(tmp, target, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder after a swap, or a failed one


def _publish(tmp, target, overwrite):
    try:
        os.rename(tmp, target)  # onto a missing or empty folder only
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        if not overwrite:
            raise ExistsError(f'{target} already exists and is not empty (another process '
                              'wrote it meanwhile?); pass --overwrite=True to replace it') from None
    exchange(tmp, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a, b):
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); where the kernel or the
    file system cannot, rename b aside first (a short window without b)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(b))
    aside = Path(f'{a}-old')
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


@contextlib.contextmanager
def sigterm_raises():
    """Inside: SIGTERM raises SystemExit(143), so that cleanup (finally) runs.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
