"""The decode-once cache: every clip decoded once into memory-mapped arrays.

Decoding an FLV costs ~15 ms (PyAV) to ~170 ms (moviepy), so each clip is decoded
once into

    cache_dir/<sha1 fingerprint>/frames.npy  (N, 2*jitter+1, 128, 128, 3) uint8
    cache_dir/<sha1 fingerprint>/specs.npy   (N, *spec_shape) float32 log-mel (dB)
    cache_dir/<sha1 fingerprint>/meta.json   paths, parameters, format version

``frames[i, jitter]`` is clip i's centre frame. The fingerprint covers the resolved
paths, their sizes, mtimes and a hash of their first and last 64 KiB, and every
preprocessing parameter (``params``, from datasets.cache_params), so a changed clip
or parameter gives a new folder. A cache is built in a temporary folder with a pool
of decoding processes and renamed only when complete: an interrupted build is
never used, and says why it stopped. The decoder (datasets.decode_clip,
datasets.RMLDecoder) is a picklable decoder(path, jitter, backend) -> (faces, spec).
"""
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from cmvq import atomic, media
from cmvq.atomic import file_key
from cmvq.errors import NoSpaceError
from cmvq.progress import progress_bar

CACHE_VERSION = 3
HASH_BYTES = 64 * 1024  # content_hash reads this much at each end of a clip
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def fingerprint(paths, params):
    """sha1 of the parameters and, per clip, its resolved path, size, mtime and a
    hash of its first and last 64 KiB (content_hash: a clip rewritten with the
    same size and mtime still changes it). Missing clips raise MediaError
    (check_clips_exist)."""
    check_clips_exist(paths)
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f'{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0'
                 f'{content_hash(path)}\n'.encode())
    return h.hexdigest()


def check_clips_exist(paths, show=5, hint='set media_root to your CREMA-D copy or rebuild '
                      'the split configs with read_cremad.py'):
    """Raise MediaError saying how many of ``paths`` are missing, naming the first few,
    then what to do (hint: the dataset's)."""
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        first = f'the first {show}' if len(missing) > show else 'they are'
        raise media.MediaError(
            f'{len(missing)} of {len(paths)} clips are missing ({first}: '
            f'{", ".join(missing[:show])}); {hint}')



def content_hash(path, nbytes=HASH_BYTES):
    """sha1 of a file's first and last nbytes (cheap: 128 KiB read per clip), computed
    once per process for a given path, size and mtime."""
    return _content_hash(*file_key(path), nbytes)


@functools.cache
def _content_hash(path, inode, size, mtime_ns, ctime_ns, nbytes):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        h.update(f.read(nbytes))
        size = os.fstat(f.fileno()).st_size
        if size > nbytes:
            f.seek(max(nbytes, size - nbytes))
            h.update(f.read())
    return h.hexdigest()


def describe_bad(bad, total, show=3):
    """{path: reason} -> one line: how many of total, and the first few with reasons."""
    first = '; '.join(f'{p}: {r}' for p, r in list(bad.items())[:show])
    more = f' (and {len(bad) - show} more)' if len(bad) > show else ''
    return f'{len(bad)} of {total} clips cannot be used: {first}{more}'


def array_specs(count, params):
    """{name: (shape, dtype)} of a cache of `count` clips."""
    size = params['image_size']
    return {'frames': ((count, 2 * params['frame_jitter'] + 1, size, size, 3), np.dtype(np.uint8)),
            'specs': ((count, *params.get('spec_shape', (params['mel']['n_mels'],
                                                         params['spec_frames']))),
                      np.dtype(np.float32))}


def cache_bytes(count, params):
    """Disk space a cache of `count` clips takes (headers aside: < 1 KiB)."""
    return sum(int(np.prod(shape)) * dtype.itemsize
               for shape, dtype in array_specs(count, params).values())


