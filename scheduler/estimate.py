"""Time to ready of a model on a host, and where to put it.

Pure functions over plain data, so the same formula serves the node agents, the Ray
controller, the CLI and the simulator, and is unit-tested on tables of cases:

    ready_s = queue wait + resident bytes / memory bw + local non-resident bytes / disk bw
              + remote bytes / network bw (+ GPU bytes / host-to-device bw)

`PlacementIndex` is the same formula vectorised over every host with numpy: per-host
bandwidth arrays and, per model, the few hosts that hold it (an inverted index), so a
decision costs O(hosts) array arithmetic, not a scan of every host's snapshots.

Two spreading rules sit on top of "fastest host wins", both fed by `Demand` (recent requests
per model, which the controller and the simulator record as they place):

- estimates within `SPREAD.tie` of the best are ties (bandwidths are measured with about that
  much error), and a tie goes to the host whose page cache holds the least *recently
  requested* data per copy: a cold model's fetch then lands where it evicts, and occupies the
  loader and a slot of, a host no busy model depends on;
- a model whose demand outruns its page-cache copies (requests/s x a page-cache restore /
  copies > `SPREAD.util`) goes to the fastest host without a copy if that is at most
  `SPREAD.slack` slower: the one request pays a little, and the next burst finds one more
  host that restores it from memory instead of queueing behind the few that do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from fastvllm.runtime.errors import UsageError

INF = float("inf")


@dataclass(frozen=True)
class Spread:
    """The spreading rules' knobs (module docstring). `tie` 0 turns both rules off."""

    tie: float = 0.1  # relative: estimates this close count as equal
    util: float = 0.2  # requests/s x page-cache restore s / resident copies above this: under-replicated
    slack: float = 0.5  # an under-replicated model accepts a host this much slower without a copy
    tau_s: float = 120.0  # time constant of the demand's exponential decay


SPREAD = Spread()
NO_SPREAD = Spread(tie=0.0)


class Demand:
    """Requests per model, exponentially decayed (time constant `tau_s`): what the controller
    saw recently, so placement can tell a busy model's page-cache copies from idle ones.

    Weights are kept scaled by e^(t/tau) from a reference time, so a request adds one number
    and nothing decays in place; the scale is moved forward (`note` returns the factor every
    stored weight was multiplied by) before it can overflow."""

    def __init__(self, tau_s: float = SPREAD.tau_s) -> None:
        self.tau = tau_s
        self._t0: float | None = None
        self._w: dict[str, float] = {}

    def note(self, model: str, now: float) -> float:
        """Count a request for `model` at `now` (seconds, any monotonic clock); returns the
        factor all weights were rescaled by (1.0 mostly)."""
        factor = 1.0
        if self._t0 is None:
            self._t0 = now
        elif (now - self._t0) / self.tau > 30.0:
            factor = math.exp(-(now - self._t0) / self.tau)
            self._w = {m: w * factor for m, w in self._w.items() if w * factor > 1e-12}
            self._t0 = now
        self._w[model] = self._w.get(model, 0.0) + math.exp((now - self._t0) / self.tau)
        return factor

    def weight(self, model: str) -> float:
        """The model's weight in the current scale (comparable across models, not across time)."""
        return self._w.get(model, 0.0)

    def rate(self, model: str, now: float) -> float:
        """Recent requests per second for `model`."""
        if self._t0 is None:
            return 0.0
        return self._w.get(model, 0.0) * math.exp(-(now - self._t0) / self.tau) / self.tau

    def rates(self, now: float) -> dict[str, float]:
        return {m: self.rate(m, now) for m in self._w}


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
    demand: Mapping[str, float] | None = None,
    spread: Spread = SPREAD,
) -> Decision:
    """Pick the fastest host with a free slot. A host without one is still an option two
    ways: wait for its queue (`queue_s` then counts the wait for a slot), or migrate one of
    its live sessions to a host with a free slot first (ServerlessLLM's idea) when the new
    model's locality there is worth it. `sizes` gives the sizes of the models live sessions
    run (for the migration's own restore estimate). `demand` (model -> recent requests/s,
    `Demand.rates`) turns on the spreading rules of the module docstring; without it the
    fastest option wins."""
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
    best = opts[0]
    if demand and spread.tie > 0 and best.seconds < INF:
        best = _spread_choice(model, size, gpu_bytes, live, opts, demand, spread, sizes or {})
    if opts[0].seconds == INF:
        if not free:
            raise UsageError(
                f"every host that could restore {model} is full",
                hint="stop an instance ('fastvllm cluster status' lists them) or add a host",
            )
        raise UsageError(
            f"no host can restore {model}", hint="a GPU snapshot needs a host with a GPU; add one"
        )
    return Decision(best, opts)


def _resident(loc: Locality | None) -> bool:
    return loc is not None and loc.resident_bytes > 0


