"""Weights held in pinned host memory between restores, and a restored worker's load out of them.

The staged loader (weights/loader.py) copies each byte out of the page cache into a pinned
buffer that the device then reads; on the H100 hosts those copies and the device's reads compete
for host memory, and the load stops at 60-68% of the pinned host-to-device bound. Here a process
that outlives restores (`fastvllm agent --hold SNAPSHOT`) reads each weight file's data region
once into pinned host memory that other processes can map (runtime/shared_pinned.py), checks
every tensor's checksum, and hands the memory's descriptor to a restored worker that asks over
the agent's socket (its owner's uid alone). The worker maps it for its device and copies each
tensor out of it: each byte crosses host memory once, by DMA, at 97-100% of the bound in the
probe (docs/decisions/pinned-pool.md). Anything that fails on the way leaves the worker's load
to the staged loader, with the reason.

The memory is made in pieces (256 MiB, or more for files past 64 GB), each with its own
descriptor: mapping memory for the device costs about 8 ms a GB, and the worker maps one piece
while the copy engine reads the one before, so the mapping hides under the copies; a single
mapping of the whole file left the load at 62% of the bound.

The cost: host memory the size of the weights, pinned (not reclaimable), for every snapshot held.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import math
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastvllm.runtime import shared_pinned, system
from fastvllm.runtime.errors import IntegrityError, PinnedMemoryError
from fastvllm.weights import fileformat, loader

OP = "held"  # the agent's request: {"op": "held", "file": "/abs/weights.fvw"}
_FILL_THREADS = 16
_FILL_CHUNK = 8 << 20
# Left to the rest of the host: holding must not push the served models or the page cache out.
_SPARE_BYTES = 4 << 30
FETCH_TIMEOUT_S = 5.0
PIECE_BYTES = 256 << 20
# Descriptors in one message: the kernel passes at most 253 (SCM_MAX_FD).
_MAX_PIECES = 250
# Open files the agent needs beside the held pieces' descriptors (clients, restores, logs).
_FD_MARGIN = 512


class Memory(Protocol):
    """What holds the bytes: runtime.shared_pinned.SharedPinned, or memory like it."""

    address: int
    nbytes: int
    fd: int

    def close(self) -> None: ...


def piece_count(n: int, piece: int) -> int:
    """Pieces of `piece` bytes an `n`-byte data region takes (an empty one still takes one)."""
    return max(1, -(-n // piece))


def pieces_for(path: Path) -> int:
    """How many pieces (each an open descriptor while held) `path`'s weights take."""
    idx = fileformat.read_index(path)
    n = idx.file_size - idx.data_offset
    return piece_count(n, piece_size(n))


def make_room_for(pieces: int) -> None:
    """Raise this process's open-file limit (up to its hard limit) so that `pieces` held
    descriptors fit beside its other files; PinnedMemoryError if even the hard limit is too
    low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = pieces + _FD_MARGIN
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise PinnedMemoryError(
            f"holding these weights keeps {pieces} descriptors open, and this process may open {hard} files",
            hint=f"raise the open-file limit to at least {need} (ulimit -n, or LimitNOFILE= under systemd)",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard))


@dataclass
class Held:
    """One weight file's data region in shared pinned memory, as it was when read."""

    path: str  # absolute, resolved
    identity: list[int]  # runtime.system.file_identity when read
    data_offset: int
    data_bytes: int
    piece_bytes: int  # the data region's bytes in each piece (the last one's: what is left)
    pieces: list[Memory]
    seconds: float  # reading and checking it

    def meta(self) -> dict[str, Any]:
        """What a worker checks before mapping (the descriptors travel beside it, in order)."""
        return {
            "event": "held",
            "file": self.path,
            "identity": self.identity,
            "data_offset": self.data_offset,
            "data_bytes": self.data_bytes,
            "piece_bytes": self.piece_bytes,
            "piece_sizes": [m.nbytes for m in self.pieces],
        }

    def close(self) -> None:
        for m in self.pieces:
            m.close()


