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
- O_DIRECT or not: decided from the file's page-cache residency (`prefetch.residency`) unless
  the caller says. Cold: O_DIRECT skips the kernel's copy into the page cache. Warm: buffered.

Every shape, dtype and name is checked, and the file's size against its index, before the
first byte is written into a destination: a wrong file never leaves a half-loaded model.
The defaults (threads, chunk, buffers) were chosen from `scripts/sweep_loader.py` sweeps on
the H100 machine; results/gpu-reload/sweep-*.json holds them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from fastvllm.prefetch import residency
from fastvllm.runtime.errors import IntegrityError, UsageError
from fastvllm.runtime.memory import HUGE_PAGE, MADV_HUGEPAGE, advise_interior
from fastvllm.weights import fileformat

# From `scripts/sweep_loader.py` on the H100 machine (16 cores, 5.7-6.4 GB files): warm page
# cache, 8 to 12 threads with 8 MiB reads gave 32-36 GB/s; 2 MiB reads halved that, 64 MiB
# lost a third. Cold, every setting gave the disk's 1.7-1.9 GB/s (O_DIRECT a little ahead).
# Pinning host memory runs at only ~2.5 GB/s, so the pool is threads + 4 buffers, not more.
# results/gpu-reload/sweep*.json holds the grids.
DEFAULT_THREADS = min(12, os.cpu_count() or 4)
DEFAULT_CHUNK = 8 << 20
EXTRA_BUFFERS = 4  # pinned buffers beyond one per reader thread
# Pinned buffers allocated before the first read; the rest are allocated while reads run
# (cudaHostAlloc costs about as much as copying the bytes it pins).
_FIRST_BUFFERS = 2
# Below this share of resident pages the file counts as cold and O_DIRECT is used.
COLD_BELOW = 0.5
_DIRECT_ALIGN = 4096


@dataclass
class LoadStats:
    bytes: int
    seconds: float
    tensors: int
    direct: bool = False
    device: str = "cpu"
    pin_s: float = 0.0  # time spent allocating pinned buffers (GPU targets)

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
    try:
        return residency.sampled_fraction(path) < COLD_BELOW
    except OSError:
        return False


def _open_direct(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # tmpfs and some overlay filesystems refuse O_DIRECT
        return None


def prefer_huge_pages(ptr: int, nbytes: int) -> None:
    """Ask for transparent huge pages over a destination's 2 MiB-aligned interior before its
    first write: otherwise every 4 KiB page faults in on its own inside preadv (1.5 million
    faults for 6 GB), which held CPU loads to ~2 GB/s on a machine whose THP mode is madvise.
    A hint: where THP is off it does nothing."""
    with contextlib.suppress(OSError):  # kernels without THP refuse the advice
        advise_interior(ptr, nbytes, MADV_HUGEPAGE, HUGE_PAGE)


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
) -> tuple[dict[str, Any], LoadStats]:
    """Allocate every tensor of the file on `device` and fill it (the benchmark's entry point).

    All tensors are views into one allocation laid out like the file's data region (one
    cudaMalloc instead of hundreds; offsets are 4 KiB-aligned, so every dtype's view is
    aligned). Allocation is inside the timed region: a caller loading a fresh model pays for it."""
    import torch

    path = Path(path)
    t0 = time.perf_counter()
    idx = fileformat.read_index(path)
    span = max((e.offset + e.nbytes for e in idx.tensors if e.alias_of is None), default=0)
    arena = torch.empty(span, dtype=torch.uint8, device=device)
    if arena.device.type == "cpu" and span:
        prefer_huge_pages(arena.data_ptr(), span)
    out: dict[str, Any] = {}
    for e in idx.tensors:
        dtype = getattr(torch, e.dtype)
        if e.alias_of is not None:
            out[e.name] = out[e.alias_of]
        elif not e.nbytes:
            out[e.name] = torch.empty(e.shape, dtype=dtype, device=device)
        else:
            out[e.name] = arena[e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
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
    _idx: fileformat.Index | None = None,
) -> LoadStats:
    """Fill `targets` (name -> tensor, all on one device) from the file at `path`."""
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
    pin_s = 0.0
    if on_gpu:
        nbuf = max(2, buffers or threads + EXTRA_BUFFERS)
        total, pin_s = _load_gpu(path, idx, targets, threads, chunk, nbuf, use_direct, on_bytes)
    else:
        total = _load_cpu(path, idx, targets, threads, chunk, use_direct, on_bytes)
    _fill_aliases(idx, targets)
    device = next(iter(targets.values())).device.type if targets else "cpu"
    return LoadStats(total, time.perf_counter() - t0, len(idx.tensors), use_direct, device, pin_s)


