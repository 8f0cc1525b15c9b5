"""Placement simulator: a serverless fleet restoring models on demand, three placement policies.

Arrivals come from a gamma process with CV 8 (shape 1/cv², scale cv²/rate: bursty, as
ServerlessLLM evaluates) over many models of several sizes, Zipf popularity. Every request
starts an instance (scale from zero), which holds a GPU slot while it loads and then for
its service time. Hosts differ: disk, page-cache and network bandwidths are drawn per host,
snapshots sit on a few hosts' disks, and a host's page cache (LRU, its RAM) holds what it
restored recently. A host restores one model at a time (the queue the estimate counts).

Time to ready on a host = queue wait + (page cache ? size / memory bw : on disk ? size /
disk bw : size / network bw) + size / host-to-device bw: the truth every policy is judged by.

Policies:
- random: a random host with a free slot.
- serverlessllm: ServerlessLLM-style estimate: two tiers (model in the DRAM pool, or else
  on disk), fixed bandwidths for every host, queue-aware.
- ours: `fastvllm.scheduler.estimate.PlacementIndex` with each host's measured bandwidths
  (true values with 10% measurement noise), page cache / local disk / remote tiers, queue
  and slot waits, and the estimator's spreading rules (`estimate.Spread`: ties go to hosts
  whose page cache holds the least recently requested data; a model whose demand outruns
  its page-cache copies goes to a new host when that is at most 1.5x slower), fed with the
  requests it has placed, as the controller feeds them.

Both estimate-driven policies may live-migrate (ServerlessLLM's idea, `--no-migration` turns
it off): when m would load fastest on a full host, its running session with the smallest
model moves to a free host first (that model's restore there + a re-prefill), if m is then
ready sooner than anywhere else. Each judges that with its own estimates.

    python -m fastvllm.scheduler.simulate --hosts 1000 --models 10000 --out results/placement
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastvllm.scheduler.estimate import INF, NO_SPREAD, SPREAD, Bandwidths, Locality, PlacementIndex

GB = 1e9
POLICIES = ("random", "serverlessllm", "ours")


@dataclass
class Config:
    hosts: int = 1000
    models: int = 10000
    gpus_per_host: int = 8
    ram_gb: float = 512.0  # page cache a host can give to snapshots
    disk_gb: float = 4000.0
    replicas: int = 2  # hosts holding each model's snapshot on disk at the start
    requests: int = 30000
    cv: float = 8.0
    load: float = 0.6  # mean share of GPU slots busy
    service_s: float = 60.0  # mean time an instance serves after it is ready (exponential)
    zipf: float = 1.0
    noise: float = 0.1  # our bandwidth measurements: lognormal error, sigma
    warmup: float = 0.1  # share of the first requests left out of the statistics
    migration: bool = True  # the estimate-driven policies may move a live session to free a slot
    migration_prefill_s: float = 0.2  # re-prefilling a session's tokens on its new host
    seed: int = 7
    # the ServerlessLLM-style policy's fixed bandwidths (GB/s)
    sllm_dram: float = 20.0
    sllm_disk: float = 3.0


# model sizes (GB of snapshot, all of it weights that go to the GPU) and their shares
SIZES_GB = np.array([2.0, 8.0, 16.0, 32.0, 64.0])
SIZE_P = np.array([0.3, 0.3, 0.2, 0.15, 0.05])
# per-host bandwidth choices (GB/s): NVMe generations, page cache, 10/25 GbE, PCIe 4/5
DISK = np.array([2.0, 4.0, 7.0])
MEM = np.array([15.0, 25.0])
NET = np.array([1.25, 3.1])
H2D = np.array([25.0, 50.0])


@dataclass
class Fleet:
    size: np.ndarray  # bytes per model
    disk: np.ndarray  # bytes/s per host
    mem: np.ndarray
    net: np.ndarray
    h2d: np.ndarray
    on_disk: list[OrderedDict[int, float]]  # per host: model -> bytes (LRU, originals pinned)
    pinned: list[set[int]]
    arrivals: np.ndarray  # seconds
    model_of: np.ndarray  # model per request
    service: np.ndarray  # seconds per request


def make_fleet(c: Config) -> Fleet:
    rng = np.random.default_rng(c.seed)
    size = rng.choice(SIZES_GB, c.models, p=SIZE_P) * GB
    pick = lambda arr: rng.choice(arr, c.hosts) * GB  # noqa: E731
    disk, mem, net, h2d = pick(DISK), pick(MEM), pick(NET), pick(H2D)
    on_disk: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(c.hosts)]
    pinned: list[set[int]] = [set() for _ in range(c.hosts)]
    for m in range(c.models):
        for h in rng.choice(c.hosts, c.replicas, replace=False):
            on_disk[h][m] = size[m]
            pinned[h].add(m)
    slots = c.hosts * c.gpus_per_host
    ranks = np.arange(1, c.models + 1, dtype=np.float64)
    pop = ranks**-c.zipf
    pop /= pop.sum()
    model_of = rng.permutation(c.models)[rng.choice(c.models, c.requests, p=pop)]
    mean_restore = float((size[model_of] / GB).mean()) / 4.0  # rough: shapes only the rate
    rate = c.load * slots / (c.service_s + mean_restore)
    shape, scale = 1.0 / c.cv**2, c.cv**2 / rate
    arrivals = np.cumsum(rng.gamma(shape, scale, c.requests))
    service = rng.exponential(c.service_s, c.requests)
    return Fleet(size, disk, mem, net, h2d, on_disk, pinned, arrivals, model_of, service)


class Sim:
    """One policy over one fleet; the same arrivals and start state for every policy."""

    def __init__(self, c: Config, f: Fleet, policy: str) -> None:
        self.c, self.f, self.policy = c, f, policy
        self.rng = np.random.default_rng(c.seed + 1)
        self.on_disk = [OrderedDict(d) for d in f.on_disk]
        self.disk_used = np.array([sum(d.values()) for d in self.on_disk])
        self.cache: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(c.hosts)]
        self.cache_used = np.zeros(c.hosts)
        self.slot_free_at = np.zeros((c.hosts, c.gpus_per_host))
        self.slot_model = np.zeros((c.hosts, c.gpus_per_host), dtype=np.int64)  # what each slot runs
        self.loader_free = np.zeros(c.hosts)
        names = [f"h{i}" for i in range(c.hosts)]
        if policy == "ours":
            noise = lambda: np.exp(self.rng.normal(0, c.noise, c.hosts))  # noqa: E731
            bws = zip(f.disk * noise(), f.mem * noise(), f.net * noise(), f.h2d * noise(), strict=True)
            self.idx = PlacementIndex(names, [Bandwidths(d, m, n, g) for d, m, n, g in bws], SPREAD)
            for h, d in enumerate(self.on_disk):
                for m, b in d.items():
                    self.idx.add_snapshot(names[h], f"m{m}", Locality(int(b), 0))
        elif policy == "serverlessllm":
            fixed = Bandwidths(c.sllm_disk * GB, c.sllm_dram * GB, c.sllm_disk * GB, float(np.median(f.h2d)))
            # fixed before the first run: fastest estimate wins, no demand-driven spreading
            self.idx = PlacementIndex(names, [fixed] * c.hosts, NO_SPREAD)
        self.names = names

    def migrate(self, now: float, src: int, j: int, dst: int, sm: int) -> int:
        """Move the session in slot j of `src` (model sm) to `dst`: its model restores there,
        its tokens are re-prefilled, then it switches and slot j of `src` is free. The session
        keeps its end time (it serves on, from dst). Returns the freed slot."""
        secs, tier = self.true_seconds(dst, sm)
        start = max(now, float(self.loader_free[dst]))
        self.loader_free[dst] = start + secs
        switch = start + secs + self.c.migration_prefill_s
        k = int(np.argmin(self.slot_free_at[dst]))
        self.slot_free_at[dst, k] = max(float(self.slot_free_at[src, j]), switch)
        self.slot_model[dst, k] = sm
        self.slot_free_at[src, j] = switch
        if tier == "remote":
            self._disk_add(dst, sm)
        self._cache_add(dst, sm)
        return j

    def true_seconds(self, h: int, m: int) -> tuple[float, str]:
        b = self.f.size[m]
        if m in self.cache[h]:
            t, tier = b / self.f.mem[h], "page_cache"
        elif m in self.on_disk[h]:
            t, tier = b / self.f.disk[h], "disk"
        else:
            t, tier = b / self.f.net[h], "remote"
        return t + b / self.f.h2d[h], tier

    def choose(self, now: float, m: int) -> tuple[int, float, tuple[int, int, int] | None]:
        """(host, seconds the decision took, migration or None) for a request for model m."""
        free = (self.slot_free_at <= now).sum(axis=1)
        if self.policy == "random":
            ok = np.flatnonzero(free > 0)
            if ok.size:
                return int(self.rng.choice(ok)), 0.0, None
            return int(np.argmin(self.slot_free_at.min(axis=1))), 0.0, None
        idx = self.idx
        idx.free[:] = free
        idx.queue[:] = np.maximum(self.loader_free - now, 0.0)
        idx.slot_free[:] = np.where(free > 0, INF, self.slot_free_at.min(axis=1) - now)
        t0 = time.perf_counter()
        host, mig = self.decide(m, now)
        return host, time.perf_counter() - t0, mig

    def decide(self, m: int, now: float) -> tuple[int, tuple[int, int, int] | None]:
        """The placement decision on the index's current state: `PlacementIndex.best`, and,
        when a host is full where m would load faster than anywhere free, moving its running
        session with the smallest model to a free host first (ServerlessLLM's live
        migration) if that makes m ready sooner. Only the two best full hosts are tried."""
        idx = self.idx
        size = int(self.f.size[m])
        if self.policy == "ours":  # the demand the spreading rules weigh (the controller does the same)
            idx.note_request(f"m{m}", now)
        if not self.c.migration:
            host, _ = idx.best(f"m{m}", size, size)
            return idx.pos[host], None
        t = idx.times(f"m{m}", size, size)
        here = t - idx.queue
        wait = np.where(idx.free > 0, t, here + np.maximum(idx.queue, idx.slot_free))
        i = idx.pick(f"m{m}", wait, size, size)
        best, move = float(wait[i]), None
        full = np.flatnonzero(idx.free == 0)
        if full.size and full.size < len(wait):
            for f in full[np.argsort(t[full])[:2]]:
                if t[f] >= best:
                    break
                running = self.slot_model[f]
                j = int(np.argmin(self.f.size[running]))
                sm = int(running[j])
                ts = idx.times(f"m{sm}", int(self.f.size[sm]), int(self.f.size[sm]))
                ts[idx.free == 0] = INF
                dst = int(np.argmin(ts))
                total = max(float(idx.queue[f]), float(ts[dst]) + self.c.migration_prefill_s) + float(here[f])
                if total < best:
                    best, i, move = total, int(f), (j, dst, sm)
        return i, move

    def _cache_add(self, h: int, m: int) -> None:
        b = self.f.size[m]
        c = self.cache[h]
        if m in c:
            c.move_to_end(m)
            return
        while c and self.cache_used[h] + b > self.c.ram_gb * GB:
            old, ob = c.popitem(last=False)
            self.cache_used[h] -= ob
            if self.policy == "ours":
                self.idx.add_snapshot(self.names[h], f"m{old}", Locality(int(ob), 0))
            elif self.policy == "serverlessllm":
                self.idx.remove_snapshot(self.names[h], f"m{old}")
        c[m] = b
        self.cache_used[h] += b
        if self.policy in ("ours", "serverlessllm"):
            self.idx.add_snapshot(self.names[h], f"m{m}", Locality(int(b), int(b)))

    def _disk_add(self, h: int, m: int) -> None:
        """A snapshot fetched from a peer stays on the host's disk (LRU; the original copies
        the fleet placed are never evicted)."""
        d = self.on_disk[h]
        b = self.f.size[m]
        if m in d:
            d.move_to_end(m)
            return
        for old in [k for k in d if k not in self.f.pinned[h]]:
            if self.disk_used[h] + b <= self.c.disk_gb * GB:
                break
            ob = d.pop(old)
            self.disk_used[h] -= ob
            if old in self.cache[h]:
                self.cache_used[h] -= self.cache[h].pop(old)
            if self.policy == "ours" or self.policy == "serverlessllm":
                self.idx.remove_snapshot(self.names[h], f"m{old}")
        d[m] = b
        self.disk_used[h] += b

    def run(self) -> dict[str, Any]:
        f = self.f
        n = self.c.requests
        ttr = np.zeros(n)
        tiers = np.empty(n, dtype=object)
        decide = []
        moved = 0
        for r in range(n):
            now, m = float(f.arrivals[r]), int(f.model_of[r])
            h, dt, mig = self.choose(now, m)
            decide.append(dt)
            if mig is None:
                j = int(np.argmin(self.slot_free_at[h]))
            else:
                j = self.migrate(now, h, *mig)
                moved += 1
            start = max(now, float(self.slot_free_at[h, j]), float(self.loader_free[h]))
            secs, tier = self.true_seconds(h, m)
            ready = start + secs
            self.loader_free[h] = ready
            self.slot_free_at[h, j] = ready + f.service[r]
            self.slot_model[h, j] = m
            ttr[r], tiers[r] = ready - now, tier
            if tier == "remote":
                self._disk_add(h, m)
            self._cache_add(h, m)
        keep = slice(int(n * self.c.warmup), n)
        t, k = ttr[keep], tiers[keep]
        out: dict[str, Any] = {
            "policy": self.policy,
            "migrations": moved,
            "p50_s": float(np.percentile(t, 50)),
            "p99_s": float(np.percentile(t, 99)),
            "mean_s": float(t.mean()),
            "share": {tier: float((k == tier).mean()) for tier in ("page_cache", "disk", "remote")},
            "ttr_sample": np.sort(t)[:: max(1, len(t) // 2000)].round(4).tolist(),
        }
        if self.policy != "random":
            d = np.array(decide) * 1e6
            out["decision_us"] = {"median": float(np.median(d)), "p99": float(np.percentile(d, 99))}
        return out


def decision_latency(c: Config, f: Fleet, samples: int = 2000) -> dict[str, Any]:
    """Time our decision alone (`Sim.decide`: the index, plus the migration check) on the full
    fleet, with every host's page cache filled (RAM's worth of random models each), so holders
    lists are as long as they get."""
    sim = Sim(c, f, "ours")
    rng = np.random.default_rng(c.seed + 2)
    for h in range(c.hosts):
        for m in rng.choice(c.models, int(c.ram_gb // SIZES_GB.mean()), replace=False):
            sim._cache_add(h, int(m))
    # a busy fleet: a fifth of the hosts full (so the migration check runs), the rest not
    sim.idx.free[:] = np.where(rng.random(c.hosts) < 0.2, 0, rng.integers(1, c.gpus_per_host + 1, c.hosts))
    sim.idx.queue[:] = rng.exponential(2.0, c.hosts)
    sim.idx.slot_free[:] = np.where(sim.idx.free > 0, INF, rng.exponential(30.0, c.hosts))
    sim.slot_model[:] = rng.choice(c.models, sim.slot_model.shape)
    # the models requested as the workload requests them, so the demand the spreading rules
    # weigh is there (and the under-replication rule runs) as in a simulated run
    models = f.model_of[rng.choice(c.requests, samples)]
    times, cpu = [], []
    for k, m in enumerate(models):
        c0, t0 = time.thread_time(), time.perf_counter()
        sim.decide(int(m), k * 0.01)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    us = np.array(times) * 1e6
    cpu_us = np.array(cpu) * 1e6  # this thread's CPU time: what a busy machine's preemption leaves out
    holders = [len(sim.idx.holders(f"m{m}")) for m in models[:200]]
    return {
        "hosts": c.hosts,
        "models": c.models,
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "cpu_median_us": float(np.median(cpu_us)),
        "cpu_p99_us": float(np.percentile(cpu_us, 99)),
        "mean_holders_per_model": statistics.mean(holders),
    }


def simulate(c: Config) -> dict[str, Any]:
    f = make_fleet(c)
    res: dict[str, Any] = {"config": asdict(c), "policies": {}}
    for p in POLICIES:
        t0 = time.perf_counter()
        res["policies"][p] = Sim(c, f, p).run()
        res["policies"][p]["wall_s"] = time.perf_counter() - t0
    ours, sllm, rnd = (res["policies"][p]["p99_s"] for p in ("ours", "serverlessllm", "random"))
    res["ratios"] = {"ours_p99_over_serverlessllm": ours / sllm, "ours_p99_over_random": ours / rnd}
    res["decision"] = decision_latency(c, f)
    return res


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p, r in res["policies"].items():
        ys = np.array(r["ttr_sample"])
        a.plot(ys, np.linspace(0, 1, len(ys)), label=p)
    a.set_xscale("log")
    a.set_xlabel("time to ready (s)")
    a.set_ylabel("CDF")
    a.legend()
    c = res["config"]
    a.set_title(f"{c['hosts']} hosts, {c['models']} models, gamma CV {c['cv']:g}")
    names = list(res["policies"])
    x = np.arange(len(names))
    b.bar(x - 0.2, [res["policies"][p]["p50_s"] for p in names], 0.4, label="p50")
    b.bar(x + 0.2, [res["policies"][p]["p99_s"] for p in names], 0.4, label="p99")
    b.set_xticks(x, names)
    b.set_ylabel("seconds")
    b.set_yscale("log")
    b.legend()
    b.set_title("time to ready")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in asdict(Config()).items():
        if isinstance(v, bool):
            ap.add_argument(f"--{k.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=v)
        else:
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=None, help="folder for placement.json and placement.png")
    a = ap.parse_args(argv)
    c = Config(**{k: getattr(a, k) for k in asdict(Config())})
    t0 = time.perf_counter()
    res = simulate(c)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    for p, r in res["policies"].items():
        sh = r["share"]
        print(
            f"{p:14s} p50 {r['p50_s']:8.2f} s  p99 {r['p99_s']:8.2f} s  page cache {sh['page_cache']:.0%}"
            f"  disk {sh['disk']:.0%}  remote {sh['remote']:.0%}  ({r['wall_s']:.1f} s to simulate)"
        )
    ra, d = res["ratios"], res["decision"]
    print(
        f"ours p99 / serverlessllm {ra['ours_p99_over_serverlessllm']:.3f}, "
        f"/ random {ra['ours_p99_over_random']:.3f}"
    )
    print(
        f"decision at {d['hosts']} hosts x {d['models']} models: "
        f"median {d['median_us']:.0f} us, p99 {d['p99_us']:.0f} us "
        f"(CPU time: median {d['cpu_median_us']:.0f} us, p99 {d['cpu_p99_us']:.0f} us)"
    )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "placement.json").write_text(json.dumps(res, indent=1) + "\n")
        chart(res, a.out / "placement.png")
        print(f"wrote {a.out / 'placement.json'} and placement.png")
    return res


if __name__ == "__main__":
    main()
