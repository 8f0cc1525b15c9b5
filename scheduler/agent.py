"""The node agent: one per host. It knows the host's snapshots and how much of each the page
cache holds, its free slots, its restore queue and its own measured bandwidths, and it runs
restores there (one at a time: restores share the disk, so queueing them is what the
estimate's queue term models).

The same class runs embedded (single host, no Ray) and inside a Ray actor pinned to its
node (`scheduler.ray_runtime`); everything it returns is plain JSON-able data. Agents also copy
snapshots to each other (`serve_snapshot` on the holder, `fetch_snapshot` on the receiver).
"""

from __future__ import annotations

import contextlib
import glob
import mmap
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.prefetch import residency
from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
from fastvllm.runtime import instances, journal, manifest, proctree, sparse
from fastvllm.runtime.errors import UsageError
from fastvllm.scheduler import probe, transfer
from fastvllm.scheduler.estimate import Bandwidths, HostView, Locality, Session, restore_seconds


@dataclass
class SnapshotInfo:
    model: str  # the served model name: what clients ask for
    path: str
    bytes: int  # its data: holes in sparse files are neither read nor copied, so they cost nothing
    files: int
    resident_bytes: int


@dataclass
class InstanceInfo:
    pid: int
    url: str
    model: str
    snapshot: str
    host: str  # the agent's node name
    restore_s: float = 0.0
    copy_s: float = 0.0  # copying the snapshot from a peer first (0: it was here)


