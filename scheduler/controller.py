"""The controller: asks every node agent for its report, places a model on the host that
will be ready first (`estimate.place`), asks that host's agent to restore it, and keeps the
routing table (model -> serving instances) the router reads.

Agents are reached through a small client interface, so the same controller runs embedded
(agents are objects in this process) and on Ray (agents are actors; `ray_runtime`). A host
whose agent stops answering is marked dead and its instances leave the routing table.

A host without the model's snapshot is an option too (`fetch`): the estimator charges it the
copy at its measured network bandwidth, and when it wins, the controller has the holder with
the most of the snapshot in its page cache send it there (`scheduler.transfer`) before the
restore.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Protocol

from fastvllm.runtime.errors import FastVLLMError, UsageError
from fastvllm.scheduler.agent import InstanceInfo, NodeAgent, Report
from fastvllm.scheduler.estimate import Decision, Demand, HostView, place


def resolve(model: str, names: Mapping[str, object]) -> str:
    """A served model name as given, or the one whose last path part it is ('tiny-llama' for
    /root/.cache/fastvllm/models/tiny-llama): vLLM serves a local model under its path."""
    if model in names:
        return model
    got = [n for n in names if n.rstrip("/").rsplit("/", 1)[-1] == model]
    return got[0] if len(got) == 1 else model


class AgentClient(Protocol):
    def call(self, method: str, *args: Any, timeout: float = 600.0) -> Any: ...


class LocalClient:
    """An agent living in this process (the embedded single-host runtime)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def call(self, method: str, *args: Any, timeout: float = 600.0) -> Any:
        return getattr(self.agent, method)(*args)


class HostDown(FastVLLMError):
    """An agent did not answer (its node died or was removed)."""

    exit_code = 11