def _spread_choice(
    model: str,
    size: int,
    gpu_bytes: int,
    live: Sequence[HostView],
    opts: Sequence[Option],
    demand: Mapping[str, float],
    spread: Spread,
    sizes: Mapping[str, int],
) -> Option:
    """`place`'s spreading rules over its sorted options (the module docstring says why)."""
    copies: dict[str, int] = {}
    for h in live:
        for m, loc in h.snapshots.items():
            if _resident(loc):
                copies[m] = copies.get(m, 0) + 1
    # page-cache pressure: recently requested bytes per copy, other models only
    pressure = {
        h.name: sum(
            demand.get(m, 0.0) * sizes.get(m, loc.bytes) / copies[m]
            for m, loc in h.snapshots.items()
            if m != model and _resident(loc)
        )
        for h in live
    }
    plain = [o for o in opts if o.kind != "migrate"]
    if not plain:
        return opts[0]
    top = opts[0].seconds * (1 + spread.tie)
    ties = [o for o in plain if o.seconds <= top]
    best = min(ties, key=lambda o: (pressure[o.host], o.seconds)) if ties else opts[0]
    n = copies.get(model, 0)
    mem = sorted(h.bw.memory for h in live)[len(live) // 2]
    h2d = sorted(h.bw.h2d for h in live)[len(live) // 2]
    per = size / mem + (gpu_bytes / h2d if gpu_bytes and h2d > 0 else 0.0)
    if demand.get(model, 0.0) * per / max(n, 1) > spread.util:
        has = {h.name for h in live if _resident(h.snapshots.get(model))}
        fresh = [o for o in plain if o.host not in has and o.seconds <= best.seconds * (1 + spread.slack)]
        if fresh:
            best = fresh[0]  # sorted: the fastest host without a copy
    return best


class PlacementIndex:
    """`place` for fleets: 1,000 hosts x 10,000 models in well under a millisecond a decision.

    Per-host arrays hold bandwidths, queue waits and free slots; per model a short array of
    the hosts holding its snapshot and their resident bytes. A decision fills a remote-fetch
    time for every host, overwrites the holders' entries with local times, adds queue waits,
    masks full hosts and takes the argmin. Migration is left to `place` (rare, few hosts).
    """

    def __init__(self, hosts: Sequence[str], bw: Sequence[Bandwidths], spread: Spread = SPREAD) -> None:
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
        # the spreading rules' state: recent demand per model, which hosts hold each model in
        # their page cache, and per host the demand-weighted bytes per copy it holds there
        # (`pressure`), kept up to date as residency and demand change
        self.spread = spread
        self.demand = Demand(spread.tau_s)
        self._res: dict[str, set[int]] = {}
        self._bytes: dict[str, float] = {}
        self._contrib: dict[str, float] = {}
        self.pressure = np.zeros(n)
        self._now = 0.0  # when the last request was noted
        self._mem_median = float(np.median(self.mem)) if n else 0.0
        self._h2d_median = float(np.median(self.h2d)) if n else 0.0

    def set_snapshots(self, host: str, snaps: Mapping[str, Locality]) -> None:
        """Replace what `host` holds (its agent's latest report)."""
        i = self.pos[host]
        for model in list(self._holders):
            hs, by, rs = self._holders[model]
            keep = hs != i
            if not keep.all():
                self._holders[model] = (hs[keep], by[keep], rs[keep])
                self._set_resident(model, i, False)
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
        self._bytes[model] = float(loc.bytes)
        self._set_resident(model, i, loc.resident_bytes > 0)

    def remove_snapshot(self, host: str, model: str) -> None:
        got = self._holders.get(model)
        if got is None:
            return
        keep = got[0] != self.pos[host]
        self._holders[model] = (got[0][keep], got[1][keep], got[2][keep])
        self._set_resident(model, self.pos[host], False)

    def _set_resident(self, model: str, i: int, resident: bool) -> None:
        """Host i holds `model` in its page cache (or not): move the model's share of demand
        onto (or off) i, and re-split it over its copies."""
        res = self._res.setdefault(model, set())
        if (i in res) == resident:
            return
        old = self._contrib.get(model, 0.0)
        if res:
            self.pressure[list(res)] -= old
        if resident:
            res.add(i)
        else:
            res.discard(i)
        self._spread_demand(model)

    def _spread_demand(self, model: str) -> None:
        res = self._res.get(model)
        if not res:
            self._contrib[model] = 0.0
            return
        new = self.demand.weight(model) * self._bytes.get(model, 0.0) / len(res)
        self.pressure[list(res)] += new
        self._contrib[model] = new

    def note_request(self, model: str, now: float) -> None:
        """A request for `model` arrived at `now` (placement's demand signal)."""
        self._now = now
        factor = self.demand.note(model, now)
        if factor != 1.0:  # the demand's scale moved forward: every stored share with it
            self.pressure *= factor
            self._contrib = {m: c * factor for m, c in self._contrib.items()}
        res = self._res.get(model)
        if res:
            self.pressure[list(res)] -= self._contrib.get(model, 0.0)
        self._spread_demand(model)

    def pick(self, model: str, t: np.ndarray, size: int, gpu_bytes: int = 0) -> int:
        """The host to use given every host's estimate `t` for `model` (inf: not an option):
        the fastest, after the spreading rules (module docstring) once demand is recorded."""
        i = int(np.argmin(t))
        best = float(t[i])
        sp = self.spread
        if sp.tie <= 0 or best == INF or self.demand.weight(model) == 0.0:
            return i
        cand = np.flatnonzero(t <= best * (1 + sp.tie))
        res = self._res.get(model, set())
        pr = self.pressure[cand]
        if res:  # a host's own copy of this model is no reason to avoid it
            pr = pr - np.isin(cand, list(res)) * self._contrib.get(model, 0.0)
        i = int(cand[np.lexsort((t[cand], pr))[0]])
        per = size / self._mem_median
        if gpu_bytes and self._h2d_median:
            per += gpu_bytes / self._h2d_median
        rate = self.demand.rate(model, self._now)
        if rate * per / max(len(res), 1) > sp.util:
            fresh = t.copy()
            if res:
                fresh[list(res)] = INF
            k = int(np.argmin(fresh))
            if fresh[k] <= t[i] * (1 + sp.slack):
                i = k
        return i

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
        i = self.pick(model, t, size, gpu_bytes)
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