@dataclass
class Report:
    name: str
    address: str
    bw: dict[str, float]
    slots: int
    free_slots: int
    queue_s: float
    queued: list[str]
    snapshots: list[SnapshotInfo]
    instances: list[InstanceInfo]
    sessions: list[dict[str, Any]] = field(default_factory=list)
    measured_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def view(self) -> HostView:
        """The placement module's view of this host."""
        snaps: dict[str, Locality] = {}
        for s in self.snapshots:  # several snapshots of one model: the most resident counts
            cur = snaps.get(s.model)
            if cur is None or s.resident_bytes > cur.resident_bytes:
                snaps[s.model] = Locality(s.bytes, s.resident_bytes)
        sessions = [Session(str(s["id"]), str(s["model"]), int(s["tokens"])) for s in self.sessions]
        return HostView(
            self.name,
            Bandwidths(**self.bw),
            self.free_slots,
            self.queue_s,
            snapshots=snaps,
            sessions=sessions,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        d = dict(d)
        d["snapshots"] = [SnapshotInfo(**s) for s in d["snapshots"]]
        d["instances"] = [InstanceInfo(**i) for i in d["instances"]]
        return cls(**d)


def gpu_count() -> int:
    return len(glob.glob("/dev/nvidia[0-9]*"))


def scan(root: Path) -> list[SnapshotInfo]:
    """Every published vLLM snapshot directly under `root`, with its page-cache residency."""
    out: list[SnapshotInfo] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not (d / manifest.MANIFEST).is_file() or d.name.startswith("."):
            continue
        try:
            if manifest.kind(d) != "vllm":
                continue
            m = manifest.load(d)
        except UsageError:
            continue  # half-written or foreign: not a snapshot this agent can restore
        paths = [d / f.path for f in m.files]
        with contextlib.suppress(UsageError, OSError):
            res = residency.of_files(paths)
            # A snapshot's /dev/shm copies are sparse files, nearly all holes: counted by their
            # size, a warm snapshot's holes would be charged at disk speed and could lose to a
            # cold one on a host whose disk probe read faster.
            data = [sum(n for _, n in sparse.file_extents(p)[2]) for p in paths]
            resident = sum(min(r.resident_pages * mmap.PAGESIZE, n) for r, n in zip(res, data, strict=True))
            out.append(SnapshotInfo(m.server.served_model_name, str(d), sum(data), len(paths), resident))
    return out


class NodeAgent:
    """Reports and restores for one host. `slots`: how many servers it may run at once (its
    GPUs where it has some; on a CPU host, what its memory allows)."""

    def __init__(
        self, name: str, snapshot_root: Path | str, slots: int | None = None, address: str = "127.0.0.1"
    ) -> None:
        # What an agent killed before left on this host (runtime.journal). Signals: the process
        # that runs the agent installs runtime.signals (the CLI, the Ray actor); a restore in a
        # worker thread stops at its next step once one came (runtime.signals.check).
        journal.recover()
        self.name = name
        self.root = Path(snapshot_root)
        self.slots = slots if slots is not None else max(gpu_count(), 1)
        self.address = address
        self._lock = threading.Lock()  # one restore at a time on this host
        self._mu = threading.Lock()  # guards the fields below
        self._queued: list[tuple[str, float]] = []  # (model, estimated seconds)
        self._running_until = 0.0  # estimated end of the restore in progress
        self._instances: dict[int, InstanceInfo] = {}
        self._senders: list[transfer.Sender] = []
        self.sink = probe.Sink()
        t0 = time.perf_counter()
        disk, memory = probe.disk_and_memory(self.root)
        self.bw = Bandwidths(disk=disk, memory=memory, network=0.0, h2d=probe.host_to_device())
        self.probe_s = time.perf_counter() - t0

    def sink_address(self) -> tuple[str, int]:
        return self.address, self.sink.port

    def measure_network(self, peers: list[tuple[str, int]]) -> float:
        """Time a burst to each peer's sink; the median becomes this host's network bandwidth."""
        bw = probe.network([p for p in peers if tuple(p) != self.sink_address()])
        self.bw = Bandwidths(self.bw.disk, self.bw.memory, bw, self.bw.h2d)
        return bw

    def _live(self) -> list[InstanceInfo]:
        with self._mu:
            dead = [pid for pid in self._instances if not proctree.alive(pid)]
            for pid in dead:
                del self._instances[pid]
            return list(self._instances.values())

    def report(self) -> dict[str, object]:
        live = self._live()
        with self._mu:
            queue_s = max(self._running_until - time.time(), 0.0) + sum(s for _, s in self._queued)
            queued = [m for m, _ in self._queued]
        return Report(
            self.name,
            self.address,
            self.bw.as_dict(),
            self.slots,
            max(self.slots - len(live) - len(queued), 0),
            queue_s,
            queued,
            scan(self.root),
            live,
        ).as_dict()

    def _snapshot_for(self, model: str) -> SnapshotInfo:
        snaps = [s for s in scan(self.root) if s.model == model]
        if not snaps:
            raise UsageError(
                f"host {self.name} holds no snapshot of {model}",
                hint=f"put one under {self.root} (fastvllm snapshot MODEL --out {self.root}/NAME)",
            )
        return max(snaps, key=lambda s: s.resident_bytes)

    def restore(self, model: str) -> dict[str, object]:
        """Restore `model` here (after the restores queued before it) and return the instance."""
        snap = self._snapshot_for(model)
        est = restore_seconds(snap.bytes, self.bw, Locality(snap.bytes, snap.resident_bytes))
        item = (model, est)
        with self._mu:
            self._queued.append(item)
        try:
            with self._lock:
                with self._mu:
                    self._queued.remove(item)
                    self._running_until = time.time() + est
                t0 = time.perf_counter()
                res = restore_snapshot(RestoreOptions(Path(snap.path)))
                took = time.perf_counter() - t0
        finally:
            with self._mu:
                if item in self._queued:
                    self._queued.remove(item)
                self._running_until = 0.0
        inst = InstanceInfo(res.server.pid, res.server.base_url, model, snap.path, self.name, took)
        with self._mu:
            self._instances[inst.pid] = inst
        return asdict(inst)

    def serve_snapshot(self, model: str) -> dict[str, object]:
        """Offer this host's snapshot of `model` (the most resident one) to one peer: a sender
        waits for its connection; the offer says where it listens."""
        snap = self._snapshot_for(model)
        sender = transfer.Sender(Path(snap.path))
        with self._mu:
            self._senders = [s for s in self._senders if s.thread.is_alive()] + [sender]
        return {
            "address": [self.address, sender.port],
            "name": Path(snap.path).name,
            "bytes": snap.bytes,
            "from": self.name,
        }

    def fetch_snapshot(self, offer: dict[str, Any]) -> dict[str, object]:
        """Copy the snapshot a peer offers (`serve_snapshot`) into this host's snapshot directory;
        it counts in this host's queue while it arrives. Returns where it went and how long it took."""
        name, size, src = str(offer["name"]), int(offer["bytes"]), str(offer["from"])
        out = self.root / name
        if out.exists():
            out = self.root / f"{name}-from-{src}-{int(time.time())}"
        est = size / self.bw.network if self.bw.network > 0 else 0.0
        item = (f"copy of {name}", est)
        with self._mu:
            self._queued.append(item)
        t0 = time.perf_counter()
        try:
            address = offer["address"]
            transfer.receive((str(address[0]), int(address[1])), out)
        finally:
            with self._mu:
                self._queued.remove(item)
        return {"path": str(out), "bytes": size, "seconds": time.perf_counter() - t0, "from": src}

    def stop(self, pid: int) -> None:
        with self._mu:
            self._instances.pop(pid, None)
        tree = proctree.session_pids(pid) if proctree.alive(pid) else []
        with contextlib.suppress(UsageError):
            instances.stop(pid)
        proctree.wait_gone(tree, 30, reaped=True)

    def stop_all(self, wait_s: float = 300.0) -> None:
        """Stop every instance this agent started, after the restore in progress (if any) has
        finished or, told to stop by a signal (runtime.signals), undone itself: a server it
        brings up meanwhile is stopped too."""
        got = self._lock.acquire(timeout=wait_s)
        try:
            for inst in self._live():
                self.stop(inst.pid)
        finally:
            if got:
                self._lock.release()

    def close(self) -> None:
        self.sink.close()
        for s in self._senders:
            s.close()

    def pid(self) -> int:
        return os.getpid()
