"""The estimator and placement as pure functions, on tables of cases; the vectorised index
against the reference function on random fleets; the node agent's own measurements and
inventory on a real directory; the simulator's invariants on a small fleet."""

from __future__ import annotations

import math
import random

import pytest
from fastvllm.runtime.errors import UsageError
from fastvllm.scheduler.estimate import (
    INF,
    SPREAD,
    Bandwidths,
    Demand,
    HostView,
    Locality,
    PlacementIndex,
    Session,
    index_from_views,
    place,
    restore_seconds,
)

GB = 10**9
BW = Bandwidths(disk=2 * GB, memory=20 * GB, network=1 * GB)
BW_GPU = Bandwidths(disk=2 * GB, memory=20 * GB, network=1 * GB, h2d=25 * GB)


@pytest.mark.parametrize(
    ("size", "bw", "local", "gpu", "queue", "expect"),
    [
        (20 * GB, BW, Locality(20 * GB, 20 * GB), 0, 0.0, 1.0),  # all in the page cache: 20/20
        (20 * GB, BW, Locality(20 * GB, 0), 0, 0.0, 10.0),  # all on disk: 20/2
        (20 * GB, BW, Locality(20 * GB, 10 * GB), 0, 0.0, 0.5 + 5.0),  # half and half
        (20 * GB, BW, None, 0, 0.0, 20.0),  # remote: 20/1
        (20 * GB, BW, Locality(20 * GB, 20 * GB), 0, 3.0, 4.0),  # queue wait adds
        (20 * GB, BW_GPU, Locality(20 * GB, 20 * GB), 5 * GB, 0.0, 1.2),  # + GPU bytes / h2d
        (20 * GB, BW, Locality(20 * GB, 20 * GB), 5 * GB, 0.0, INF),  # GPU snapshot, no GPU
        (20 * GB, Bandwidths(2 * GB, 20 * GB, 0.0), None, 0, 0.0, INF),  # no peer measured
        (20 * GB, BW, Locality(20 * GB, 30 * GB), 0, 0.0, 1.0),  # residency above size: clamped
        (0, BW, None, 0, 0.0, 0.0),
    ],
)
def test_restore_seconds(
    size: int, bw: Bandwidths, local: Locality | None, gpu: int, queue: float, expect: float
) -> None:
    assert restore_seconds(size, bw, local, gpu, queue) == pytest.approx(expect)


def test_restore_seconds_rejects_negative_input() -> None:
    with pytest.raises(UsageError, match="negative"):
        restore_seconds(-1, BW, None)


def _h(name: str, free: int = 1, snaps: dict[str, Locality] | None = None, **kw: object) -> HostView:
    return HostView(name, kw.pop("bw", BW), free, snapshots=snaps or {}, **kw)  # type: ignore[arg-type]


S = 10 * GB
CASES = [
    # (hosts, expected best host, expected kind, why)
    (
        [_h("a", snaps={"m": Locality(S, S)}), _h("b", snaps={"m": Locality(S, 0)}), _h("c")],
        "a",
        "restore",
        "page cache",
    ),
    ([_h("a", snaps={"m": Locality(S, 0)}), _h("c")], "a", "restore", "local disk beats the network"),
    ([_h("a", 0, {"m": Locality(S, S)}), _h("b", snaps={"m": Locality(S, 0)})], "b", "restore", "full host"),
    (
        [_h("a", snaps={"m": Locality(S, S)}, queue_s=30.0), _h("b", snaps={"m": Locality(S, 0)})],
        "b",
        "restore",
        "a long queue outweighs residency",
    ),
    (
        [_h("a", snaps={"m": Locality(S, 0)}, bw=Bandwidths(0.5 * GB, 20 * GB, 1 * GB)), _h("c")],
        "c",
        "restore",
        "a slow disk loses to the network",
    ),
    (
        [_h("a", 0, {"m": Locality(S, S)}, slot_free_s=0.2), _h("b", snaps={"m": Locality(S, 0)})],
        "a",
        "wait",
        "a slot frees soon on the resident host",
    ),
    (
        [
            _h("a", 0, {"m": Locality(S, S), "x": Locality(GB, GB)}, sessions=[Session("s1", "x", 100)]),
            _h("b", 1, {"x": Locality(GB, GB)}),
        ],
        "a",
        "migrate",
        "moving a small session off the resident host beats a remote restore",
    ),
    (
        [
            _h("a", 0, {"m": Locality(S, S)}, sessions=[Session("s1", "x", 100)]),
            _h("b", 1, {"m": Locality(S, S)}),
        ],
        "b",
        "restore",
        "no migration when a free host is as good",
    ),
    ([_h("a", snaps={"m": Locality(S, S)}, alive=False), _h("b")], "b", "restore", "dead hosts are skipped"),
]


