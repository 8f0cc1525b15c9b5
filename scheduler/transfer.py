"""Copying a snapshot from one host to another, agent to agent, over one TCP stream.

Why our own stream rather than rsync, scp or Ray's object store: a snapshot's /dev/shm copies
are sparse (nearly all holes around a little data), so the sender sends
each file's data runs only (`runtime.sparse`) and the receiver leaves the holes as holes. And
the receiver must never show a half-copied or damaged snapshot to its scans: it writes into a
hidden staging directory beside the destination, checks every file against the manifest's
checksums as it arrives (the manifest comes first), records them as checked on this host
(`runtime.verified`, so the first restore does not hash them again) and renames the directory
into place, or deletes it on any failure.

The stream: an 8-byte length, a JSON header (the files with their sizes, modes and data
runs, relative to the snapshot directory), then the bytes of every run in header order.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastvllm.runtime import atomic, manifest, sparse, verified
from fastvllm.runtime.errors import FastVLLMError, IntegrityError, UsageError

CHUNK = 8 << 20
ACCEPT_TIMEOUT_S = 120.0


class TransferError(FastVLLMError):
    """A snapshot copy between hosts broke off (peer gone, connection reset)."""

    exit_code = 12


def _files(snapshot: Path) -> list[str]:
    """What a copy carries: the manifest and the files it lists (not logs, not what this host
    learned about the snapshot: the receiver learns its own)."""
    return [manifest.MANIFEST, *(f.path for f in manifest.load(snapshot).files)]


def _header(snapshot: Path, names: list[str]) -> list[dict[str, object]]:
    out = []
    for name in names:
        size, mode, runs = sparse.file_extents(snapshot / name)
        out.append({"path": name, "size": size, "mode": mode, "runs": runs})
    return out


class Sender:
    """Serves one copy of `snapshot` to the first peer that connects, from a thread, so an
    agent can hand its address to the controller and return."""

    def __init__(self, snapshot: Path, host: str = "0.0.0.0") -> None:
        self.snapshot = snapshot
        self.names = _files(snapshot)  # a foreign or half-written directory fails here, at once
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(ACCEPT_TIMEOUT_S)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="fastvllm-snapshot-sender", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop waiting for a peer (an agent shutting down)."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:  # nobody came: the receiver failed before connecting
            self.error = e
            self.sock.close()
            return
        self.sock.close()
        try:
            with conn:
                header = json.dumps(_header(self.snapshot, self.names)).encode()
                conn.sendall(struct.pack("<Q", len(header)) + header)
                for entry in json.loads(header):
                    with open(self.snapshot / entry["path"], "rb") as f:
                        for off, length in entry["runs"]:
                            n = conn.sendfile(f, off, length)
                            if n != length:
                                raise TransferError(
                                    f"{entry['path']} shrank while it was sent", hint="take the copy again"
                                )
                            self.sent += n
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # the receiver's acknowledgement: every byte arrived
        except (OSError, TransferError) as e:
            self.error = e


def _recv_some(conn: socket.socket, view: memoryview) -> int:
    """Receive into `view` (at least one byte); a closed connection mid-copy is an error."""
    k = conn.recv_into(view, len(view))
    if k == 0:
        raise TransferError("the sending host closed the connection mid-copy", hint="try the copy again")
    return k


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        got += _recv_some(conn, view[got:])
    return bytes(buf)


def receive(
    address: tuple[str, int],
    out: Path,
    on_bytes: Callable[[int], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Copy the snapshot a `Sender` serves at `address` to `out` (which must not exist), check
    it and publish it atomically. Returns `out`.

    Each file is hashed as it arrives and its writeback starts as it is written, so the copy
    ends with a short fsync per file instead of a second pass over every byte and a sync of
    the whole host."""
    if out.exists():
        raise UsageError(f"{out} already exists", hint="remove it or copy to another name")
    staging = atomic.staging_dir(out)
    try:
        with socket.create_connection(address, timeout=timeout) as conn:
            (hlen,) = struct.unpack("<Q", _recv_exact(conn, 8))
            entries = json.loads(_recv_exact(conn, hlen))
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            m: manifest.Manifest | None = None  # the manifest comes first: it says what the rest must be
            expected: dict[str, manifest.FileEntry] = {}
            for e in entries:
                rel = Path(e["path"])
                if rel.is_absolute() or ".." in rel.parts:
                    raise IntegrityError(f"the sender named a file outside the snapshot: {rel}")
                if m is None and e["path"] != manifest.MANIFEST:
                    raise IntegrityError("the sender's copy does not start with the snapshot's manifest")
                want = expected.pop(e["path"], None) if m is not None else None
                if m is not None and (want is None or want.size != e["size"]):
                    raise IntegrityError(f"the sender's {rel} is not the file its manifest lists")
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = _receive_file(conn, dest, e, view, on_bytes)
                if want is not None:
                    manifest.check_digest(want, digest)  # damaged in transit or at the source
                else:
                    m = manifest.load(staging)
                    expected = {f.path: f for f in m.files}
            if m is None or expected:
                missing = sorted(expected)[0] if expected else manifest.MANIFEST
                raise IntegrityError(f"the copy lacks {missing}, which the snapshot needs")
            conn.sendall(b"k")
        verified.record(staging, m.files)
        atomic.publish(staging, out, files_synced=True)
    except BaseException:
        atomic.discard(staging)
        raise
    return out


def _receive_file(
    conn: socket.socket,
    dest: Path,
    e: dict[str, Any],
    view: memoryview,
    on_bytes: Callable[[int], None] | None,
) -> str:
    """Write one file's runs as they arrive (holes stay holes), hashing it on the way, and fsync
    it; returns its digest."""
    h = manifest.new_hasher()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, e["mode"] | 0o600)
    try:
        os.ftruncate(fd, e["size"])
        pos = 0
        for off, length in e["runs"]:
            if off < pos or off + length > e["size"]:
                raise IntegrityError(f"the sender's runs of {e['path']} overlap or overrun it")
            manifest.update_zeros(h, off - pos)
            done = 0
            while done < length:
                k = _recv_some(conn, view[: min(CHUNK, length - done)])
                os.pwrite(fd, view[:k], off + done)
                h.update(view[:k])
                atomic.start_writeback(fd, off + done, k)
                done += k
                if on_bytes:
                    on_bytes(k)
            pos = off + length
        manifest.update_zeros(h, e["size"] - pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    return str(h.hexdigest())
