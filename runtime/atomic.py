"""Atomic publication of a directory: build it under a hidden sibling, rename it into place
with RENAME_NOREPLACE so an existing snapshot is never replaced and a reader sees all or nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path

from fastvllm.runtime.errors import SnapshotExistsError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

STAGING_MARK = ".partial-"


def staging_dir(out: Path) -> Path:
    """A private (0700) sibling of `out`, on the same filesystem so the final rename is atomic."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)  # mkdir's mode is filtered by the umask
    return tmp


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


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
