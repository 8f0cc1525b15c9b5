"""How much of a file is in the page cache, from mincore(2) over a read-only mapping.

The weight loader asks this to choose O_DIRECT (file cold: skip the page cache's copy) or
buffered reads (file warm: the page cache is the fastest source there is); `fastvllm prefetch
status` shows it per file. Hand-written over ctypes because no maintained library exposes
mincore; it is a few lines. Pages are counted exactly as vmtouch counts them (pages of
sysconf(PAGESIZE), a partial last page counts, bit 0 of mincore's byte), so the two agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastvllm.prefetch.files import os_error

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# Map at most this much at a time so a huge file never needs one huge virtual range.
_WINDOW = 1 << 30


@contextlib.contextmanager
def _mapped(fd: int, start: int, length: int, path: Path | str) -> Iterator[int]:
    """A read-only shared mapping of part of the file: its address, unmapped on exit."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    try:
        yield addr
    finally:
        _libc.munmap(addr, length)


def _incore(addr: int, length: int, path: Path | str) -> Any:
    """mincore over [addr, addr + length): one byte a page, bit 0 set when resident."""
    vec = (ctypes.c_ubyte * ((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    if _libc.mincore(addr, length, vec) != 0:
        raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
    return vec


# mincore's bytes with bit 0 set (the others are reserved): deleting them from a copy of the
# vector and comparing lengths counts resident pages in one pass of C, as fast as numpy's
# `(v & 1).sum()` and without importing numpy on the restore path.
_RESIDENT_BYTES = bytes(range(1, 256, 2))


def _count_resident(vec: Any) -> int:
    raw = bytes(vec)
    return len(raw) - len(raw.translate(None, _RESIDENT_BYTES))


# mincore's bytes to 1 (resident) or 0, through bytes.translate
_FLAG = bytes(b & 1 for b in range(256))


def page_map(path: Path | str) -> bytes:
    """One byte a page of `path`: 1 where that page is in the page cache, else 0 (count zeros
    in a slice to ask about a range)."""
    out = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start in range(0, size, _WINDOW):
            length = min(_WINDOW, size - start)
            with _mapped(fd, start, length, path) as addr:
                out += bytes(_incore(addr, length, path)).translate(_FLAG)
        return bytes(out)
    finally:
        os.close(fd)


def all_cached(pages: bytes, offset: int, length: int) -> bool:
    """Whether `page_map`'s answer has every page of [offset, offset + length) in the cache."""
    first, end = offset // mmap.PAGESIZE, -(-(offset + length) // mmap.PAGESIZE)
    return end <= len(pages) and pages.count(0, first, end) == 0


def resident_pages(path: Path | str) -> tuple[int, int]:
    """(pages in the page cache, pages in the file) for `path`."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        resident = 0
        for start in range(0, size, _WINDOW):
            length = min(_WINDOW, size - start)
            with _mapped(fd, start, length, path) as addr:
                vec = _incore(addr, length, path)
                resident += _count_resident(vec)
        return resident, (size + page - 1) // page
    finally:
        os.close(fd)


def sampled_fraction(path: Path | str, samples: int = 256) -> float:
    """Estimate of `resident_fraction` from `samples` pages spread evenly over the file: a
    decision (O_DIRECT or not) needs a share, not an exact count, and asking mincore about
    every page of a multi-GB file costs a noticeable part of a load
    (docs/decisions/pinned-pool.md)."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        total = (size + page - 1) // page
        if total <= samples:
            return resident_fraction(path)
        with _mapped(fd, 0, size, path) as addr:
            hits = 0
            for i in range(samples):
                pg = (2 * i + 1) * total // (2 * samples)
                hits += _incore(addr + pg * page, page, path)[0] & 1
            return hits / samples
    finally:
        os.close(fd)


def resident_fraction(path: Path | str) -> float:
    """Share of the file's pages in the page cache, 0.0 to 1.0 (1.0 for an empty file)."""
    resident, total = resident_pages(path)
    return resident / total if total else 1.0


@dataclass(frozen=True)
class FileResidency:
    path: Path
    bytes: int
    resident_pages: int
    pages: int  # ceil(bytes / page size): vmtouch's count

    @property
    def fraction(self) -> float:
        return self.resident_pages / self.pages if self.pages else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "resident_pages": self.resident_pages,
            "pages": self.pages,
            "fraction": self.fraction,
        }


def of_files(paths: Iterable[Path]) -> list[FileResidency]:
    """Residency of each file (see `prefetch.files.expand`); an unreadable or vanished file is a
    UsageError naming it, not an OSError."""
    res = []
    for p in paths:
        try:
            resident, pages = resident_pages(p)
            size = os.stat(p).st_size
        except OSError as e:
            raise os_error(p, e) from None
        res.append(FileResidency(Path(p), size, resident, pages))
    return res


COLD_BELOW = 0.5  # below this share of sampled pages in the page cache, a file counts as cold


CACHED_FROM = 0.95  # from this share of sampled pages in the page cache on, a file counts as cached


def is_cached(path: Path | str, at_least: float = CACHED_FROM) -> bool:
    """Is (nearly) all of the file in the page cache (by `sampled_fraction`)? A restore reads
    no file ahead that is cached and needs no checksum: reading it again only takes the CPU and
    the memory bus from CRIU and the CUDA restore. False when the file cannot be mapped."""
    try:
        return sampled_fraction(path) >= at_least
    except OSError:
        return False


def is_cold(path: Path | str, below: float = COLD_BELOW, *, if_unreadable: bool = True) -> bool:
    """Is less than `below` of the file in the page cache (by `sampled_fraction`)? The one
    test the loader (O_DIRECT or not, populate or not) and the restore (hold the weight file
    back or not) share; `if_unreadable` answers when the file cannot be mapped."""
    try:
        return sampled_fraction(path) < below
    except OSError:
        return if_unreadable


class Sampled:
    """`is_cached` and `is_cold` of the files under `root`, each file sampled once: a restore
    asks about its page images and weight files several times within milliseconds (whether to
    start the hot-set reader, which files to read ahead, which page images are cold), before
    CRIU may start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._got: dict[str, float | None] = {}

    def fraction(self, rel: str) -> float | None:
        """The sampled share in the page cache of `root/rel`; None where it cannot be mapped."""
        if rel not in self._got:
            try:
                self._got[rel] = sampled_fraction(self.root / rel)
            except OSError:
                self._got[rel] = None
        return self._got[rel]

    def is_cached(self, rel: str) -> bool:
        f = self.fraction(rel)
        return f is not None and f >= CACHED_FROM

    def is_cold(self, rel: str) -> bool:
        f = self.fraction(rel)
        return f is None or f < COLD_BELOW
