"""The files behind the PATH arguments of `fastvllm prefetch`, and clean errors about them.

Like vmtouch: a directory stands for every regular file below it. Every problem with a path
(missing, unreadable, unlistable) becomes a UsageError that names the path and the fix,
raised before any file is touched, so a typo never leaves half a directory warmed or locked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from fastvllm.runtime.errors import FastVLLMError, PermissionDeniedError, UsageError

_NO_ACCESS_HINT = "run as a user that may read it (e.g. with sudo), or grant access with chmod/chown"


def os_error(path: Path | str, e: OSError) -> FastVLLMError:
    """The user-facing error for an OSError on `path` (for callers that open files later)."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(f"permission denied: {path}", hint=_NO_ACCESS_HINT)
    if e.errno == errno.ENOENT:
        return UsageError(f"{path} does not exist", hint="check the path; was it moved or deleted?")
    return UsageError(f"cannot read {path}: {e.strerror or e}", hint="check the path and the filesystem")


def expand(paths: Iterable[Path | str]) -> list[Path]:
    """Regular files named by `paths`, each directory expanded recursively in sorted order.

    Symbolic links named on the command line are followed (the user asked for them); links
    found inside directories are not, which keeps a link cycle or a link to / from turning a
    directory walk into a crawl of the machine (vmtouch's default too). A file reached twice
    (a hard link, a path given twice) is listed once, so totals count its pages once.
    Sockets, FIFOs and devices are skipped: their "pages" are not a file's contents.
    """
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def add(p: Path, st: os.stat_result) -> None:
        if (st.st_dev, st.st_ino) in seen:
            return
        if not os.access(p, os.R_OK):
            raise PermissionDeniedError(f"permission denied: {p} cannot be read", hint=_NO_ACCESS_HINT)
        seen.add((st.st_dev, st.st_ino))
        out.append(p)

    for arg in paths:
        p = Path(arg)
        try:
            st = p.stat()
        except OSError as e:
            if e.errno == errno.ENOENT and p.is_symlink():
                raise UsageError(
                    f"{p} is a broken symbolic link", hint="point it at a file or drop it"
                ) from None
            raise os_error(p, e) from None
        if stat.S_ISREG(st.st_mode):
            add(p, st)
        elif stat.S_ISDIR(st.st_mode):
            _walk(p, add)
    return out


def _walk(root: Path, add: Callable[[Path, os.stat_result], None]) -> None:
    """Depth-first, entries sorted by name, so the order (and warm's priority) is stable."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDeniedError(
                f"permission denied: directory {root} cannot be listed", hint=_NO_ACCESS_HINT
            ) from None
        raise os_error(root, e) from None
    for entry in entries:
        p = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                _walk(p, add)
            elif entry.is_file(follow_symlinks=False):
                add(p, entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue  # removed while we walked: nothing to warm