def check_free_space(cache_dir, count, params):
    """Raise NoSpaceError (an OSError) with one clear line if cache_dir's file system
    cannot hold a cache of `count` clips."""
    folder = Path(cache_dir)
    while not folder.exists():
        folder = folder.parent
    need, free = cache_bytes(count, params), shutil.disk_usage(folder).free
    if need > free:
        raise NoSpaceError(f'not enough free space for the decode-once cache of {count} '
                           f'clips in {cache_dir}: it needs {need / 1e9:.2f} GB, '
                           f'{free / 1e9:.2f} GB are free (free some, set cache_dir '
                           'elsewhere, or cache=False)')


def damage(folder, count, params):
    """None if folder holds a complete cache of `count` clips with these parameters,
    else the reason (e.g. an array file of the wrong size)."""
    try:
        meta = json.loads((folder / 'meta.json').read_text())
    except (OSError, ValueError):
        return 'meta.json is missing or unreadable'
    if meta.get('count') != count or meta.get('params') != json.loads(json.dumps(params)):
        return 'meta.json does not match'
    for name, (shape, dtype) in array_specs(count, params).items():
        path = folder / f'{name}.npy'
        try:
            with open(path, 'rb') as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                          np.lib.format.read_array_header_2_0)(f)
                expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            return f'{path.name} is unreadable ({e})'
        if header[0] != shape or header[2] != dtype or size != expected:
            return f'{path.name} has {size} bytes, expected {expected} (shape {shape})'
    return None


def build(paths, cache_dir, decoder, params, *, workers=DEFAULT_WORKERS, progress=True,
          drop_bad=False):
    """Decode every clip once into cache_dir/<fingerprint>/ -> (kept paths, {path: reason}
    of the clips left out, the cache folder of the kept paths).

    Reuses a complete cache with the same fingerprint (a damaged one is rebuilt).
    A clip that is missing, undecodable or fails a check (media.MediaError) raises
    MediaError naming how many and the first few, after trying them all; with
    drop_bad it is left out instead. A failed or interrupted build removes its
    temporary folder and says why in one line.
    """
    return _build(paths, cache_dir, params, workers, progress, drop_bad, decoder)