def _fill_aliases(idx: fileformat.Index, targets: dict[str, Any]) -> None:
    for e in idx.tensors:  # tied weights that do not already share storage with their origin
        if e.alias_of is not None:
            dst, src = targets[e.name], targets[e.alias_of]
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


def verify_tensors(path: Path, idx: fileformat.Index, threads: int = DEFAULT_THREADS) -> None:
    """Check every tensor's bytes in the file against its checksum, tensors in parallel."""
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
    try:

        def read(job: tuple[memoryview, int, bool]) -> int:
            buf, off, want_direct = job
            _read_exact(dfd if (want_direct and dfd is not None) else fd, buf, off, path)
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


def _load_gpu(
    path: Path,
    idx: fileformat.Index,
    targets: dict[str, Any],
    threads: int,
    chunk: int,
    nbuf: int,
    use_direct: bool,
    on_bytes: Callable[[int], None] | None,
) -> tuple[int, float]:
    import torch

    flat: dict[str, Any] = {}
    staged: list[tuple[Any, Any]] = []
    for e in idx.tensors:
        if e.alias_of is not None or not e.nbytes:
            continue
        dst = targets[e.name]
        if not dst.is_contiguous():
            tmp = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
            staged.append((dst, tmp))
            dst = tmp
        flat[e.name] = dst.view(-1).view(torch.uint8)
    spans = plan_spans(idx, flat, chunk)
    if not spans:
        return 0, 0.0
    device = next(iter(flat.values())).device
    nbuf = min(nbuf, len(spans))
    pin_t = [0.0]

    def pin() -> Any:
        t = time.perf_counter()
        b = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
        pin_t[0] += time.perf_counter() - t
        return b

    pool = [pin() for _ in range(min(nbuf, _FIRST_BUFFERS))]
    free: queue.Queue[int] = queue.Queue()
    for i in range(len(pool)):
        free.put(i)
    ready: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(spans)):
        todo.put(i)
    stop = threading.Event()
    fd = os.open(path, os.O_RDONLY)
    dfd = _open_direct(path) if use_direct else None
    views = [memoryview(b.numpy()) for b in pool]

    def grow() -> None:  # the rest of the pool, while the first buffers are already in use
        while len(pool) < nbuf and not stop.is_set():
            b = pin()
            views.append(memoryview(b.numpy()))  # appended before its index is handed out
            pool.append(b)
            free.put(len(pool) - 1)

    def reader() -> None:
        try:
            while not stop.is_set():
                try:
                    si = todo.get_nowait()
                except queue.Empty:
                    return
                bi = free.get()
                if stop.is_set():
                    return
                s = spans[si]
                _read_exact(dfd if dfd is not None else fd, views[bi][: s.length], s.file_off, path)
                ready.put((si, bi))
        except BaseException as exc:
            ready.put(exc)

    stream = torch.cuda.Stream(device=device)
    releases: queue.Queue[tuple[Any, int] | None] = queue.Queue()

    def releaser() -> None:
        grow()
        while (item := releases.get()) is not None:
            ev, bi = item
            ev.synchronize()
            free.put(bi)

    workers = [threading.Thread(target=reader, daemon=True) for _ in range(max(1, min(threads, len(spans))))]
    rel = threading.Thread(target=releaser, daemon=True)
    total = 0
    try:
        rel.start()
        for w in workers:
            w.start()
        with torch.cuda.stream(stream):
            for _ in range(len(spans)):
                got = ready.get()
                if isinstance(got, BaseException):
                    raise got
                si, bi = got
                buf = pool[bi]
                for p in spans[si].pieces:
                    p.dst[p.dst_off : p.dst_off + p.n].copy_(
                        buf[p.span_off : p.span_off + p.n], non_blocking=True
                    )
                    total += p.n
                ev = torch.cuda.Event()
                ev.record(stream)
                releases.put((ev, bi))
                if on_bytes:
                    on_bytes(sum(p.n for p in spans[si].pieces))
        stream.synchronize()
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
    for dst, tmp in staged:
        dst.copy_(tmp)
    with contextlib.suppress(Exception):
        torch.cuda.current_stream(device).wait_stream(stream)
    return total, pin_t[0]