class Controller:
    def __init__(
        self,
        agents: Mapping[str, AgentClient],
        *,
        is_down: Callable[[BaseException], bool] | None = None,
        fetch: bool = True,
    ) -> None:
        self.agents = dict(agents)
        # consider hosts without the snapshot (copied from a peer first); off where "hosts" share
        # one machine, as in the tests: a copy restored beside its running original would need
        # that original's PIDs and port
        self.fetch = fetch
        self.dead: set[str] = set()
        self.serving: dict[str, InstanceInfo] = {}  # url -> instance
        self._rr = itertools.count()
        self._mu = threading.Lock()
        # the instances asked for, per model, recently: placement's spreading rules weigh it
        # (the simulator's "ours" policy feeds the same estimator the same way)
        self.demand = Demand()
        # Which exceptions mean "the host is gone" (Ray: actor died / unavailable).
        self._is_down = is_down or (lambda e: isinstance(e, ConnectionError | HostDown))

    def _call(self, host: str, method: str, *args: Any, timeout: float = 600.0) -> Any:
        try:
            return self.agents[host].call(method, *args, timeout=timeout)
        except Exception as e:
            if self._is_down(e):
                self.mark_dead(host)
                raise HostDown(
                    f"host {host} is down: {type(e).__name__}", hint="its requests go elsewhere"
                ) from e
            raise

    def mark_dead(self, host: str) -> None:
        with self._mu:
            self.dead.add(host)
            for url in [u for u, i in self.serving.items() if i.host == host]:
                del self.serving[url]

    def measure_network(self) -> dict[str, float]:
        """Each agent times a burst to every other agent's sink (after all have started)."""
        sinks = {h: self._call(h, "sink_address") for h in self.live_hosts()}
        out = {}
        for h in self.live_hosts():
            peers = [list(s) for p, s in sinks.items() if p != h]
            out[h] = self._call(h, "measure_network", peers)
        return out

    def live_hosts(self) -> list[str]:
        return [h for h in self.agents if h not in self.dead]

    def reports(self) -> list[Report]:
        out = []
        for h in self.live_hosts():
            try:
                out.append(Report.from_dict(self._call(h, "report", timeout=60.0)))
            except HostDown:
                continue
        with self._mu:  # instances that died on their own leave the table too
            live = {i.url for r in out for i in r.instances}
            for url in [u for u in self.serving if u not in live]:
                del self.serving[url]
        return out

    def views(self) -> tuple[list[HostView], dict[str, int]]:
        reps = self.reports()
        sizes = {s.model: s.bytes for r in reps for s in r.snapshots}
        return [r.view() for r in reps], sizes

    def place(
        self, model: str, fetch: bool | None = None, *, request: bool = False, on: str | None = None
    ) -> Decision:
        """The placement decision for `model` over the live hosts. `fetch` (default: the
        controller's): also consider hosts without a snapshot of it, which copy it from a peer
        first. `request`: an instance is being asked for (`start`), so it counts as demand,
        before the decision, as the simulator counts an arriving request. `on`: only that host."""
        return self._decide(model, fetch=fetch, request=request, on=on)[0]

    def _decide(
        self, model: str, *, fetch: bool | None, request: bool, on: str | None
    ) -> tuple[Decision, dict[str, HostView], str]:
        views, sizes = self.views()
        model = resolve(model, sizes)
        if model not in sizes:
            raise UsageError(
                f"no live host holds a snapshot of {model}",
                hint="'fastvllm cluster status' lists the snapshots each host holds",
            )
        if on is not None:
            if on not in {v.name for v in views}:
                raise UsageError(f"no live host is called {on}", hint="'fastvllm cluster status' lists them")
            views = [v for v in views if v.name == on]
        if not (self.fetch if fetch is None else fetch):
            views = [v for v in views if model in v.snapshots]
        if not views:  # only with `on`: some live host holds the model
            raise UsageError(
                f"host {on} holds no snapshot of {model}", hint="allow a copy from a peer (fetch)"
            )
        with self._mu:
            if request:
                self.demand.note(model, time.monotonic())
            demand = self.demand.rates(time.monotonic())
        d = place(model, sizes[model], views, sizes=sizes, demand=demand)
        return d, {v.name: v for v in views}, model

    def start(self, model: str, fetch: bool | None = None, on: str | None = None) -> InstanceInfo:
        """Place `model` (on `on`, if given), copy its snapshot there if that host has none, and
        restore it there; returns the serving instance."""
        d, views, model = self._decide(model, fetch=fetch, request=True, on=on)
        if d.best.kind == "migrate":
            raise UsageError(
                f"placing {model} needs a migration off {d.best.host} first",
                hint=f"fastvllm cluster migrate {d.best.session} --to {d.best.session_to}",
            )
        copied = self.copy_snapshot(model, d.best.host) if model not in views[d.best.host].snapshots else {}
        got = InstanceInfo(**self._call(d.best.host, "restore", model))
        got.copy_s = float(copied.get("seconds", 0.0))
        with self._mu:
            self.serving[got.url] = got
        return got

    def copy_snapshot(self, model: str, to: str) -> dict[str, Any]:
        """Copy a snapshot of `model` to host `to` from the live holder with the most of it in
        its page cache; returns the receiver's record (path, bytes, seconds, from)."""
        holders = [r for r in self.reports() if r.name != to and any(s.model == model for s in r.snapshots)]
        if not holders:
            raise UsageError(
                f"no live host other than {to} holds a snapshot of {model}",
                hint="'fastvllm cluster status' lists the snapshots each host holds",
            )
        src = max(holders, key=lambda r: max(s.resident_bytes for s in r.snapshots if s.model == model))
        offer = self._call(src.name, "serve_snapshot", model)
        return dict(self._call(to, "fetch_snapshot", offer))

    def stop(self, url: str) -> None:
        with self._mu:
            inst = self.serving.pop(url, None)
        if inst is not None and inst.host not in self.dead:
            self._call(inst.host, "stop", inst.pid)

    def stop_all(self) -> None:
        for url in list(self.serving):
            try:
                self.stop(url)
            except HostDown:
                continue

    def routes(self) -> dict[str, list[str]]:
        """model -> URLs of its serving instances (on live hosts)."""
        with self._mu:
            out: dict[str, list[str]] = {}
            for i in self.serving.values():
                out.setdefault(i.model, []).append(i.url)
            return out

    def instance_list(self) -> list[dict[str, Any]]:
        """The router's view: url, model, host (and root PID) of every serving instance."""
        with self._mu:
            return [
                {"url": i.url, "model": i.model, "host": i.host, "pid": i.pid} for i in self.serving.values()
            ]

    # the router's Backends interface, so an embedded controller can back a router directly
    def instances(self) -> list[dict[str, Any]]:
        return self.instance_list()

    def failed(self, url: str) -> None:
        self.backend_failed(url)

    def backend_failed(self, url: str) -> None:
        """The router could not reach `url`: ask its host whether it is alive (marks it dead if
        not) and drop the instance if its host no longer reports it."""
        with self._mu:
            inst = self.serving.get(url)
        if inst is None:
            return
        try:
            rep = Report.from_dict(self._call(inst.host, "report", timeout=30.0))
        except HostDown:
            return
        if all(i.url != url for i in rep.instances):
            with self._mu:
                self.serving.pop(url, None)

    def status(self) -> dict[str, object]:
        reps = self.reports()
        return {
            "hosts": [r.as_dict() for r in reps],
            "dead": sorted(self.dead),
            "instances": [asdict(i) for i in self.serving.values()],
            "at": time.time(),
        }
