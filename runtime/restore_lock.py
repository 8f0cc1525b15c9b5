"""One restore of a snapshot at a time on a host.

Two restores of one snapshot started together both passed the checks (port free, PIDs free),
then raced: CRIU failed for one of them on the other's PIDs or port, and its cleanup removed
the /dev/shm files it had put back, which the winner's tree was using. A restore of a
snapshot therefore holds a lock for it (flock on a file in the run directory, keyed by the
snapshot's real path) from its first check until it is serving or has failed; a second one
fails at once, naming the holder. The lock goes with its holder's descriptor, so a killed
restore leaves nothing to clean up. Containers have their own run directory and network
namespace: each can still restore the same snapshot at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fastvllm.runtime import instances
from fastvllm.runtime.errors import SnapshotBusyError


def _lock_path(snapshot: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(snapshot))).hexdigest()[:16]
    return instances.instances_dir() / "locks" / f"restore-{key}.lock"


@contextlib.contextmanager
def restoring(snapshot: Path) -> Iterator[None]:
    """Hold the restore lock of `snapshot` for the block; SnapshotBusyError if another process
    of this host holds it. Where no lock file can be made (a read-only run directory), the
    restore goes on unlocked: the lock prevents a race, it is not needed for correctness of
    a single restore."""
    path = _lock_path(snapshot)
    fd = -1
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if fd < 0:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            by = f"pid {holder}" if holder else "another fastvllm process"
            raise SnapshotBusyError(
                f"snapshot {snapshot} is being restored by {by} on this host",
                hint="wait for that restore to finish (a second copy of one snapshot on one host "
                "needs its own network namespace: restore it with --container)",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(fd: int, wait_s: float = 0.2) -> str:
    """The PID the lock's holder wrote, waiting briefly: a holder that has just taken the lock
    writes it a moment later ("" if it has not by then)."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder.isdigit() or time.monotonic() >= deadline:
            return holder if holder.isdigit() else ""
        time.sleep(0.005)


CRIU_WAIT_S = 300.0  # a CRIU dump or restore takes seconds; one that holds the lock longer is stuck
_held = threading.local()  # this thread's depth in criu_exclusive (it nests: pipeline, then criu.py)


@contextlib.contextmanager
def criu_exclusive(poll_s: float = 0.02) -> Iterator[None]:
    """One CRIU dump or restore at a time on a host (per run directory: a container has its
    own, and its own /dev/shm). A tree's deleted /dev/shm files (vLLM's semaphores) travel as
    `link_remap.<id>` files: a dump leaves them in /dev/shm and fastvllm's action script moves
    every one of them into the snapshot; a restore puts its copies back, and CRIU opens and
    unlinks them. The ids come from the dump, so two trees of one model have the same ones: a
    restore beside another restore or a dump had its file unlinked or taken ("Couldn't unlink
    remap /dev/shm/link_remap.252"). The block holds a host lock (flock, released with its
    holder's descriptor); within one thread it nests. Only CRIU's own part waits: the rest of
    two snapshots or restores still overlaps."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    path = instances.instances_dir() / "locks" / "criu.lock"
    fd = -1
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if fd < 0:  # a read-only run directory: unserialised, as before
        yield
        return
    try:
        deadline = time.monotonic() + CRIU_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SnapshotBusyError(
                        f"another CRIU dump or restore on this host (pid {holder}) has held its lock "
                        f"for {CRIU_WAIT_S:.0f} s",
                        hint=f"check that process; its lock is {path}",
                    ) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
    finally:
        os.close(fd)
