"""Warm files into the page cache, evict them, or lock them there (vmtouch -t, -e, -l).

Restore uses `warm` to read a snapshot's files ahead of the process that needs them, so it
takes an ordered list and reads the earliest-needed bytes first: every file is cut into
chunks, the chunks go into one queue in file order, and N threads take them from its head
(N chunks in flight, the order staying close to the order of need; on the disk measured,
one thread with the kernel's readahead was already the fastest, see DEFAULT_THREADS).
A caller can drop a file (`should_stop(path)`, checked per chunk: the loader has read it
already) or everything (`stop`).

Methods, all of which return only once the chunk is in the page cache:
- "read": pread into one reused buffer per thread (copies each byte once into that buffer).
- "populate": map the chunk read-only and MADV_POPULATE_READ it (Linux 5.14+): the kernel
  faults the pages in without a copy to user space; older kernels fall back to "read".
- "fadvise" / "readahead": posix_fadvise(WILLNEED) or readahead(2) submits the whole chunk's
  I/O at once, then a pread waits for it (and copies, as "read" does). Neither hint alone
  says when the data has arrived, and a warm that returns early would make GB/s a lie.
Every call here that blocks (pread, madvise, readahead) drops the GIL, so threads overlap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastvllm.prefetch.files import os_error
from fastvllm.prefetch.residency import _mapped, resident_pages
from fastvllm.runtime import sparse
from fastvllm.runtime.errors import FastVLLMError, UsageError
from fastvllm.runtime.memory import MADV_POPULATE_READ, advise
from fastvllm.runtime.units import human_bytes

METHODS = ("read", "populate", "fadvise", "readahead")
# One thread, "populate", 8 MiB chunks: on a disk the kernel's readahead already saturates,
# more threads only interleave its streams and cost CPU, and "populate" reads as fast as
# "read" without copying to user space, leaving the CPU to the restore running beside it. One
# thread also keeps the order of need exact. Faster storage (NVMe, deep queues) may want more
# threads: rerun `scripts/sweep_prefetch.py` there; `--threads` overrides. The sweep's figures:
# docs/decisions/prefetch-defaults.md.
DEFAULT_METHOD = "populate"
DEFAULT_THREADS = 1
DEFAULT_CHUNK = 8 << 20
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.readahead.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_size_t]
_libc.readahead.restype = ctypes.c_ssize_t
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class WarmStats:
    bytes: int
    seconds: float
    files: int
    method: str
    threads: int
    chunk: int
    stopped: list[Path] = field(default_factory=list)  # files whose warming was stopped early
    skipped_bytes: int = 0  # bytes of those files (and after `stop`) left unread
    hole_bytes: int = 0  # holes of sparse files: nothing on disk, so never read

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def as_dict(self) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "seconds": self.seconds,
            "gbps": self.gbps,
            "files": self.files,
            "method": self.method,
            "threads": self.threads,
            "chunk": self.chunk,
            "stopped": [str(p) for p in self.stopped],
            "skipped_bytes": self.skipped_bytes,
            "hole_bytes": self.hole_bytes,
        }


class _Reader:
    """One thread's state: the file it has open and its reused buffer."""

    def __init__(self, method: str, chunk: int, fallback: threading.Event) -> None:
        self.method = method
        self.buf = memoryview(bytearray(chunk)) if method != "populate" else None
        self.fallback = fallback  # set once MADV_POPULATE_READ proves unsupported (EINVAL)
        self.path: Path | None = None
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.path = -1, None

    def warm(self, path: Path, offset: int, length: int, exact: bool = False) -> int:
        """Bring [offset, offset + length) of `path` in. `exact`: not a byte more (a run of data
        followed by a hole, see `warm`)."""
        if path != self.path:
            self.close()
            self.fd, self.path = os.open(path, os.O_RDONLY | os.O_CLOEXEC), path
            if exact:  # reads (the fallback too) then fetch what they ask, no read-ahead window
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        if exact and self.method in ("populate", "read"):  # the other two queue the run themselves
            # one request for the run; the random hints only stop the kernel reading past it
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        if self.method == "populate" and not self.fallback.is_set():
            try:
                with _mapped(self.fd, offset, length, path) as addr:
                    if exact:
                        advise(addr, length, mmap.MADV_RANDOM)
                    advise(addr, length, MADV_POPULATE_READ)
                return length
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.fallback.set()  # kernel older than 5.14: read instead, from now on
        if self.method == "fadvise":
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        elif self.method == "readahead" and _libc.readahead(self.fd, offset, length) < 0:
            raise OSError(ctypes.get_errno(), f"readahead of {path} failed")
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> int:
        if self.buf is None:
            self.buf = memoryview(bytearray(length))
        done = 0
        while done < length:
            n = os.preadv(self.fd, [self.buf[: length - done]], offset + done)
            if n == 0:
                break  # the file shrank since we listed it
            done += n
        return done


