"""Time to ready of a model on a host, and where to put it.

Pure functions over plain data, so the same formula serves the node agents, the Ray
controller, the CLI and the simulator, and is unit-tested on tables of cases:

    ready_s = queue wait + resident bytes / memory bw + local non-resident bytes / disk bw
              + remote bytes / network bw (+ GPU bytes / host-to-device bw)

`PlacementIndex` is the same formula vectorised over every host with numpy: per-host
bandwidth arrays and, per model, the few hosts that hold it (an inverted index), so a
decision costs O(hosts) array arithmetic, not a scan of every host's snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from fastvllm.runtime.errors import UsageError

INF = float("inf")


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second a host measured itself (agent start-up probes)."""

    disk: float
    memory: float
    network: float
    h2d: float = 0.0  # 0: no GPU

    def as_dict(self) -> dict[str, float]:
        return {"disk": self.disk, "memory": self.memory, "network": self.network, "h2d": self.h2d}


@dataclass(frozen=True)
class Locality:
    """One model's snapshot on one host: its size and how much of it the page cache holds."""

    bytes: int
    resident_bytes: int = 0


@dataclass(frozen=True)
class Session:
    """A live request on a host that could be moved elsewhere to free its slot."""

    id: str
    model: str
    tokens: int  # prompt + generated so far: what the target must re-prefill


@dataclass
class HostView:
    """What placement needs to know about a host (a node agent's report, or a simulated one)."""

    name: str
    bw: Bandwidths
    free_slots: int
    queue_s: float = 0.0  # estimated time until its restore queue is empty
    slot_free_s: float = INF  # full host: when a slot frees (known to the simulator, not to agents)
    snapshots: dict[str, Locality] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    alive: bool = True


def restore_seconds(
    size: int, bw: Bandwidths, local: Locality | None, gpu_bytes: int = 0, queue_s: float = 0.0
) -> float:
    """The formula. `local` None: the snapshot is fetched from a peer over the network."""
    if size < 0 or gpu_bytes < 0 or queue_s < 0:
        raise UsageError("sizes and queue waits cannot be negative", hint="check the host report")
    if local is None:
        if bw.network <= 0:
            return INF  # no peer measured: nowhere to fetch the snapshot from
        t = size / bw.network
    else:
        resident = min(max(local.resident_bytes, 0), local.bytes)
        t = resident / bw.memory + (local.bytes - resident) / bw.disk
    if gpu_bytes:
        if bw.h2d <= 0:
            return INF  # a GPU snapshot cannot be restored on a host without one
        t += gpu_bytes / bw.h2d
    return queue_s + t


@dataclass(frozen=True)
class Option:
    kind: str  # "restore" | "migrate" | "wait"
    host: str
    seconds: float
    # migrate: the session moved off `host` and the host it goes to
    session: str | None = None
    session_to: str | None = None

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "host": self.host, "seconds": self.seconds}
        if self.session:
            d |= {"session": self.session, "session_to": self.session_to}
        return d


@dataclass(frozen=True)
class Decision:
    best: Option
    options: list[Option]  # every option considered, fastest first

    def as_dict(self) -> dict[str, object]:
        return {"best": self.best.as_dict(), "options": [o.as_dict() for o in self.options]}


def migration_seconds(session: Session, size_on_target: float, prefill_tokens_per_s: float) -> float:
    """Moving a live session: bring its model up on the target (`size_on_target`: that
    restore's estimate) and re-prefill its tokens there."""
    return size_on_target + session.tokens / prefill_tokens_per_s


def place(
    model: str,
    size: int,
    hosts: Sequence[HostView],
    *,
    gpu_bytes: int = 0,
    sizes: Mapping[str, int] | None = None,
    prefill_tokens_per_s: float = 2000.0,
) -> Decision:
    """Pick the fastest host with a free slot. A host without one is still an option two
    ways: wait for its queue (`queue_s` then counts the wait for a slot), or migrate one of
    its live sessions to a host with a free slot first (ServerlessLLM's idea) when the new
    model's locality there is worth it. `sizes` gives the sizes of the models live sessions
    run (for the migration's own restore estimate)."""
    live = [h for h in hosts if h.alive]
    if not live:
        raise UsageError("no live host to place on", hint="start a node agent (fastvllm cluster status)")
    opts: list[Option] = []
    free = [h for h in live if h.free_slots > 0]
    for h in live:
        here = restore_seconds(size, h.bw, h.snapshots.get(model), gpu_bytes)
        if h.free_slots > 0:
            opts.append(Option("restore", h.name, h.queue_s + here))
            continue
        # a full host: its restore starts when a slot frees and its queue is through
        opts.append(Option("wait", h.name, max(h.queue_s, h.slot_free_s) + here))
        for s in h.sessions:
            s_size = (sizes or {}).get(s.model, size)
            for dst in free:
                if dst.name == h.name:
                    continue
                mv = restore_seconds(s_size, dst.bw, dst.snapshots.get(s.model), 0, dst.queue_s)
                # the new model's restore starts once the slot is free (after the switch)
                total = migration_seconds(s, mv, prefill_tokens_per_s) + h.queue_s + here
                opts.append(Option("migrate", h.name, total, s.id, dst.name))
    opts.sort(key=lambda o: (o.seconds, o.kind != "restore", o.host))
    if opts[0].seconds == INF:
        if not free:
            raise UsageError(
                f"every host that could restore {model} is full",
                hint="stop an instance ('fastvllm cluster status' lists them) or add a host",
            )
        raise UsageError(
            f"no host can restore {model}", hint="a GPU snapshot needs a host with a GPU; add one"
        )
    return Decision(opts[0], opts)


