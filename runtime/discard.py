"""Drop the contents of another process's shared memory where they do not matter, before a dump.

The GPU loader's staging buffers are pinned before a snapshot and kept in its image, so a
restored worker loads without pinning anything (weights.loader `keep_pool`). The CUDA driver
maps pinned host memory shared: anonymous shared memory in a process it started in
(`/dev/zero (deleted)` in /proc/PID/maps), memfds in a process CRIU restored (CRIU restores
shared memory into memfds). CRIU restores either by writing every page it dumped back into
a new memfd: for the 14 x 8 MiB of buffers that was 60-85 ms of CRIU's 0.15-0.23 s in a 3B
or 8B server's warm restore (the engine's restore is the tree's longest), and the bytes are
whatever the last load left there. Punching holes in those ranges after the CUDA checkpoint
(the driver holds no pin on them then) leaves CRIU nothing to dump or write back; the
restored buffers are empty pages the driver pins again on its restore, and the loader's
probe (`_probe`) still checks each one before a load uses it.

The holes are punched through `/proc/PID/map_files/`, which opens the very file a mapping maps
(root only; for anonymous shared memory, its shmem file), with `fallocate(PUNCH_HOLE)`; only
shared mappings of memfds and anonymous shared memory are touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps: [start, end), its offset in the file, shared or not, path."""

    start: int
    end: int
    offset: int
    shared: bool
    path: str

    @property
    def is_memfd(self) -> bool:
        return self.path.startswith("/memfd:")

    @property
    def is_shmem(self) -> bool:
        """Backed by a shmem file whose pages a hole drops: a memfd, or anonymous shared
        memory (`/dev/zero (deleted)`: the kernel names its shmem file so)."""
        return self.is_memfd or self.path == "/dev/zero (deleted)"


def parse_maps(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(
            Mapping(lo, hi, int(parts[2], 16), parts[1][3:4] == "s", parts[5] if len(parts) == 6 else "")
        )
    return out


def shmem_ranges(pid: int, ranges: Sequence[tuple[int, int]]) -> int:
    """Punch holes in the shared memory (memfds, anonymous shared memory) that `pid` maps
    shared over `ranges` ((address, bytes) pairs), so their pages are gone from the files.
    Returns the bytes punched; 0 where nothing could be (the process is gone, the ranges map
    something else, no permission): a dump then just carries those pages, as before."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = [m for m in parse_maps(f.read()) if m.shared and m.is_shmem]
    except OSError:
        return 0
    punched = 0
    for addr, size in ranges:
        for m in maps:
            lo, hi = max(m.start, addr), min(m.end, addr + size)
            if lo >= hi:
                continue
            with contextlib.suppress(OSError):
                fd = os.open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", os.O_RDWR)
                try:
                    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
                    if _fallocate(fd, mode, m.offset + (lo - m.start), hi - lo) == 0:
                        punched += hi - lo
                finally:
                    os.close(fd)
    return punched
