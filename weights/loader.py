"""Loads a flat weight file into live tensors, on CPU or GPU, as fast as the machine allows.

Hand-written rather than a library because the point is to skip what every public loader does
on the way: intermediate buffers (CPU), serialised read-then-copy (GPU), page-cache copies of
a cold file.

- CPU targets: N threads preadv each chunk straight into the destination tensor's memory (no
  staging copy). Where a chunk's destination is page-aligned and the file is cold, the read
  uses O_DIRECT; otherwise buffered reads (the page cache is the fastest source when warm).
- GPU targets: N reader threads fill a pool of pinned host buffers (at least two) with
  contiguous spans of the file; the calling thread issues asynchronous host-to-device copies
  of each span's pieces on a side stream, and a buffer goes back to the pool once its copy's
  event has completed. Reads and copies overlap (double buffering, deeper when more buffers).
  The vLLM worker pins its pool before a snapshot (`keep_pool`), so a restored worker's load
  starts with every buffer ready: pinning them at load time (about 2.5 GB/s) left the first
  tens of milliseconds of a restore's load to two buffers, at a third of the bound.
- Fresh CPU tensors (`load`, mode "map"): the file is mapped copy-on-write and the tensors are
  views of it; N threads fault the mapping in with MADV_POPULATE_READ (the page cache's own
  pages, read from disk in parallel where they are missing). Nothing is copied, the memory is
  shared with every other process mapping the same file, and a write to a tensor copies just
  that page. This is what safetensors does on CPU, but populated eagerly and in parallel.
- O_DIRECT or not: decided from the file's page-cache residency (`prefetch.residency`) unless
  the caller says. Cold: O_DIRECT skips the kernel's copy into the page cache, except for the
  ranges already in it (a restore reads the file's head ahead while the CUDA restore runs):
  those are read buffered, not again from the disk. Warm: buffered.

Every shape, dtype and name is checked, and the file's size against its index, before the
first byte is written into a destination: a wrong file never leaves a half-loaded model.
The defaults (threads, chunk, buffers) come from `scripts/sweep_loader.py` sweeps and fresh-process
measurements on GPU machines (docs/decisions/pinned-pool.md).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import xxhash
from fastvllm.prefetch import residency
from fastvllm.runtime import config
from fastvllm.runtime.errors import IntegrityError, UsageError
from fastvllm.runtime.memory import (
    HUGE_PAGE,
    MADV_HUGEPAGE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    advise,
    advise_interior,
)
from fastvllm.runtime.modes import LoadMode
from fastvllm.weights import fileformat

# 8 MiB reads: smaller ones cost a request each, larger ones leave the copies idle longer.
# At most 10 threads in a fresh process: more readers starve the thread that issues the
# host-to-device copies of a core (a restore's reload asks for its own count: restore/pipeline.py).
# Threads + 4 pinned buffers, not more: pinning costs about as much as copying the bytes it
# pins. The sweeps behind these are in docs/decisions/pinned-pool.md.
DEFAULT_THREADS = min(10, os.cpu_count() or 4)
DEFAULT_CHUNK = 8 << 20
EXTRA_BUFFERS = 4  # pinned buffers beyond one per reader thread
# Pinned buffers allocated before the first read; the rest are allocated while reads run
# (cudaHostAlloc costs about as much as copying the bytes it pins).
_FIRST_BUFFERS = 2
# Below this share of resident pages the file counts as cold and O_DIRECT is used.
COLD_BELOW = residency.COLD_BELOW
_DIRECT_ALIGN = 4096


class PipelineHalf(enum.StrEnum):
    """One half of the GPU pipeline run alone, to measure what bounds the whole: READS fills
    the staging buffers and copies nothing (the weights stay as they were), COPIES copies the
    buffers as they are without reading (the weights are left wrong: for a server that is
    stopped afterwards, as the GPU bench's sweep does)."""

    READS = "reads"
    COPIES = "copies"


@dataclass(frozen=True)
class CopyTuning:
    """How the GPU pipeline's threads share the cores (runtime/config.py documents both):
    whether the thread handing buffers back sleeps on each copy's event or spins on it, and the
    readers' nice value. Both decide whether the thread issuing the copies gets a core when it
    wakes, with one reader per core or more (docs/decisions/pinned-pool.md). `only` runs one
    half of the pipeline, for measurements; `reads` says how the readers take a warm file's
    bytes (`_MappedFile`)."""

    wait: config.CopyWait = config.CopyWait.SPIN
    reader_nice: int = 0  # added to the caller's nice value, up to 19
    only: PipelineHalf | None = None
    reads: config.LoaderReads = config.LoaderReads.PREAD  # warm files only; a cold one is read


@dataclass
class LoadStats:
    bytes: int
    seconds: float
    tensors: int
    direct: bool = False
    device: str = "cpu"
    pin_s: float = 0.0  # time spent allocating pinned buffers (GPU targets)
    mapped: bool = False  # CPU tensors are copy-on-write views of the file (mode "map")
    # GPU targets: "kept" (the buffers pinned before the snapshot, `keep_pool`) or "fresh",
    # with the reason the kept ones were not used
    pool: str = ""
    # GPU targets, where the pipeline waits: the copying thread for reads to finish (the reads
    # are behind), and the readers, on average, for a free pinned buffer (the copies are behind)
    wait_reads_s: float = 0.0
    wait_buffers_s: float = 0.0
    # GPU targets, the fixed costs a short load cannot hide: from the pipeline's start to its
    # first copy issued (threads, probe, first read), and from its last copy issued to the end
    # of all copies
    first_copy_s: float = 0.0
    drain_s: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def check_compatible(idx: fileformat.Index, targets: dict[str, Any], path: Path) -> None:
    """Raise before any write if `targets` is not exactly the model the file holds."""
    entries = idx.by_name()
    missing = sorted(set(targets) - set(entries))
    extra = sorted(set(entries) - set(targets))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
        raise UsageError(
            f"weight file {path} does not match this model: it {what}",
            hint="it was dumped from another model; re-dump the weights",
        )
    devices = set()
    for name, t in targets.items():
        e = entries[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != e.shape or dtype != e.dtype:
            raise UsageError(
                f"weight {name}: file has {e.dtype}{e.shape}, model has {dtype}{list(t.shape)}",
                hint="the file belongs to another model or configuration; re-dump the weights",
            )
        devices.add(t.device.type)
    if len(devices) > 1:
        raise UsageError(
            f"targets are on several devices ({sorted(devices)})", hint="load one device at a time"
        )


def choose_direct(path: Path, direct: bool | None) -> bool:
    """O_DIRECT when asked, else when less than COLD_BELOW of the file is in the page cache."""
    if direct is not None:
        return direct
    return residency.is_cold(path, COLD_BELOW, if_unreadable=False)


def _sources(path: Path, fd: int, dfd: int | None) -> Callable[[int, int], int]:
    """Which descriptor reads [offset, offset + length): with O_DIRECT (`dfd`), a range already
    in the page cache (a restore's read-ahead read the file's head while the CUDA restore ran)
    is read from there rather than again from the disk; the residency is asked once."""
    if dfd is None:
        return lambda _off, _n: fd
    try:
        pages = residency.page_map(path)
    except OSError:
        return lambda _off, _n: dfd
    return lambda off, n: fd if residency.all_cached(pages, off, n) else dfd


def _open_direct(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # tmpfs and some overlay filesystems refuse O_DIRECT
        return None


def prefer_huge_pages(ptr: int, nbytes: int) -> None:
    """Ask for transparent huge pages over a destination's 2 MiB-aligned interior before its
    first write: otherwise every 4 KiB page faults in on its own inside preadv, and the faults,
    not the reads, bound a CPU load where the THP mode is madvise
    (docs/decisions/pinned-pool.md). A hint: where THP is off it does nothing."""
    with contextlib.suppress(OSError):  # kernels without THP refuse the advice
        advise_interior(ptr, nbytes, MADV_HUGEPAGE, HUGE_PAGE)


class _MappedFile:
    """The weight file mapped read-only, copied out of by address: the readers' alternative to
    preadv (config.LoaderReads.MAPPED). glibc's memmove streams copies this large past the CPU
    caches, where the kernel's copy out of the page cache first reads each destination line; on a
    host whose memory the device's copies also load, that may be a third less traffic
    (docs/decisions/pinned-pool.md). Faulting the mapping in costs a page-table entry per page."""

    def __init__(self, path: Path) -> None:
        import mmap
        import warnings

        import torch

        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self._mm: Any = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        finally:
            os.close(fd)
        self.path = path
        self._view: Any = None
        self.base = 0
        if self._mm is not None:
            with warnings.catch_warnings():  # torch warns of a read-only buffer: nothing writes it
                warnings.simplefilter("ignore")
                self._view = torch.frombuffer(self._mm, dtype=torch.uint8)
            self.base = self._view.data_ptr()

    def copy(self, dst: int, off: int, n: int) -> None:
        """[off, off + n) of the file to address `dst`."""
        import ctypes

        if off + n > self.size:  # a mapping read past its end is a SIGBUS, not an error
            raise IntegrityError(f"weight file {self.path} ended early", hint="re-dump the weights")
        ctypes.memmove(dst, self.base + off, n)

    def close(self) -> None:
        self._view = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()


def _read_exact(fd: int, buf: memoryview, off: int, path: Path) -> None:
    done = 0
    while done < buf.nbytes:
        n = os.preadv(fd, [buf[done:]], off + done)
        if n == 0:
            raise IntegrityError(f"weight file {path} ended early", hint="re-dump the weights")
        done += n


def load(
    path: Path | str,
    device: str = "cpu",
    *,
    threads: int = DEFAULT_THREADS,
    chunk: int = DEFAULT_CHUNK,
    buffers: int | None = None,
    direct: bool | None = None,
    verify: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    mode: LoadMode | str = LoadMode.AUTO,
) -> tuple[dict[str, Any], LoadStats]:
    """Allocate every tensor of the file on `device` and fill it (the benchmark's entry point).

    All tensors are views into one allocation laid out like the file's data region (one
    cudaMalloc instead of hundreds; offsets are 4 KiB-aligned, so every dtype's view is
    aligned). Allocation is inside the timed region: a caller loading a fresh model pays for it.
    `mode` (runtime.modes.LoadMode, or its value): "copy" reads into private memory; "map" (CPU
    only) makes the tensors copy-on-write views of the file, populated before returning; "auto"
    maps on CPU and copies on GPU."""
    import torch

    path = Path(path)
    try:
        mode = LoadMode(mode)
    except ValueError:
        raise UsageError(f"unknown load mode {mode!r}", hint="use " + ", ".join(LoadMode)) from None
    on_cpu = torch.device(device).type == "cpu"
    if mode is LoadMode.MAP and not on_cpu:
        raise UsageError(f"mode 'map' loads into CPU memory, not {device}", hint="use --mode copy or auto")
    t0 = time.perf_counter()
    idx = fileformat.read_index(path)
    if on_cpu and mode is not LoadMode.COPY:
        out, stats = _load_mapped(path, idx, threads=threads, chunk=chunk, verify=verify, on_bytes=on_bytes)
        stats.seconds = time.perf_counter() - t0
        return out, stats
    span = max((e.offset + e.nbytes for e in idx.tensors if e.alias_of is None), default=0)
    if not on_cpu:
        if chunk <= 0 or chunk % _DIRECT_ALIGN:
            raise UsageError(f"chunk size {chunk} is not a positive multiple of 4096", hint="use e.g. 8 MiB")
        if verify:
            verify_tensors(path, idx, threads)
        arena, stats = _load_arena_gpu(path, idx, span, device, threads, chunk, buffers, direct, on_bytes)
        stats.seconds = time.perf_counter() - t0
        return _views(idx, arena, device), stats
    arena = torch.empty(span, dtype=torch.uint8, device=device)
    if span:
        prefer_huge_pages(arena.data_ptr(), span)
    out = _views(idx, arena, device)
    stats = load_into(
        path,
        out,
        threads=threads,
        chunk=chunk,
        buffers=buffers,
        direct=direct,
        verify=verify,
        on_bytes=on_bytes,
        _idx=idx,
    )
    stats.seconds = time.perf_counter() - t0
    return out, stats


def _views(idx: fileformat.Index, arena: Any, device: str) -> dict[str, Any]:
    """Every tensor of the file as a view into `arena`, laid out like the file's data region."""
    import torch

    out: dict[str, Any] = {}
    for e in idx.tensors:
        dtype = getattr(torch, e.dtype)
        if e.alias_of is not None:
            out[e.name] = out[e.alias_of]
        elif not e.nbytes:
            out[e.name] = torch.empty(e.shape, dtype=dtype, device=device)
        else:
            out[e.name] = arena[e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
    return out


def _load_arena_gpu(
    path: Path,
    idx: fileformat.Index,
    nbytes: int,
    device: str,
    threads: int,
    chunk: int,
    buffers: int | None,
    direct: bool | None,
    on_bytes: Callable[[int], None] | None,
) -> tuple[Any, LoadStats]:
    """A fresh GPU arena filled with one copy per read: the arena is laid out like the file,
    so a span needs no splitting into tensors. The arena is allocated while the first reads
    run, so cudaMalloc's cost hides behind them."""
    import torch

    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device(dev.type, torch.cuda.current_device())
    use_direct = choose_direct(path, direct)
    spans = _arena_spans(idx, nbytes, chunk)
    holder: list[Any] = []

    def allocate() -> None:
        arena = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        for sp in spans:
            sp.pieces[0].dst = arena
        holder.append(arena)

    t0 = time.perf_counter()
    if not spans:
        allocate()
        return holder[0], LoadStats(0, 0.0, len(idx.tensors), use_direct, dev.type)
    nbuf = pool_size(threads, buffers)
    st = _stream_to_gpu(path, spans, dev, threads, chunk, nbuf, use_direct, on_bytes, allocate)
    seconds = time.perf_counter() - t0
    return holder[0], replace(
        st, seconds=seconds, tensors=len(idx.tensors), direct=use_direct, device=dev.type
    )


def _load_mapped(
    path: Path,
    idx: fileformat.Index,
    *,
    threads: int,
    chunk: int,
    verify: bool,
    on_bytes: Callable[[int], None] | None,
) -> tuple[dict[str, Any], LoadStats]:
    """CPU tensors as copy-on-write views of the file. Where part of the file is not in the page
    cache, `threads` fault the mapping in (MADV_POPULATE_READ), which reads the disk in parallel.
    A file wholly in the page cache is left to fault in on first touch, 16 pages a fault: filling
    the page tables up front costs more than the first touches it saves
    (docs/decisions/pinned-pool.md), so warm it is the same mapping safetensors hands out."""
    import mmap

    import torch

    if verify:
        verify_tensors(path, idx, threads)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != idx.file_size:  # changed since its index was read
            raise IntegrityError(f"weight file {path} changed while loading", hint="load it again")
        # ACCESS_COPY = MAP_PRIVATE, writable: a tensor written to gets its own copy of the page.
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
    finally:
        os.close(fd)
    out: dict[str, Any] = {}
    if mm is None:
        return out, LoadStats(0, 0.0, 0, device="cpu", mapped=True)
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # holds `mm` open as long as a view lives
    base = whole.data_ptr()
    start, end = idx.data_offset, idx.file_size
    ranges = [(a, min(chunk, end - a)) for a in range(start, end, chunk)]  # data_offset is page-aligned

    def populate(r: tuple[int, int]) -> int:
        a, n = r
        try:
            advise(base + a, n, MADV_POPULATE_READ)
        except OSError:  # kernels before 5.14: touch a byte a page instead
            whole[a : a + n : mmap.PAGESIZE].sum()
        if on_bytes:
            on_bytes(n)
        return n

    if residency.is_cold(path, 1.0):  # any part missing from the page cache
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            total = sum(pool.map(populate, ranges))
    else:
        total = end - start
        if on_bytes:
            on_bytes(total)
    for e in idx.tensors:
        dtype = getattr(torch, e.dtype)
        if e.alias_of is not None:
            out[e.name] = out[e.alias_of]
        elif not e.nbytes:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
        else:
            a = idx.data_offset + e.offset
            out[e.name] = whole[a : a + e.nbytes].view(dtype).view(e.shape)
    return out, LoadStats(total, 0.0, len(idx.tensors), device="cpu", mapped=True)


def load_into(
    path: Path | str,
    targets: dict[str, Any],
    *,
    threads: int = DEFAULT_THREADS,
    chunk: int = DEFAULT_CHUNK,
    buffers: int | None = None,
    direct: bool | None = None,
    verify: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    tuning: CopyTuning = CopyTuning(),
    _idx: fileformat.Index | None = None,
) -> LoadStats:
    """Fill `targets` (name -> tensor, all on one device) from the file at `path`; `tuning`
    applies to GPU targets."""
    path = Path(path)
    if chunk <= 0 or chunk % _DIRECT_ALIGN:
        raise UsageError(f"chunk size {chunk} is not a positive multiple of 4096", hint="use e.g. 16 MiB")
    idx = _idx or fileformat.read_index(path)
    check_compatible(idx, targets, path)
    if verify:  # before any write: a corrupt file must not leave a half-loaded model
        verify_tensors(path, idx, threads)
    use_direct = choose_direct(path, direct)
    on_gpu = any(t.device.type == "cuda" for t in targets.values())
    t0 = time.perf_counter()
    if on_gpu:
        nbuf = pool_size(threads, buffers)
        st = _load_gpu(path, idx, targets, threads, chunk, nbuf, use_direct, on_bytes, tuning)
    else:
        st = LoadStats(_load_cpu(path, idx, targets, threads, chunk, use_direct, on_bytes), 0.0, 0)
    fill_aliases(idx, targets)
    device = next(iter(targets.values())).device.type if targets else "cpu"
    return replace(
        st, seconds=time.perf_counter() - t0, tensors=len(idx.tensors), direct=use_direct, device=device
    )


def fill_aliases(idx: fileformat.Index, targets: dict[str, Any]) -> None:
    for e in idx.tensors:  # tied weights that do not already share storage with their origin
        if e.alias_of is not None:
            dst, src = targets[e.name], targets[e.alias_of]
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


def verify_tensors(
    path: Path,
    idx: fileformat.Index,
    threads: int = DEFAULT_THREADS,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Check every tensor's bytes in the file against its checksum, tensors in parallel;
    `on_bytes` (from the checking threads) gets each tensor's bytes once checked."""
    fd = os.open(path, os.O_RDONLY)
    try:

        def check(e: fileformat.TensorEntry) -> None:
            buf = bytearray(e.nbytes)
            _read_exact(fd, memoryview(buf), idx.data_offset + e.offset, path)
            if xxhash.xxh3_64_hexdigest(buf) != e.xxh3_64:
                raise IntegrityError(
                    f"weight {e.name} in {path} does not match its checksum (corrupt file)",
                    hint="re-dump the weights; nothing was loaded",
                )
            if on_bytes is not None:
                on_bytes(e.nbytes)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(check, [e for e in idx.tensors if e.alias_of is None and e.nbytes]))
    finally:
        os.close(fd)


def _load_cpu(
    path: Path,
    idx: fileformat.Index,
    targets: dict[str, Any],
    threads: int,
    chunk: int,
    use_direct: bool,
    on_bytes: Callable[[int], None] | None,
) -> int:
    import torch

    jobs: list[tuple[memoryview, int, bool]] = []  # (destination bytes, file offset, O_DIRECT?)
    staged: list[tuple[Any, Any]] = []  # (strided destination, contiguous staging)
    for e in idx.tensors:
        dst = targets[e.name]
        if e.alias_of is not None or not e.nbytes:
            continue
        if not dst.is_contiguous():
            tmp = torch.empty(dst.shape, dtype=dst.dtype)
            staged.append((dst, tmp))
            dst = tmp
        view = fileformat.tensor_bytes(dst)
        prefer_huge_pages(dst.data_ptr(), e.nbytes)  # released or fresh pages fault in as 2 MiB
        base = idx.data_offset + e.offset
        aligned = use_direct and dst.data_ptr() % _DIRECT_ALIGN == 0
        for off in range(0, e.nbytes, chunk):
            piece = view[off : off + chunk]
            # O_DIRECT needs address, offset and length aligned: the tail goes buffered.
            n_direct = piece.nbytes // _DIRECT_ALIGN * _DIRECT_ALIGN if aligned else 0
            if n_direct:
                jobs.append((piece[:n_direct], base + off, True))
            if n_direct < piece.nbytes:
                jobs.append((piece[n_direct:], base + off + n_direct, False))
    fd = os.open(path, os.O_RDONLY)
    dfd = _open_direct(path) if any(j[2] for j in jobs) else None
    src = _sources(path, fd, dfd)
    try:

        def read(job: tuple[memoryview, int, bool]) -> int:
            buf, off, want_direct = job
            _read_exact(src(off, buf.nbytes) if want_direct else fd, buf, off, path)
            if on_bytes:
                on_bytes(buf.nbytes)
            return buf.nbytes

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            total = sum(pool.map(read, jobs))
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    for dst, tmp in staged:
        dst.copy_(tmp)
    return total


@dataclass
class _Piece:
    dst: Any  # flat uint8 view of the destination (contiguous, on the GPU)
    dst_off: int
    span_off: int
    n: int


@dataclass
class _Span:
    file_off: int  # absolute, 4 KiB-aligned
    length: int  # bytes to read, 4 KiB-aligned (tensors are padded to 4 KiB in the file)
    pieces: list[_Piece]


def plan_spans(idx: fileformat.Index, dsts: dict[str, Any], chunk: int) -> list[_Span]:
    """Cut the data region into contiguous reads of at most `chunk` bytes, each listing the
    tensor pieces it holds. Small neighbouring tensors share one read; big ones are split."""
    spans: list[_Span] = []
    cur: _Span | None = None
    for e in sorted((e for e in idx.tensors if e.alias_of is None and e.nbytes), key=lambda e: e.offset):
        start = idx.data_offset + e.offset
        padded = fileformat.align(e.nbytes)
        if cur is not None and start == cur.file_off + cur.length and cur.length + padded <= chunk:
            cur.pieces.append(_Piece(dsts[e.name], 0, cur.length, e.nbytes))
            cur.length += padded
            continue
        for off in range(0, e.nbytes, chunk):
            n = min(chunk, e.nbytes - off)
            cur = _Span(start + off, fileformat.align(n), [_Piece(dsts[e.name], off, 0, n)])
            spans.append(cur)
    return spans


class _PinnedPool:
    """Page-locked host buffers of `chunk` bytes, allocated one at a time so the first reads
    can start while the rest are being pinned.

    Two ways to pin, chosen by FASTVLLM_PIN:
    - "torch" (default): torch's pinned allocator (cudaHostAlloc), one call per buffer.
    - "register": one anonymous mapping for the whole pool, transparent huge pages asked for,
      each buffer's pages faulted in (MADV_POPULATE_WRITE) and then cudaHostRegister'ed. It
      was meant to pin faster (fewer, larger pages) but loads slower than "torch"
      (docs/decisions/pinned-pool.md), so it stays an option, not the default.
    """

    def __init__(self, chunk: int, capacity: int) -> None:
        self.chunk = chunk
        self.capacity = capacity
        self.buffers: list[Any] = []  # uint8 CPU tensors
        self.views: list[memoryview] = []
        self.seconds = 0.0
        self.how = config.PIN.get()
        self._mm: Any = None
        self._registered: list[int] = []
        if self.how is config.PinMode.REGISTER:
            try:
                self._start_register()
            except (OSError, RuntimeError, AttributeError):
                self.how = config.PinMode.TORCH

    def _start_register(self) -> None:
        import mmap

        import torch

        t = time.perf_counter()
        self._mm = mmap.mmap(-1, self.chunk * self.capacity)
        self._whole: Any = torch.frombuffer(self._mm, dtype=torch.uint8)  # None once closed
        with contextlib.suppress(OSError):
            advise(self._whole.data_ptr(), self.chunk * self.capacity, MADV_HUGEPAGE)
        self._cudart = torch.cuda.cudart()
        self.seconds += time.perf_counter() - t

    def add(self) -> int:
        """Pin one more buffer; returns its index. Appended before the index is handed out."""
        import torch

        t = time.perf_counter()
        if self.how is config.PinMode.REGISTER:
            i = len(self.buffers)
            b = self._whole[i * self.chunk : (i + 1) * self.chunk]
            with contextlib.suppress(OSError):  # without it the registration faults the pages in
                advise(b.data_ptr(), self.chunk, MADV_POPULATE_WRITE)
            err = self._cudart.cudaHostRegister(b.data_ptr(), self.chunk, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed ({err})")
            self._registered.append(b.data_ptr())
        else:
            b = torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
        self.views.append(b.numpy().data)  # the array's buffer, as a memoryview
        self.buffers.append(b)
        self.seconds += time.perf_counter() - t
        return len(self.buffers) - 1

    def close(self) -> None:
        """Unpin (after every copy from the pool has completed)."""
        for ptr in self._registered:
            self._cudart.cudaHostUnregister(ptr)
        self._registered.clear()
        self.views.clear()
        self.buffers.clear()
        if self._mm is not None:
            self._whole = None
            with contextlib.suppress(BufferError):  # a view still alive keeps the mapping
                self._mm.close()


def pool_size(threads: int, buffers: int | None = None) -> int:
    """Pinned buffers for `threads` readers: `buffers` if given, else one per reader and
    EXTRA_BUFFERS more (copies in flight), at least two (double buffering)."""
    return max(2, buffers or max(1, threads) + EXTRA_BUFFERS)


# The staging buffers pinned before a snapshot (`keep_pool`): a restored process has them
# pinned already. One load at a time uses them; another meanwhile pins its own.
_kept: _PinnedPool | None = None
_kept_busy = False
_kept_lock = threading.Lock()


def keep_pool(
    threads: int = DEFAULT_THREADS, chunk: int = DEFAULT_CHUNK, buffers: int | None = None
) -> dict[str, Any]:
    """Pin the GPU loader's staging buffers now and keep them for every later load of this
    process. Called in the worker before the CUDA checkpoint: the buffers are then part of the
    snapshot, and the driver's checkpoint keeps host memory it pinned valid (cuda-checkpoint's
    README), so a restored worker's first load pins nothing. Each load probes them first
    (`_probe`) and pins its own where they fail."""
    global _kept
    import torch

    if not torch.cuda.is_available():
        return {"kept": False, "reason": "no CUDA device"}
    n = pool_size(threads, buffers)
    with _kept_lock:
        if _kept is not None and _kept.chunk == chunk and len(_kept.buffers) >= n:
            have = len(_kept.buffers)
            return {"kept": True, "buffers": have, "bytes": have * chunk, "seconds": 0.0, **_where(_kept)}
        if _kept_busy:
            return {"kept": False, "reason": "a load is using the kept buffers"}
        old, pool = _kept, _PinnedPool(chunk, n)
        for _ in range(n):
            pool.add()
        _kept = pool
    if old is not None:
        old.close()
    return {"kept": True, "buffers": n, "bytes": n * chunk, "seconds": round(pool.seconds, 4), **_where(pool)}


def _where(pool: _PinnedPool) -> dict[str, Any]:
    """Where the kept buffers are: their contents never matter, so the snapshot drops them from
    the image after the CUDA checkpoint (runtime.discard)."""
    return {"pid": os.getpid(), "ranges": [[b.data_ptr(), pool.chunk] for b in pool.buffers]}


def _acquire_pool(chunk: int, nbuf: int, device: Any) -> tuple[_PinnedPool, str]:
    """The kept buffers if they fit this load and pass the probe (marked busy until
    `_release_kept`), else an empty pool to pin into, with the reason."""
    global _kept_busy
    with _kept_lock:
        pool = _kept
        if pool is None:
            why = "no kept buffers"
        elif _kept_busy:
            why = "the kept buffers are in use"
        elif pool.chunk != chunk or len(pool.buffers) < min(nbuf, 2):
            # fewer kept buffers than asked for (more readers) still beat pinning new ones
            why = f"the kept buffers are {len(pool.buffers)} x {pool.chunk >> 20} MiB"
        else:
            why = ""
            _kept_busy = True
    if not why and pool is not None:
        try:
            bad = _probe(pool, device)
        except Exception as e:  # a probe that cannot run says the buffers cannot be trusted
            bad = f"the probe failed ({e!r:.120})"
        if bad is None:
            return pool, "kept"
        _release_kept()
        why = bad
    return _PinnedPool(chunk, nbuf), f"fresh: {why}"


def _release_kept() -> None:
    global _kept_busy
    with _kept_lock:
        _kept_busy = False


_PROBE = 4096  # bytes of each kept buffer copied to the device and back before a load


def _probe(pool: _PinnedPool, device: Any) -> str | None:
    """None if every buffer of `pool` is still pinned (the driver says so) and copies to
    `device` what it holds; else what is wrong. About a millisecond; it guards a restored
    process against host memory the driver did not pin again."""
    import torch

    if not all(b.is_pinned() for b in pool.buffers):
        return "the kept buffers are no longer pinned"
    n = len(pool.buffers)
    pattern = (torch.arange(n * _PROBE, dtype=torch.int32) % 251).to(torch.uint8)
    dev = torch.empty(n * _PROBE, dtype=torch.uint8, device=device)
    for i, b in enumerate(pool.buffers):
        b[:_PROBE].copy_(pattern[i * _PROBE : (i + 1) * _PROBE])
        dev[i * _PROBE : (i + 1) * _PROBE].copy_(b[:_PROBE], non_blocking=True)
    if not torch.equal(dev.cpu(), pattern):  # .cpu() waits for the copies
        return "a test copy from the kept buffers came back different"
    return None


def _load_gpu(
    path: Path,
    idx: fileformat.Index,
    targets: dict[str, Any],
    threads: int,
    chunk: int,
    nbuf: int,
    use_direct: bool,
    on_bytes: Callable[[int], None] | None,
    tuning: CopyTuning,
) -> LoadStats:
    """The bytes, pinning, pool and waits of the load (`_stream_to_gpu`); the caller adds its
    clock and the rest."""
    import torch

    dests, staged = contiguous_destinations(idx, targets)
    flat = {name: dst.view(-1).view(torch.uint8) for name, dst in dests.items()}
    spans = plan_spans(idx, flat, chunk)
    if not spans:
        return LoadStats(0, 0.0, 0)
    device = next(iter(flat.values())).device
    st = _stream_to_gpu(path, spans, device, threads, chunk, nbuf, use_direct, on_bytes, tuning=tuning)
    if tuning.only is not PipelineHalf.READS:  # reads alone leave every target as it was
        for dst, tmp in staged:
            dst.copy_(tmp)
    return st


def contiguous_destinations(
    idx: fileformat.Index, targets: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """Where each stored tensor of `idx` is copied to: its target, or a contiguous stand-in on
    the same device for a strided one, listed as (target, stand-in) for the caller to copy
    once the load is done. Aliases and empty tensors are left out."""
    import torch

    dests: dict[str, Any] = {}
    staged: list[tuple[Any, Any]] = []
    for e in idx.tensors:
        if e.alias_of is not None or not e.nbytes:
            continue
        dst = targets[e.name]
        if not dst.is_contiguous():
            tmp = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
            staged.append((dst, tmp))
            dst = tmp
        dests[e.name] = dst
    return dests, staged


def _arena_spans(idx: fileformat.Index, nbytes: int, chunk: int) -> list[_Span]:
    """Spans for a destination laid out like the file's data region: one copy per read."""
    spans = []
    for off in range(0, nbytes, chunk):
        n = min(chunk, nbytes - off)
        length = min(fileformat.align(n), idx.file_size - idx.data_offset - off)
        spans.append(_Span(idx.data_offset + off, length, [_Piece(None, off, 0, n)]))
    return spans


def _stream_to_gpu(
    path: Path,
    spans: list[_Span],
    device: Any,
    threads: int,
    chunk: int,
    nbuf: int,
    use_direct: bool,
    on_bytes: Callable[[int], None] | None,
    before_copies: Callable[[], None] | None = None,
    tuning: CopyTuning = CopyTuning(),
) -> LoadStats:
    """Reader threads fill pinned buffers with spans; this thread copies them to the GPU on a
    side stream. `before_copies` runs once the readers are going (it allocates the destination
    in `load`, so cudaMalloc overlaps the first reads); `tuning` says how the threads share the
    cores. The buffers are the kept ones (`keep_pool`) where they fit and pass the probe, else
    pinned here. Returns the bytes, the seconds spent pinning, which pool it was ("kept", or
    "fresh" and why), where the pipeline waited and how long it took to start and to drain, as
    a LoadStats whose clock and kind the caller fills in."""
    import torch

    t_start = time.perf_counter()
    t_first = t_last = drain = 0.0
    nbuf = max(1, min(nbuf, len(spans)))
    fd = os.open(path, os.O_RDONLY)  # before the kept pool is taken: nothing may fail in between
    dfd = _open_direct(path) if use_direct else None
    src = _sources(path, fd, dfd)
    mapped = None
    if tuning.reads is config.LoaderReads.MAPPED and dfd is None and not use_direct:
        mapped = _MappedFile(path)
    pool, how = _acquire_pool(chunk, nbuf, device)
    kept = how == "kept"
    if kept:
        nbuf = min(nbuf, len(pool.buffers))
    free: queue.Queue[int] = queue.Queue()
    for i in range(nbuf if kept else 0):
        free.put(i)
    for _ in range(0 if kept else min(nbuf, _FIRST_BUFFERS)):
        free.put(pool.add())
    ready: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(spans)):
        todo.put(i)
    stop = threading.Event()
    buffer_waits: list[float] = []  # each reader's time waiting for a free buffer

    def reader() -> None:
        waited = 0.0
        try:
            if tuning.reader_nice > 0:  # this thread only: on Linux a nice value is per thread
                with contextlib.suppress(OSError):
                    tid = threading.get_native_id()
                    nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + tuning.reader_nice)
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            while not stop.is_set():
                try:
                    si = todo.get_nowait()
                except queue.Empty:
                    return
                t = time.perf_counter()
                bi = free.get()
                waited += time.perf_counter() - t
                if stop.is_set():
                    return
                s = spans[si]
                if tuning.only is PipelineHalf.COPIES:
                    pass
                elif mapped is not None:
                    mapped.copy(pool.buffers[bi].data_ptr(), s.file_off, s.length)
                else:
                    _read_exact(src(s.file_off, s.length), pool.views[bi][: s.length], s.file_off, path)
                ready.put((si, bi))
        except BaseException as exc:
            ready.put(exc)
        finally:
            buffer_waits.append(waited)

    stream = torch.cuda.Stream(device=device)
    releases: queue.Queue[tuple[Any, int] | None] = queue.Queue()

    def releaser() -> None:
        try:
            while len(pool.buffers) < nbuf and not stop.is_set():  # grow while reads run
                free.put(pool.add())
        except BaseException as exc:
            ready.put(exc)
        while (item := releases.get()) is not None:
            ev, bi = item
            ev.synchronize()
            free.put(bi)

    workers = [threading.Thread(target=reader, daemon=True) for _ in range(max(1, min(threads, len(spans))))]
    rel = threading.Thread(target=releaser, daemon=True)
    total = 0
    read_wait = 0.0
    try:
        rel.start()
        for w in workers:
            w.start()
        if before_copies is not None:
            before_copies()
        with torch.cuda.stream(stream):
            for _ in range(len(spans)):
                t = time.perf_counter()
                got = ready.get()
                read_wait += time.perf_counter() - t
                if isinstance(got, BaseException):
                    raise got
                si, bi = got
                buf = pool.buffers[bi]
                n_span = 0
                for p in spans[si].pieces:
                    if tuning.only is not PipelineHalf.READS:
                        p.dst[p.dst_off : p.dst_off + p.n].copy_(
                            buf[p.span_off : p.span_off + p.n], non_blocking=True
                        )
                    n_span += p.n
                total += n_span
                t_last = time.perf_counter()
                t_first = t_first or t_last
                ev = torch.cuda.Event(blocking=tuning.wait is config.CopyWait.BLOCK)
                ev.record(stream)
                releases.put((ev, bi))
                if on_bytes:
                    on_bytes(n_span)
        stream.synchronize()
        drain = time.perf_counter() - t_last
    finally:
        stop.set()
        releases.put(None)
        for _ in workers:  # wake readers blocked on an empty pool so they see `stop`
            free.put(0)
        for w in workers:
            w.join()
        rel.join()
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
        if mapped is not None:
            mapped.close()
        with contextlib.suppress(Exception):
            stream.synchronize()  # no copy may still read a buffer when it is unpinned
        if kept:
            _release_kept()
        else:
            pool.close()
    with contextlib.suppress(Exception):
        torch.cuda.current_stream(device).wait_stream(stream)
    buffer_wait = sum(buffer_waits) / max(1, len(buffer_waits))
    pin_s = 0.0 if kept else pool.seconds
    return LoadStats(
        total,
        0.0,
        0,
        pin_s=pin_s,
        pool=how,
        wait_reads_s=read_wait,
        wait_buffers_s=buffer_wait,
        first_copy_s=t_first - t_start,
        drain_s=drain,
    )