def _check(method: str, threads: int, chunk: int) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown warm method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if threads < 1:
        raise UsageError(f"{threads} threads: need at least 1", hint=f"e.g. {DEFAULT_THREADS}")
    if chunk <= 0 or chunk % PAGE:
        raise UsageError(
            f"chunk size {chunk} is not a positive multiple of the page size ({PAGE})",
            hint=f"e.g. {DEFAULT_CHUNK >> 20} MiB",
        )


def warm(
    paths: Sequence[Path],
    *,
    method: str | None = None,
    threads: int | None = None,
    chunk: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    should_stop: Callable[[Path], bool] | None = None,
    stop: threading.Event | None = None,
) -> WarmStats:
    """Read `paths` (regular files, see `files.expand`) into the page cache, earlier files first.

    `on_bytes(n)` is called from the reader threads after each chunk. `should_stop(path)` is
    called before each chunk of `path` (from reader threads: keep it cheap and thread-safe);
    once it returns True the rest of that file is skipped. Setting `stop` skips everything
    left. Either way the stats say what was skipped."""
    method = method or DEFAULT_METHOD
    threads = threads or DEFAULT_THREADS
    chunk = chunk or DEFAULT_CHUNK
    _check(method, threads, chunk)
    work: list[tuple[Path, int, int, bool]] = []
    holes = 0
    for p in paths:
        try:
            # only the runs of data: holes have nothing to read, and warming them fills the
            # page cache with zeroes
            size, _, extents = sparse.file_extents(Path(p))
        except OSError as e:
            raise os_error(p, e) from None
        hole = size - sum(n for _, n in extents)
        holes += hole
        # In a file with holes, each run is read exactly: the kernel's read-around of a fault
        # (read_ahead_kb) would zero-fill the hole behind every run, filling the page cache with
        # zeroes for a restore's sparse /dev/shm copies (docs/decisions/prefetch-defaults.md).
        for start, n in extents:
            offsets = range(start, start + n, chunk)
            work += [(Path(p), off, min(chunk, start + n - off), hole > 0) for off in offsets]

    stats = WarmStats(0, 0.0, len(paths), method, threads, chunk, hole_bytes=holes)
    lock = threading.Lock()
    cursor = 0
    stopped: set[Path] = set()
    abort = threading.Event()
    errors: list[tuple[Path, OSError | FastVLLMError]] = []
    fallback = threading.Event()

    def take() -> tuple[Path, int, int, bool] | None:
        nonlocal cursor
        with lock:
            while cursor < len(work):
                item = work[cursor]
                cursor += 1
                path = item[0]
                if abort.is_set() or (stop is not None and stop.is_set()):
                    stats.skipped_bytes += item[2]
                    continue
                if path in stopped or (should_stop is not None and should_stop(path)):
                    stopped.add(path)
                    stats.skipped_bytes += item[2]
                    continue
                return item
            return None

    def run() -> None:
        reader = _Reader(method, chunk, fallback)
        try:
            while (item := take()) is not None:
                path, off, length, exact = item
                try:
                    n = reader.warm(path, off, length, exact)
                except (OSError, FastVLLMError) as e:
                    with lock:
                        errors.append((path, e))
                    abort.set()
                    return
                with lock:
                    stats.bytes += n
                if on_bytes is not None:
                    on_bytes(n)
        finally:
            reader.close()

    t0 = time.perf_counter()
    workers = [threading.Thread(target=run, name=f"warm-{i}", daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            while w.is_alive():
                w.join(0.2)  # short joins keep the main thread responsive to Ctrl-C
    except BaseException:
        abort.set()
        for w in workers:
            w.join()
        raise
    stats.seconds = time.perf_counter() - t0
    stats.stopped = [p for p in dict.fromkeys(w[0] for w in work) if p in stopped]
    if fallback.is_set():
        stats.method = "read"  # what actually ran: MADV_POPULATE_READ is not supported here
    if errors:
        path, err = errors[0]
        raise err if isinstance(err, FastVLLMError) else os_error(path, err)
    return stats


def evict(paths: Sequence[Path]) -> int:
    """Drop `paths` from the page cache (posix_fadvise DONTNEED); returns the bytes evicted
    (pages that were resident before and are not after, times the page size, like vmtouch -e).

    Dirty pages are written back first (fdatasync): DONTNEED skips dirty pages, and a file
    just written would otherwise stay cached. Pages some process has mapped (a running
    server's weights, `fastvllm prefetch lock`) stay: the kernel will not drop them."""
    evicted = 0
    for p in paths:
        try:
            before, _ = resident_pages(p)
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if before:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            after, _ = resident_pages(p) if before else (0, 0)
        except OSError as e:
            raise os_error(p, e) from None
        evicted += max(0, before - after) * PAGE
    return evicted


# ---- lock -------------------------------------------------------------------------------


def default_budget() -> int:
    """Half the memory available now: enough to pin a model's files, and locking more would
    leave the rest of the machine to swap or the OOM killer."""
    import psutil  # (~10 ms: not imported on a restore's path)

    return psutil.virtual_memory().available // 2


def locked_bytes(paths: Sequence[Path]) -> int:
    """What locking `paths` pins: whole pages, the last partial page of each file included."""
    total = 0
    for p in paths:
        try:
            total += (os.stat(p).st_size + PAGE - 1) // PAGE * PAGE
        except OSError as e:
            raise os_error(p, e) from None
    return total


def check_budget(paths: Sequence[Path], budget: int) -> int:
    """Raise before anything is read or locked if `paths` do not fit in `budget`; returns the
    bytes they need."""
    total = locked_bytes(paths)
    if total > budget:
        raise UsageError(
            f"locking {len(paths)} files needs {human_bytes(total)}, "
            f"over the budget of {human_bytes(budget)}",
            hint=f"raise it, e.g. --budget {-(-total // (1 << 30))}G, or name fewer files",
        )
    return total


class Locked:
    """Files mapped and mlock'ed: their pages stay in RAM until `close()` (or the with block
    ends, or the process exits)."""

    def __init__(self, paths: list[Path], nbytes: int, stack: contextlib.ExitStack) -> None:
        self.paths = paths
        self.bytes = nbytes
        self._stack = stack

    def close(self) -> None:
        self._stack.close()  # munmap also unlocks

    def __enter__(self) -> Locked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mlock_error(path: Path, err: int, total: int) -> FastVLLMError:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else human_bytes(soft)
    what = os.strerror(err)
    return UsageError(
        f"mlock of {path} failed ({what}): locking {human_bytes(total)} needs RLIMIT_MEMLOCK "
        f"(now {limit}) and that much free memory",
        hint="raise the limit (ulimit -l unlimited, or LimitMEMLOCK=infinity in a systemd unit), "
        "run as root, or lock fewer files",
    )


def lock(paths: Sequence[Path], budget: int | None = None) -> Locked:
    """mmap and mlock every file (reading in what is not resident). The budget is checked
    first, so nothing is locked when the total would not fit; if any mlock fails, every file
    locked so far is released before the error is raised."""
    files = [Path(p) for p in paths]
    total = check_budget(files, default_budget() if budget is None else budget)
    stack = contextlib.ExitStack()
    try:
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    size = os.fstat(fd).st_size
                    if size == 0:
                        continue  # nothing to lock, and mmap of 0 bytes is an error
                    addr = stack.enter_context(_mapped(fd, 0, size, p))
                finally:
                    os.close(fd)  # the mapping keeps the file
            except OSError as e:
                raise os_error(p, e) from None
            if _libc.mlock(addr, size) != 0:
                err = ctypes.get_errno()
                if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
                    raise _mlock_error(p, err, total)
                raise os_error(p, OSError(err, os.strerror(err)))
    except BaseException:
        stack.close()
        raise
    return Locked(files, total, stack)
