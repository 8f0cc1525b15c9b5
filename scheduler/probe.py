"""Bandwidths a node agent measures itself at start-up, with small probes (a few hundred ms).

Placement divides bytes by these, so they must be this host's, not a data sheet's: a
virtual disk, a busy page cache or a slow NIC changes which host restores first.
- disk: a probe file written next to the snapshots, fsync'ed, dropped from the page cache
  (posix_fadvise DONTNEED), then read back: a cold read of that file system.
- memory: the same file read again from the page cache (what a resident snapshot costs).
- h2d: a pinned host-to-device copy, only where a GPU is present (torch is imported then).
- network: bytes pushed to a peer's sink socket (`Sink`), one short burst per peer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from pathlib import Path

from fastvllm.runtime import vllm_server

PROBE_BYTES = 32 << 20
_CHUNK = 4 << 20


def _read_all(path: Path) -> float:
    """Seconds to read the whole file once with 4 MiB reads."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while os.readv(fd, [view]) > 0:
            pass
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _cold_read(path: Path) -> float:
    """Seconds to read the file once after dropping it from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return _read_all(path)


def disk_and_memory(directory: Path, size: int = PROBE_BYTES) -> tuple[float, float]:
    """(cold disk read, page-cache read) in bytes/s for the file system holding `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".fastvllm-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(path, "wb") as f:
            block = os.urandom(_CHUNK)  # incompressible: a compressing file system cannot cheat
            for _ in range(size // _CHUNK):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        # Two cold reads, the faster kept: agents start together and probe one disk at once on a
        # test cluster, and a read that waited behind a neighbour's fsync measured the disk at a
        # fraction of its speed (contention only ever slows a read down).
        disk = size / min(_cold_read(path) for _ in range(2))
        memory = size / min(_read_all(path) for _ in range(3))
        return disk, memory
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def host_to_device(size: int = 64 << 20) -> float:
    """Pinned host-to-device copy in bytes/s; 0.0 without a GPU (torch is not even imported)."""
    if not vllm_server.cuda_present():
        return 0.0
    try:
        import torch
    except ImportError:
        return 0.0
    if not torch.cuda.is_available():
        return 0.0
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return size / min(times)


class Sink:
    """A TCP socket that swallows bytes, so peers can time a burst to this host."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._serve, name="fastvllm-bw-sink", daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with conn:
            buf = bytearray(1 << 20)
            while conn.recv_into(buf) > 0:
                pass
            with contextlib.suppress(OSError):
                conn.sendall(b"k")  # tells the sender every byte arrived

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def network_to(host: str, port: int, size: int = 16 << 20, timeout: float = 5.0) -> float:
    """Bytes/s of one burst to a peer's `Sink` (until the peer acknowledged the last byte)."""
    block = os.urandom(1 << 20)
    with socket.create_connection((host, port), timeout=timeout) as s:
        t0 = time.perf_counter()
        for _ in range(size // len(block)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        return size / (time.perf_counter() - t0)


def network(peers: list[tuple[str, int]]) -> float:
    """Median bandwidth to the peers' sinks; 0.0 with none (nothing to fetch a snapshot from)."""
    got = []
    for host, port in peers:
        with contextlib.suppress(OSError):
            got.append(network_to(host, port))
    return statistics.median(got) if got else 0.0
