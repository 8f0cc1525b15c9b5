"""Atomic publication of a directory: build it under a hidden sibling, rename it into place
with RENAME_NOREPLACE so an existing snapshot is never replaced and a reader sees all or nothing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import os
import shutil
import time
import uuid
from pathlib import Path

from fastvllm.runtime.errors import SnapshotExistsError, UsageError, from_os_error

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

STAGING_MARK = ".partial-"


def staging_dir(out: Path) -> Path:
    """A private (0700) sibling of `out`, on the same filesystem so the final rename is atomic.
    This process holds a lock on it (flock on the directory) until `publish` or `discard`, or
    until it dies, however it dies: `is_stale` tells a partial directory nobody writes any more,
    from any process, container or not, on this host."""
    tmp = out.parent / f".{out.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)
    except OSError as e:  # --out under a file, a read-only or full file system, no permission
        if e.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a directory must be: name it
            blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise UsageError(
                    f"cannot create {out}: {blocker} is a file, not a directory",
                    hint="choose an --out whose parent is a directory",
                ) from e
        if e.filename == str(tmp):  # the hidden staging name means nothing to the user
            e.filename = None
        raise from_os_error(e, f"create {out}") or e from e
    os.chmod(tmp, 0o700)  # mkdir's mode is filtered by the umask
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)  # a file system without locks: the directory is only judged by its age
    else:
        _held[tmp] = fd
    return tmp


_held: dict[Path, int] = {}  # staging directory -> the descriptor holding its lock
STALE_AGE_S = 2.0  # a partial directory younger than this may still be taking its lock
LOCKLESS_STALE_AGE_S = 24 * 3600.0  # one whose lock cannot be judged is stale after a day


def _release(staging: Path) -> None:
    fd = _held.pop(staging, None)
    if fd is not None:
        os.close(fd)


def partials_of(out: Path) -> list[Path]:
    """The staging directories of snapshots into `out`, whoever writes them."""
    with contextlib.suppress(OSError):
        return sorted(out.parent.glob(f".{glob.escape(out.name)}{STAGING_MARK}*"))
    return []


def is_partial(path: Path) -> bool:
    return path.name.startswith(".") and STAGING_MARK in path.name


def is_stale(partial: Path) -> bool:
    """Whether nobody writes the staging directory `partial` any more: its writer's lock is
    free (the writer published, discarded, or died) and it is old enough to have taken it."""
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        age = time.time() - os.fstat(fd).st_ctime
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer holds it
        except OSError:
            return age > LOCKLESS_STALE_AGE_S
        return age > STALE_AGE_S
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a just-written range to disk without waiting (sync_file_range): a writer
    that syncs at the end then finds most of its data already written, instead of paying the
    whole write after its last byte."""
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def publish(staging: Path, out: Path, *, files_synced: bool = False) -> None:
    """Rename `staging` to `out` once its contents are on disk. `files_synced`: the caller
    fsync'ed every file it wrote, so only the directories are synced, not the whole host
    (`os.sync` flushes every dirty page of every file system, other work's too)."""
    if files_synced:
        for d in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    else:
        os.sync()  # the images must be on disk before the name says they are complete
    r = _libc.renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(out), _RENAME_NOREPLACE)
    if r != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise SnapshotExistsError(
                f"{out} appeared while the snapshot was written", hint="choose another --out"
            )
        raise OSError(err, os.strerror(err), str(out))
    _release(staging)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    _release(staging)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old file or the new one, never half.
    The file is private (0600): what fastvllm keeps beside a snapshot is the snapshot's owner's."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
