"""The controller: asks every node agent for its report, places a model on the host that
will be ready first (`estimate.place`), asks that host's agent to restore it, and keeps the
routing table (model -> serving instances) the router reads.

Agents are reached through a small client interface, so the same controller runs embedded
(agents are objects in this process) and on Ray (agents are actors; `ray_runtime`). A host
whose agent stops answering is marked dead and its instances leave the routing table.
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
        self, agents: Mapping[str, AgentClient], *, is_down: Callable[[BaseException], bool] | None = None
    ) -> None:
        self.agents = dict(agents)
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

    def place(self, model: str, *, only_holders: bool = True, request: bool = False) -> Decision:
        """The placement decision for `model` over the live hosts. `only_holders`: consider
        only hosts that hold a snapshot of it (this runtime restores local snapshots; copying
        one from a peer is modelled by the estimator and the simulator, not done here).
        `request`: an instance is being asked for (`start`), so it counts as demand, before
        the decision, as the simulator counts an arriving request."""
        views, sizes = self.views()
        model = resolve(model, sizes)
        if model not in sizes:
            raise UsageError(
                f"no live host holds a snapshot of {model}",
                hint="'fastvllm cluster status' lists the snapshots each host holds",
            )
        if only_holders:
            views = [v for v in views if model in v.snapshots]
        with self._mu:
            if request:
                self.demand.note(model, time.monotonic())
            demand = self.demand.rates(time.monotonic())
        return place(model, sizes[model], views, sizes=sizes, demand=demand)

    def start(self, model: str) -> InstanceInfo:
        """Place `model` and restore it there; returns the serving instance."""
        d = self.place(model, request=True)
        model = resolve(model, {s.model: s.bytes for r in self.reports() for s in r.snapshots})
        if d.best.kind == "migrate":
            raise UsageError(
                f"placing {model} needs a migration off {d.best.host} first",
                hint=f"fastvllm cluster migrate {d.best.session} --to {d.best.session_to}",
            )
        got = InstanceInfo(**self._call(d.best.host, "restore", model))
        with self._mu:
            self.serving[got.url] = got
        return got

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
