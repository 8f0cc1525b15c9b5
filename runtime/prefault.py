"""Map another process's pages in from outside, while it is about to read them.

A GPU snapshot restored in mmap mode holds the CUDA checkpoint's host copy of device memory as
a private mapping of its page image: the driver's `cuCheckpointProcessRestore` then takes a
page fault for every page it copies back to the device, and the engine's CUDA restore runs
0.1-0.15 s longer than the same restore in place (docs/benchmarks/gpu-restore.md). Mapping
those pages in beforehand cost as much as it saved; mapping them in *while* the driver starts
its restore (its context and device allocations come first) takes the faults off its path.

`process_vm_readv` of one byte per 64 KiB does it: each read faults a page into the target's
page tables, and the kernel's fault-around maps the cached pages of its 64 KiB window with it
(`fault_around_bytes`; nothing is copied but the byte). Reading every page instead took ten
times as long (0.15 s against 0.014 s a GB on the 2-core machine, where the process's own
faults took 0.027 s). The call releases the GIL, and the threads take the range in ascending
chunks, the order the driver copies in. A page fault-around did not map is faulted by its
reader as before: this only ever saves faults. Nothing here changes the target's memory; an
address that cannot be read (the driver unmapped the copy already, the process exited) is
skipped, never an error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK_BYTES = 8 << 20  # what a thread takes at a time: the ranges are faulted in ascending order
STRIDE = 64 << 10  # one read per fault-around window (the kernel's default fault_around_bytes)
_IOV_MAX = 1024  # remote iovecs per call (the kernel's UIO_MAXIOV)
_ONES = array("Q", [1]) * _IOV_MAX

_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.process_vm_readv
_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_readv.restype = ctypes.c_ssize_t


@dataclass
class Stats:
    """What one `populate` did: the reads (one per STRIDE), those that failed, its seconds."""

    reads: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped: bool = False  # `stop` was set before every chunk was done

    def as_dict(self) -> dict[str, object]:
        return {
            "reads": self.reads,
            "failed": self.failed,
            "seconds": round(self.seconds, 4),
            "stopped": self.stopped,
        }


def _chunks(ranges: Sequence[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    for lo, hi in sorted(ranges):
        lo -= lo % PAGE
        for a in range(lo, hi, size):
            yield a, min(a + size, hi)


def touch(pid: int, lo: int, hi: int, stride: int = STRIDE) -> tuple[int, int]:
    """Fault [lo, hi) of `pid` in by reading one byte every `stride` bytes (a multiple of the
    page size). Returns (reads done, reads that failed); stops early where the process is gone."""
    sink = ctypes.create_string_buffer(_IOV_MAX)
    local = (ctypes.c_ulong * 2)(ctypes.addressof(sink), 0)
    done = failed = 0
    addr = lo - lo % PAGE
    while addr < hi:
        n = min(_IOV_MAX, (hi - addr + stride - 1) // stride)
        remote = array("Q", bytes(16 * n))
        remote[0::2] = array("Q", range(addr, addr + n * stride, stride))
        remote[1::2] = _ONES[:n]
        local[1] = n
        got = _readv(pid, ctypes.addressof(local), 1, remote.buffer_info()[0], n, 0)
        if got < 0:
            if ctypes.get_errno() in (errno.ESRCH, errno.EPERM):
                return done, failed + (hi - addr + stride - 1) // stride
            got = 0  # EFAULT: the first address of this call is not readable
        done += got
        addr += got * stride
        if got < n:  # the address at addr is not readable: skip it
            failed += 1
            addr += stride
    return done, failed


def populate(
    pid: int,
    ranges: Sequence[tuple[int, int]],
    *,
    threads: int,
    stop: threading.Event | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Stats:
    """Fault `ranges` ([start, end) addresses) of `pid` in with `threads` threads, in ascending
    chunks, until done or `stop` is set. Blocks; run it on a thread of its own beside the work
    that reads the pages (see `Populating`)."""
    stats = Stats()
    todo = _chunks(ranges, chunk_bytes)
    lock = threading.Lock()
    t0 = time.perf_counter()

    def work() -> None:
        while stop is None or not stop.is_set():
            with lock:
                nxt = next(todo, None)
            if nxt is None:
                return
            done, failed = touch(pid, *nxt)
            with lock:
                stats.reads += done
                stats.failed += failed
        stats.stopped = True

    workers = [
        threading.Thread(target=work, name=f"prefault-{i}", daemon=True) for i in range(max(1, threads))
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats.seconds = time.perf_counter() - t0
    return stats


class Populating:
    """`populate` on a thread of its own for the length of a `with` block: leaving the block
    stops what is left (the reader it was ahead of has finished) and waits for the threads."""

    def __init__(self, targets: dict[int, list[tuple[int, int]]], threads: int) -> None:
        self._stop = threading.Event()
        self.stats: dict[int, Stats] = {}
        self._runners = [
            threading.Thread(target=self._one, args=(pid, r, threads), name=f"prefault-{pid}", daemon=True)
            for pid, r in targets.items()
            if r and threads > 0
        ]

    def _one(self, pid: int, ranges: list[tuple[int, int]], threads: int) -> None:
        self.stats[pid] = populate(pid, ranges, threads=threads, stop=self._stop)

    def __enter__(self) -> Populating:
        for r in self._runners:
            r.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for r in self._runners:
            r.join()

    def as_dict(self) -> dict[str, object]:
        return {str(pid): s.as_dict() for pid, s in self.stats.items()}