def _build(paths, cache_dir, params, workers, progress, drop_bad, decoder):
    cache_dir = Path(cache_dir)
    final = cache_dir / fingerprint(paths, params)
    if _usable(final, len(paths), params):
        return list(paths), {}, final
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(cache_dir)
    check_free_space(cache_dir, len(paths), params)
    tmp = atomic.temp_folder(final)
    try:
        with atomic.sigterm_raises():
            bad = _fill_cache(tmp, paths, params, workers, progress, decoder)
            if bad and not drop_bad:
                raise media.MediaError(describe_bad(bad, len(paths)))
            kept = [p for p in paths if p not in bad]
            if bad:
                final = cache_dir / fingerprint(kept, params)
                if not _usable(final, len(kept), params):
                    _compact(tmp, [i for i, p in enumerate(paths) if p not in bad], params)
            if not _usable(final, len(kept), params):
                _publish_cache(tmp, final, kept, params)
    except BaseException as e:
        print(f'decode-once cache: build stopped ({_why(e)}); removed its temporary folder '
              f'{tmp}', file=sys.stderr, flush=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NoSpaceError(f'disk full while building the decode-once cache in '
                               f'{cache_dir}: free space there, or set cache_dir elsewhere, '
                               'or cache=False') from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_superseded(final)
    return kept, bad, final


def _usable(folder, count, params):
    """True for a complete cache; a damaged one is removed (with one line) to be rebuilt."""
    if not folder.is_dir():
        return False
    reason = damage(folder, count, params)
    if reason is None:
        return True
    print(f'decode-once cache {folder} is damaged ({reason}); rebuilding it', file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return False


def _why(error):
    if isinstance(error, SystemExit):
        return f'terminated, exit status {error.code}'
    if isinstance(error, KeyboardInterrupt):
        return 'interrupted'
    if isinstance(error, BrokenProcessPool):
        return 'a decoding worker died'
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f'disk full: {error.strerror or error}'
    return f'{type(error).__name__}: {error}'


def _publish_cache(tmp, final, paths, params):
    atomic.write_json(tmp / 'meta.json', {'params': params, 'count': len(paths),
                                          'paths': [os.path.realpath(p) for p in paths]})
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same cache first
        if damage(final, len(paths), params) is not None:
            raise


def _compact(folder, keep, params):
    """Keep rows `keep` of folder's arrays (dropping bad clips), in place of the originals."""
    for name, (shape, dtype) in array_specs(len(keep), params).items():
        src = np.load(folder / f'{name}.npy', mmap_mode='r')
        dst = _allocate(folder / f'{name}.kept.npy', shape, dtype)
        for start in range(0, len(keep), 64):
            dst[start:start + 64] = src[keep[start:start + 64]]
        dst.flush()
        del src, dst
        os.replace(folder / f'{name}.kept.npy', folder / f'{name}.npy')


def remove_superseded(folder):
    """Remove the other caches of the same clips (paths) and parameters: their clips
    have changed since (the fingerprints differ), so nothing can use them again."""
    meta = json.loads((folder / 'meta.json').read_text())
    for other in folder.parent.iterdir():
        if other == folder or other.name.startswith('.') or not other.is_dir():
            continue
        try:
            theirs = json.loads((other / 'meta.json').read_text())
        except (OSError, ValueError):
            continue
        if theirs.get('paths') == meta['paths'] and theirs.get('params') == meta['params']:
            size = sum(f.stat().st_size for f in other.iterdir())
            shutil.rmtree(other, ignore_errors=True)
            print(f'decode-once cache: removed {other} ({size / 1e6:.0f} MB), superseded by '
                  f'{folder.name} (same clips, changed since)', file=sys.stderr)


def _allocate(path, shape, dtype):
    """A .npy memmap whose disk blocks are reserved now: a full disk fails here with
    ENOSPC, not later with SIGBUS while a worker writes into the mapping."""
    array = np.lib.format.open_memmap(path, 'w+', dtype, shape)
    with open(path, 'r+b') as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return array


def _fill_cache(folder, paths, params, workers, progress, decoder):
    """Decode every clip into folder's arrays; {path: reason} of the clips that failed."""
    # Workers write straight into the memory-mapped files; only indices travel back.
    for name, (shape, dtype) in array_specs(len(paths), params).items():
        _allocate(folder / f'{name}.npy', shape, dtype)
    jobs = [(i, p, params['frame_jitter'], params['backend']) for i, p in enumerate(paths)]
    media.log_mel(np.zeros(media.AUDIO_RATE, np.float32))  # librosa's lazy set-up, before forking
    bad = {}
    bar = progress_bar(total=len(paths), desc='decode-once cache', unit='clip', enabled=progress)
    with bar:
        if workers <= 1 or len(paths) <= 1:
            _open_cache(folder, decoder)
            results = map(_cache_one, jobs)
        else:
            pool = ProcessPoolExecutor(workers, initializer=_worker_init,
                                       initargs=(folder, decoder))
            results = pool.map(_cache_one, jobs, chunksize=4)
        try:
            for i, reason in results:
                if reason is not None:
                    bad[paths[i]] = reason
                bar.update()
        finally:
            if workers > 1 and len(paths) > 1:
                pool.shutdown(wait=True, cancel_futures=True)
            _open_cache(None, None)
    return bad


_worker = {}  # per process: the memmaps being filled and the decoder


def _worker_init(folder, decoder):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler raises; not here
    _open_cache(folder, decoder)


def _open_cache(folder, decoder):
    """Open folder's arrays for writing in this process (None: close them)."""
    _worker.clear()
    if folder is not None:
        _worker.update({name: np.load(Path(folder) / f'{name}.npy', mmap_mode='r+')
                        for name in ('frames', 'specs')}, decoder=decoder)


def _cache_one(job):
    """Decode clip i into row i: (i, None), or (i, reason) for a clip that fails."""
    i, path, jitter, backend = job
    try:
        faces, spec = _worker['decoder'](path, jitter, backend)
    except media.MediaError as e:
        return i, e.reason
    _worker['frames'][i] = faces
    _worker['specs'][i] = spec  # shared mapping: visible without a flush
    return i, None

