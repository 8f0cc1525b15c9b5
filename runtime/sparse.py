"""Where a file's data is: its runs of data with the holes left out (SEEK_DATA / SEEK_HOLE).

Why one place: a snapshot's /dev/shm copies are 0.4 GB files holding 0.1 MB of data, and three
things walk them (the copy back into /dev/shm, the checksum, the read-ahead); each reading the
holes cost a restore CPU and page cache for zeroes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of data in the first `size` bytes of the open file `fd`, in
    order. A file system that cannot tell (EINVAL) gets one run: the whole file is data."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno == errno.EINVAL:
                return [(0, size)] if size else []
            raise
        if data >= size:
            break
        end = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, end - data))
        pos = end
    return out


def file_extents(path: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(size, permission bits, runs of data) of the file at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        return st.st_size, st.st_mode & 0o777, data_extents(fd, st.st_size)
    finally:
        os.close(fd)