def piece_size(n: int, piece_bytes: int = PIECE_BYTES) -> int:
    """The data bytes per piece for an `n`-byte data region: `piece_bytes`, or larger where
    more pieces than one message can pass would be needed (a multiple of 8 MiB then)."""
    need = -(-n // _MAX_PIECES)
    return piece_bytes if need <= piece_bytes else -(-need // _FILL_CHUNK) * _FILL_CHUNK


class Step(enum.StrEnum):
    """The parts of holding a file, in order, as progress reports name them."""

    CHECKING = "checking"  # every tensor's checksum, read from the file
    PINNING = "pinning"  # the driver zeroes and pins the memory
    READING = "reading"  # the file's data region into the memory


# Progress while a file is held: (step, bytes done, bytes in all), from any thread.
Progress = Callable[[Step, int, int], None]


class _Tally:
    """Bytes done in one step, added from several threads, passed on as a running total."""

    def __init__(self, step: Step, total: int, report: Progress | None) -> None:
        self.step, self.total, self.report = step, total, report
        self.done = 0
        self._lock = threading.Lock()

    def add(self, k: int) -> None:
        if self.report is None:
            return
        with self._lock:
            self.done += k
            done = self.done
        self.report(self.step, done, self.total)


def fill(
    path: Path,
    *,
    threads: int = _FILL_THREADS,
    make: Callable[[int], Memory] = shared_pinned.SharedPinned.create,
    piece_bytes: int = PIECE_BYTES,
    progress: Progress | None = None,
) -> Held:
    """Check every tensor's checksum in the file, read its data region into new shared pinned
    memory (`make`, one call per piece), and check that the file did not change meanwhile;
    `progress` hears of each step's bytes (holding a large model takes minutes)."""
    if piece_bytes <= 0:
        raise ValueError(f"piece_bytes must be positive, not {piece_bytes}")
    t0 = time.perf_counter()
    path = path.resolve()
    identity = system.file_identity(path)
    idx = fileformat.read_index(path)
    n = idx.file_size - idx.data_offset
    avail = system.meminfo("MemAvailable")
    if avail is not None and n + _SPARE_BYTES > avail:
        raise PinnedMemoryError(
            f"holding {path} needs {n / 1e9:.1f} GB of pinned memory, and only {avail / 1e9:.1f} GB "
            "is available (4 GB are kept for the rest of the host)",
            hint="hold fewer snapshots, or free memory",
        )
    # The checksums are taken from the file, not from the held copy: the CPU's view of pinned
    # memory the driver made need not be cached, and reading it back would be slow.
    checked = sum(e.nbytes for e in idx.tensors if e.alias_of is None)
    loader.verify_tensors(path, idx, threads, _Tally(Step.CHECKING, checked, progress).add)
    piece = piece_size(n, piece_bytes)
    pieces: list[Memory] = []
    try:
        pinned, filled = _Tally(Step.PINNING, n, progress), _Tally(Step.READING, n, progress)
        for start in range(0, piece_count(n, piece) * piece, piece):
            pieces.append(make(min(piece, n - start) or 1))
            pinned.add(min(piece, n - start))
        chunk = math.gcd(piece, _FILL_CHUNK)  # no read straddles two pieces
        views = [memoryview((ctypes.c_char * m.nbytes).from_address(m.address)).cast("B") for m in pieces]
        fd = os.open(path, os.O_RDONLY)
        try:

            def read(off: int) -> None:
                i, within = divmod(off, piece)
                part = views[i][within : within + min(chunk, n - off)]
                done = 0
                while done < part.nbytes:
                    got = os.preadv(fd, [part[done:]], idx.data_offset + off + done)
                    if got == 0:
                        raise IntegrityError(f"weight file {path} ended early", hint="re-dump the weights")
                    done += got
                filled.add(part.nbytes)

            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                list(pool.map(read, range(0, n, chunk)))
        finally:
            os.close(fd)
        for v in views:
            v.release()
        if system.file_identity(path) != identity:
            raise IntegrityError(f"weight file {path} changed while it was read", hint="hold it again")
    except BaseException:
        for m in pieces:
            m.close()
        raise
    return Held(str(path), identity or [], idx.data_offset, n, piece, pieces, time.perf_counter() - t0)


# What this process holds, by resolved path: the agent's, answered from its socket.
_held: dict[str, Held] = {}
_lock = threading.Lock()


def hold(path: Path, **kw: Any) -> Held:
    """Fill and keep `path`'s weights (replacing an older copy of the same file)."""
    h = fill(path, **kw)
    with _lock:
        old = _held.pop(h.path, None)
        _held[h.path] = h
    if old is not None:
        old.close()
    return h


def lookup(path: str | Path) -> Held | None:
    """The held copy of `path` if this process holds one and the file is unchanged since; a
    stale copy is dropped."""
    with _lock:
        h, stale = _lookup_locked(path)
    if stale is not None:
        stale.close()
    return h


def _lookup_locked(path: str | Path) -> tuple[Held | None, Held | None]:
    """(the held copy, or None; a stale copy just dropped, for the caller to close outside the
    lock). Only with `_lock` held: memory is closed only once out of the registry, so a copy
    found here stays open as long as the caller holds the lock."""
    key = str(Path(path).resolve())
    h = _held.get(key)
    if h is None or system.file_identity(key) == h.identity:
        return h, None
    del _held[key]
    return None, h


# Where this process answers `OP` requests (the agent's socket), once it does.
_socket: str | None = None


def announce(socket_path: str | Path | None) -> None:
    """This process answers held-weight requests at `socket_path` (None: no longer)."""
    global _socket
    _socket = str(socket_path) if socket_path else None


def socket_for(path: str | Path) -> str:
    """The socket a restored worker asks for `path`'s held copy ("" if this process holds none):
    a restore run by the agent that holds it."""
    return _socket if _socket and lookup(path) is not None else ""


def release_all() -> None:
    with _lock:
        held = list(_held.values())
        _held.clear()
    for h in held:
        h.close()


def held_files() -> list[dict[str, Any]]:
    """What this process holds, for a status line."""
    with _lock:
        return [
            {"file": h.path, "bytes": h.data_bytes, "read_s": round(h.seconds, 3)} for h in _held.values()
        ]


# --- the socket's side (the agent) and the worker's side -------------------------------------------


def answer(conn: socket.socket, req: dict[str, Any]) -> None:
    """Reply to an `OP` request on `conn`: the held copy's metadata with its descriptor, or why
    there is none."""
    with _lock:  # the memory cannot be closed while its descriptor is being sent
        h, stale = _lookup_locked(str(req.get("file", "")))
        if h is not None:
            socket.send_fds(conn, [json.dumps(h.meta()).encode() + b"\n"], [m.fd for m in h.pieces])
    if stale is not None:
        stale.close()
    if h is None:
        line = {"event": "not_held", "reason": f"this agent does not hold {req.get('file')!r}"}
        conn.sendall(json.dumps(line).encode() + b"\n")


@contextlib.contextmanager
def serving(socket_path: Path) -> Iterator[str]:
    """Answer `OP` requests on a Unix socket of its own at `socket_path` (in a directory only
    its owner can open) from a thread, announced as this process's, for the block: a process
    other than the agent holding weights (the GPU bench, tests). The agent answers on its own
    socket, after its uid check."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(socket_path))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed: the block ended
                return
            with conn:
                conn.settimeout(FETCH_TIMEOUT_S)
                line = b""
                with contextlib.suppress(OSError, ValueError):  # a client gone or garbled
                    while not line.endswith(b"\n") and (got := conn.recv(4096)):
                        line += got
                    answer(conn, json.loads(line))

    th = threading.Thread(target=serve, name="held-weights", daemon=True)
    th.start()
    announce(socket_path)
    try:
        yield str(socket_path)
    finally:
        announce(None)
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)  # wakes the accept
        srv.close()
        th.join(FETCH_TIMEOUT_S)
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


class NotHeld(Exception):
    """Why a worker's load cannot use held memory (it then reads the file as before)."""


def fetch(socket_path: str, file: str, timeout: float = FETCH_TIMEOUT_S) -> tuple[list[int], dict[str, Any]]:
    """Ask the agent at `socket_path` for its copy of `file`: (one descriptor per piece,
    metadata). The caller closes the descriptors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(socket_path)
            s.sendall(json.dumps({"op": OP, "file": file}).encode() + b"\n")
            data, fds, _flags, _addr = socket.recv_fds(s, 1 << 16, _MAX_PIECES)
        except OSError as e:
            raise NotHeld(f"the agent at {socket_path} did not answer ({e})") from None
    try:
        meta = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    sizes = meta.get("piece_sizes")
    if meta.get("event") != "held" or not fds or not isinstance(sizes, list) or len(fds) != len(sizes):
        for fd in fds:
            os.close(fd)
        why = meta.get("reason") or meta.get("error")
        raise NotHeld(
            str(why)
            if why
            else f"the agent's answer had no memory, or not one piece per descriptor ({len(fds)})"
        )
    return fds, meta


def check_meta(meta: dict[str, Any], path: Path, idx: fileformat.Index) -> None:
    """The held copy is of this very file, as it is now (NotHeld if not)."""
    if meta.get("identity") != system.file_identity(path):
        raise NotHeld(f"the held copy is of another version of {path}")
    n = idx.file_size - idx.data_offset
    piece, sizes = meta.get("piece_bytes"), meta.get("piece_sizes")
    if (
        meta.get("data_offset") != idx.data_offset
        or meta.get("data_bytes") != n
        or not isinstance(piece, int)
        or piece <= 0
        or not isinstance(sizes, list)
        or len(sizes) != piece_count(n, piece)
        or any(not isinstance(z, int) or z < min(piece, n - i * piece) for i, z in enumerate(sizes))
    ):
        raise NotHeld(f"the held copy's layout differs from {path}'s index")


@dataclass(frozen=True)
class HeldLoad:
    """One load out of held memory: its bytes and seconds, and where the seconds went."""

    bytes: int
    seconds: float
    first_copy_s: float  # asking the agent and mapping the first piece, to its copies issued
    map_s: float  # mapping the pieces for the device (under the copies but the first)
    unmap_s: float
    drain_s: float  # the last copy issued to all done


def segments(extents: list[tuple[int, int, int]], piece: int, n: int) -> list[list[tuple[int, int, int]]]:
    """Per piece of an `n`-byte data region held in `piece`-byte pieces, the copies out of it:
    (offset in the piece, destination address, bytes), for `extents` (offset in the data
    region, destination address, bytes), each split where it straddles pieces. NotHeld for an
    extent outside the region (a damaged index)."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(piece_count(n, piece))]
    for off, dst, left in sorted(extents):
        if off < 0 or left < 0 or off + left > n:
            raise NotHeld(f"a tensor at {off} (+{left} bytes) lies outside the held {n} bytes")
        while left:
            i, within = divmod(off, piece)
            k = min(left, piece - within)
            out[i].append((within, dst, k))
            off, dst, left = off + k, dst + k, left - k
    return out


def load_into(socket_path: str, path: Path, targets: dict[str, Any], idx: fileformat.Index) -> HeldLoad:
    """Fill `targets` (CUDA tensors, one device, checked against `idx` by the caller) from the
    agent's held copy of `path`: piece by piece, each mapped for the device while the copy
    engine reads the one before, one copy per tensor and piece it lies in. NotHeld (nothing
    written yet) or another error (the caller reloads from the file) if it cannot."""
    import torch

    t0 = time.perf_counter()
    fds, meta = fetch(socket_path, str(path.resolve()))
    maps: list[shared_pinned.DeviceMapping] = []
    stream = None
    map_s, unmap_s, first_copy_s = 0.0, 0.0, 0.0
    try:
        check_meta(meta, path.resolve(), idx)
        piece, sizes = int(meta["piece_bytes"]), [int(z) for z in meta["piece_sizes"]]
        device = next(iter(targets.values())).device
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        dests, staged = loader.contiguous_destinations(idx, targets)
        extents = []
        for e in idx.tensors:
            if e.name in dests:
                d = dests[e.name]
                if e.nbytes != d.numel() * d.element_size():
                    raise NotHeld(f"{e.name} has {e.nbytes} bytes in the index, its tensor another size")
                extents.append((e.offset, d.data_ptr(), e.nbytes))
        per_piece = segments(extents, piece, idx.file_size - idx.data_offset)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # after whatever made the targets
        with torch.cuda.device(device):
            for i, segs in enumerate(per_piece):
                if not segs:
                    continue
                t = time.perf_counter()
                maps.append(shared_pinned.map_for_device(fds[i], sizes[i], ordinal))
                map_s += time.perf_counter() - t
                for within, dst, k in segs:
                    shared_pinned.copy_async(dst, maps[-1].address + within, k, stream.cuda_stream)
                first_copy_s = first_copy_s or time.perf_counter() - t0
            t_issued = time.perf_counter()
            stream.synchronize()
            t = time.perf_counter()
            for m in maps:
                m.close()
            unmap_s = time.perf_counter() - t
    finally:
        for fd in fds:
            os.close(fd)
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.synchronize()  # no copy may still read the memory when it is unmapped
        for m in maps:
            m.close()
    torch.cuda.current_stream(device).wait_stream(stream)
    for dst, tmp in staged:
        dst.copy_(tmp)
    total = sum(k for segs in per_piece for _, _, k in segs)
    return HeldLoad(total, time.perf_counter() - t0, first_copy_s, map_s, unmap_s, t - t_issued)