@pytest.mark.parametrize(("hosts", "best", "kind", "why"), CASES, ids=[c[3] for c in CASES])
def test_place(hosts: list[HostView], best: str, kind: str, why: str) -> None:
    d = place("m", S, hosts, sizes={"m": S, "x": GB})
    assert (d.best.host, d.best.kind) == (best, kind), d.options
    assert d.options == sorted(d.options, key=lambda o: o.seconds)
    if kind == "migrate":
        assert d.best.session == "s1" and d.best.session_to == "b"


def test_place_errors_name_the_fix() -> None:
    with pytest.raises(UsageError, match="no live host"):
        place("m", S, [_h("a", alive=False)])
    with pytest.raises(UsageError, match="no host can restore"):
        place("m", S, [_h("a")], gpu_bytes=GB)  # a GPU snapshot, CPU hosts only
    with pytest.raises(UsageError, match="every host that could restore m is full"):
        place("m", S, [_h("a", 0, {"m": Locality(S, S)}), _h("b", 0)])


def _random_fleet(rng: random.Random, n: int, models: list[str]) -> list[HostView]:
    hosts = []
    for i in range(n):
        bw = Bandwidths(
            rng.uniform(0.5, 7) * GB, rng.uniform(10, 40) * GB, rng.uniform(0.5, 12) * GB, 25 * GB
        )
        snaps = {}
        for m in rng.sample(models, rng.randint(0, len(models))):
            size = rng.choice([2, 8, 16]) * GB
            snaps[m] = Locality(size, rng.choice([0, size // 3, size]))
        hosts.append(
            HostView(f"h{i}", bw, rng.choice([0, 1, 2]), rng.uniform(0, 5), rng.choice([INF, 1.0]), snaps)
        )
    return hosts


def test_index_agrees_with_place_on_random_fleets() -> None:
    rng = random.Random(3)
    models = [f"m{i}" for i in range(6)]
    for _ in range(200):
        m = rng.choice(models)
        size = rng.choice([2, 8, 16]) * GB
        sized = _random_fleet(rng, rng.randint(1, 12), models)
        for v in sized:  # one model has one size everywhere
            if m in v.snapshots:
                v.snapshots[m] = Locality(size, min(v.snapshots[m].resident_bytes, size))
        idx = index_from_views(sized)
        try:
            want = place(m, size, sized, gpu_bytes=GB)
        except UsageError:
            with pytest.raises(UsageError):
                idx.best(m, size, GB)
            continue
        host, secs = idx.best(m, size, GB)
        assert secs == pytest.approx(want.best.seconds)
        assert host == want.best.host or math.isclose(
            secs, next(o.seconds for o in want.options if o.host == host)
        )


def test_demand_decays_and_rescales() -> None:
    d = Demand(tau_s=10.0)
    assert d.rate("m", 0.0) == 0.0
    d.note("m", 0.0)
    assert d.rate("m", 0.0) == pytest.approx(0.1)  # one request / tau
    assert d.rate("m", 10.0) == pytest.approx(0.1 / math.e)
    d.note("x", 1000.0)  # far later: the scale moves forward, old weight all but gone
    assert d.rate("m", 1000.0) == pytest.approx(0.0, abs=1e-12)
    assert d.rate("x", 1000.0) == pytest.approx(0.1)


# Two hosts with the same free slot and bandwidths: without demand the first wins; with it, a
# tie goes to the host whose page cache holds the least recently requested data.
BUSY = {"hot": Locality(S, S)}


def test_place_tie_goes_to_the_host_whose_page_cache_is_least_in_demand() -> None:
    hosts = [_h("a", snaps=dict(BUSY)), _h("b")]
    assert place("m", S, hosts).best.host == "a"
    d = place("m", S, hosts, sizes={"hot": S, "m": S}, demand={"hot": 1.0})
    assert d.best.host == "b" and d.options[0].seconds == d.options[1].seconds
    # a clearly faster host is not given up for it
    hosts = [_h("a", snaps={"m": Locality(S, S), **BUSY}), _h("b")]
    assert place("m", S, hosts, sizes={"hot": S, "m": S}, demand={"hot": 1.0}).best.host == "a"


def test_place_sends_an_under_replicated_model_to_a_new_host() -> None:
    # m is in a's page cache (0.5 s) and on b's disk (5 s): a wins, unless m is requested so
    # often that one copy cannot keep up; then b, at most SPREAD.slack slower... not here (10x)
    hosts = [_h("a", snaps={"m": Locality(S, S)}), _h("b", snaps={"m": Locality(S, 0)})]
    assert place("m", S, hosts, demand={"m": 100.0}).best.host == "a"
    # with a queue on a that brings the two within the slack, the busy model spreads to b
    hosts[0].queue_s = 3.5  # a: 4.0 s, b: 5.0 s
    assert place("m", S, hosts, demand={"m": 0.01}).best.host == "a"  # little demand: fastest
    assert place("m", S, hosts, demand={"m": 100.0}).best.host == "b"


def test_index_spreads_like_place() -> None:
    views = [_h("a", snaps=dict(BUSY)), _h("b")]
    idx = index_from_views(views)
    assert idx.best("m", S)[0] == "a"  # no demand recorded: the first of equals
    idx.note_request("hot", 0.0)
    idx.note_request("m", 0.0)
    assert idx.best("m", S)[0] == "b"
    idx.add_snapshot("a", "hot", Locality(S, 0))  # evicted: a no longer holds anything in demand
    idx.add_snapshot("b", "hot", Locality(S, S))
    assert idx.best("m", S)[0] == "a"
    assert idx.pressure[idx.pos["a"]] == 0.0 and idx.pressure[idx.pos["b"]] > 0.0
    # an under-replicated model goes to a new host within the slack
    idx2 = PlacementIndex(["a", "b"], [BW, BW])
    idx2.set_load("a", 1, 3.5)
    idx2.set_load("b", 1, 0.0)
    idx2.add_snapshot("a", "m", Locality(S, S))
    idx2.add_snapshot("b", "m", Locality(S, 0))
    for k in range(200):
        idx2.note_request("m", k * 0.01)
    assert idx2.best("m", S)[0] == "b"
    assert SPREAD.tie > 0


def test_index_updates_holders() -> None:
    idx = index_from_views([_h("a"), _h("b")])
    idx.add_snapshot("a", "m", Locality(S, 0))
    idx.add_snapshot("b", "m", Locality(S, S))
    assert idx.best("m", S)[0] == "b"
    idx.add_snapshot("b", "m", Locality(S, 0))  # evicted from b's page cache: a tie, a first
    idx.set_snapshots("a", {"m": Locality(S, S)})
    assert idx.best("m", S)[0] == "a"
    idx.remove_snapshot("a", "m")
    assert idx.holders("m") == ["b"]
    idx.set_load("b", 0, 0.0)
    idx.set_load("a", 1, 0.0, alive=False)
    with pytest.raises(UsageError):
        idx.best("m", S)


def test_agent_measures_itself_and_lists_nothing_in_an_empty_directory(tmp_path) -> None:
    from fastvllm.scheduler import probe
    from fastvllm.scheduler.agent import NodeAgent, Report

    a = NodeAgent("here", tmp_path, slots=2)
    b = NodeAgent("there", tmp_path / "b", slots=1)
    try:
        assert a.bw.disk > 0 and a.bw.memory > 0 and a.bw.network == 0.0
        assert a.probe_s < 30  # sanity only: the probe is small (32 MiB)
        assert list(tmp_path.iterdir()) == [tmp_path / "b"]  # the probe file is gone
        assert a.measure_network([list(b.sink_address())]) > 0  # type: ignore[list-item]
        assert probe.network([]) == 0.0
        rep = Report.from_dict(a.report())
        assert (rep.slots, rep.free_slots, rep.snapshots, rep.instances) == (2, 2, [], [])
        with pytest.raises(UsageError, match="holds no snapshot"):
            a.restore("nothing")
    finally:
        a.close()
        b.close()


def test_embedded_controller_explains_a_missing_snapshot(tmp_path) -> None:
    from fastvllm.scheduler.agent import NodeAgent
    from fastvllm.scheduler.controller import Controller, LocalClient

    agent = NodeAgent("solo", tmp_path, slots=1)
    try:
        c = Controller({"solo": LocalClient(agent)})
        with pytest.raises(UsageError, match="no live host holds a snapshot of tiny") as e:
            c.place("tiny")
        assert "cluster status" in (e.value.hint or "")
        assert c.routes() == {}
    finally:
        agent.close()


def test_simulator_small_fleet_invariants(tmp_path) -> None:
    from fastvllm.scheduler import simulate as sp

    res = sp.main(["--hosts", "20", "--models", "200", "--requests", "1500", "--out", str(tmp_path)])
    assert (tmp_path / "placement.json").is_file() and (tmp_path / "placement.png").is_file()
    for p in sp.POLICIES:
        r = res["policies"][p]
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert 0 < r["p50_s"] <= r["p99_s"]
    # the same seed gives the same fleet and the same result
    again = sp.simulate(sp.Config(hosts=20, models=200, requests=1500))
    assert again["policies"]["random"]["p99_s"] == res["policies"]["random"]["p99_s"]