class PlacementIndex:
    """`place` for fleets: 1,000 hosts x 10,000 models in well under a millisecond a decision.

    Per-host arrays hold bandwidths, queue waits and free slots; per model a short array of
    the hosts holding its snapshot and their resident bytes. A decision fills a remote-fetch
    time for every host, overwrites the holders' entries with local times, adds queue waits,
    masks full hosts and takes the argmin. Migration is left to `place` (rare, few hosts).
    """

    def __init__(self, hosts: Sequence[str], bw: Sequence[Bandwidths]) -> None:
        self.hosts = list(hosts)
        self.pos = {h: i for i, h in enumerate(self.hosts)}
        n = len(self.hosts)
        self.mem = np.array([b.memory for b in bw], dtype=np.float64)
        self.disk = np.array([b.disk for b in bw], dtype=np.float64)
        self.net = np.array([b.network for b in bw], dtype=np.float64)
        self.h2d = np.array([b.h2d for b in bw], dtype=np.float64)
        self.queue = np.zeros(n)
        self.free = np.zeros(n, dtype=np.int64)
        self.slot_free = np.full(n, INF)  # full hosts: when a slot frees
        self.alive = np.ones(n, dtype=bool)
        # model -> (host positions, snapshot bytes, resident bytes), kept small and contiguous
        self._holders: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def set_snapshots(self, host: str, snaps: Mapping[str, Locality]) -> None:
        """Replace what `host` holds (its agent's latest report)."""
        i = self.pos[host]
        for model in list(self._holders):
            hs, by, rs = self._holders[model]
            keep = hs != i
            if not keep.all():
                self._holders[model] = (hs[keep], by[keep], rs[keep])
        for model, loc in snaps.items():
            self.add_snapshot(host, model, loc)

    def add_snapshot(self, host: str, model: str, loc: Locality) -> None:
        i = self.pos[host]
        hs, by, rs = self._holders.get(model, (np.empty(0, np.int64), np.empty(0), np.empty(0)))
        at = np.flatnonzero(hs == i)
        if at.size:
            by, rs = by.copy(), rs.copy()
            by[at[0]], rs[at[0]] = loc.bytes, loc.resident_bytes
        else:
            hs, by, rs = np.append(hs, i), np.append(by, loc.bytes), np.append(rs, loc.resident_bytes)
        self._holders[model] = (hs, by, rs)

    def remove_snapshot(self, host: str, model: str) -> None:
        got = self._holders.get(model)
        if got is None:
            return
        keep = got[0] != self.pos[host]
        self._holders[model] = (got[0][keep], got[1][keep], got[2][keep])

    def holders(self, model: str) -> list[str]:
        return [self.hosts[i] for i in self._holders.get(model, (np.empty(0, np.int64),))[0]]

    def set_load(
        self, host: str, free_slots: int, queue_s: float, alive: bool = True, slot_free_s: float = INF
    ) -> None:
        i = self.pos[host]
        self.free[i], self.queue[i], self.alive[i] = free_slots, queue_s, alive
        self.slot_free[i] = slot_free_s

    def times(self, model: str, size: int, gpu_bytes: int = 0) -> np.ndarray:
        """Estimated seconds to ready on every host (inf where it cannot restore)."""
        with np.errstate(divide="ignore"):
            t = size / self.net  # net 0 (no peer): inf
        got = self._holders.get(model)
        if got is not None and got[0].size:
            hs, by, rs = got
            rs = np.minimum(rs, by)
            t[hs] = rs / self.mem[hs] + (by - rs) / self.disk[hs]
        if gpu_bytes:
            with np.errstate(divide="ignore"):
                t = t + np.where(self.h2d > 0, gpu_bytes / np.maximum(self.h2d, 1e-300), np.inf)
        return t + self.queue

    def best(self, model: str, size: int, gpu_bytes: int = 0) -> tuple[str, float]:
        """(host, seconds) of the fastest live host: a full host counts from when a slot frees
        there (`place`'s "wait" option), so with free hosts around it rarely wins."""
        t = self.times(model, size, gpu_bytes)
        t = np.where(self.free > 0, t, t - self.queue + np.maximum(self.queue, self.slot_free))
        t[~self.alive] = INF
        i = int(np.argmin(t))
        if t[i] == INF:
            raise UsageError(
                f"no host can restore {model}",
                hint="add a host with a free slot (and a GPU for GPU snapshots)",
            )
        return self.hosts[i], float(t[i])


def index_from_views(views: Iterable[HostView]) -> PlacementIndex:
    vs = list(views)
    idx = PlacementIndex([v.name for v in vs], [v.bw for v in vs])
    for v in vs:
        idx.set_snapshots(v.name, v.snapshots)
        idx.set_load(v.name, v.free_slots, v.queue_s, v.alive, v.slot_free_s)
    return idx
