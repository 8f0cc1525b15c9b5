"""The Ray runtime: one node agent actor pinned to every node (NodeAffinitySchedulingStrategy,
hard), one controller actor holding their handles, and the router (`scheduler.router`) in
front of the instances. Past one host, Ray gives what ServerlessLLM and Llumnix use it for:
placing a process on a named node, reaching it, and learning when its node is gone.

Ray is imported only here, so the embedded single-host runtime never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastvllm.runtime import signals
from fastvllm.runtime.errors import EnvironmentNotReadyError
from fastvllm.scheduler.agent import NodeAgent
from fastvllm.scheduler.controller import Controller

# Actors are light (they wait on CRIU and HTTP); they must not hold a node's CPU slots.
AGENT_CPUS = 0
NAMESPACE = "fastvllm"
CONTROLLER_NAME = "fastvllm-controller"


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise EnvironmentNotReadyError(
            "Ray is not installed", hint="run scripts/setup.sh (it installs fastvllm[cluster])"
        ) from e
    return ray


def is_down(e: BaseException) -> bool:
    """Does this exception from an agent call mean its node is gone?"""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

    return isinstance(e, RayActorError | ActorDiedError | ActorUnavailableError | GetTimeoutError)


class AgentActorImpl:
    """Runs a NodeAgent on its node; `call` forwards to it so the controller's client stays
    generic."""

    def __init__(self, name: str, root: str, slots: int | None) -> None:
        ray = _ray()
        # The actor's process is the agent's own: SIGTERM, SIGHUP and SIGINT unwind a restore
        # like Ctrl-C where its main thread runs one (a no-op from a worker thread; a restore
        # there stops at its next step), and runtime.journal covers a SIGKILL.
        signals.install()
        self.agent = NodeAgent(name, root, slots, address=ray.util.get_node_ip_address())

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.agent, method)(*args)

    def node_id(self) -> str:
        return str(_ray().get_runtime_context().get_node_id())


class RayClient:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def call(self, method: str, *args: Any, timeout: float = 600.0) -> Any:
        return _ray().get(self.handle.call.remote(method, *args), timeout=timeout)


class ControllerActorImpl:
    """The controller, as an actor. Threaded (max_concurrency) so status and routing calls
    are answered while a restore runs."""

    def __init__(self, agents: Mapping[str, Any], fetch: bool = True) -> None:
        self.c = Controller({h: RayClient(a) for h, a in agents.items()}, is_down=is_down, fetch=fetch)
        self.c.measure_network()

    def call(self, method: str, *args: Any) -> Any:
        out = getattr(self.c, method)(*args)
        if hasattr(out, "as_dict"):
            return out.as_dict()
        if hasattr(out, "__dataclass_fields__"):
            from dataclasses import asdict

            return asdict(out)
        return out


def start(
    roots: Mapping[str, str | Path] | str | Path,
    *,
    slots: int | None = None,
    names: Mapping[str, str] | None = None,
    fetch: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Start an agent on every alive node of the connected Ray cluster (or those in `roots`
    when it maps node ids to snapshot directories) and the controller. Returns (controller
    handle, {host name: agent handle}). `names` maps node ids to host names (default: the
    first 8 hex digits of the node id). `fetch`: placement may pick a host without the
    snapshot, which then copies it from a peer (off when the "nodes" share one machine)."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise EnvironmentNotReadyError("not connected to a Ray cluster", hint="ray.init(address=...) first")
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if isinstance(roots, Mapping):
        nodes = [n for n in nodes if n in roots]
    agent_cls = ray.remote(num_cpus=AGENT_CPUS, max_concurrency=8)(AgentActorImpl)
    agents: dict[str, Any] = {}
    for node in nodes:
        root = roots[node] if isinstance(roots, Mapping) else roots
        name = (names or {}).get(node, node[:8])
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        agents[name] = agent_cls.options(scheduling_strategy=strategy, name=f"fastvllm-agent-{name}").remote(
            name, str(root), slots
        )
    ray.get([a.node_id.remote() for a in agents.values()])  # every agent is up (probes done)
    ctl_cls = ray.remote(num_cpus=0, max_concurrency=16)(ControllerActorImpl)
    # Pinned beside the driver, as the router is: left to Ray's scheduler it can land on any
    # node, and removing that node then takes the controller (and every failover) with it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    controller = ctl_cls.options(name=CONTROLLER_NAME, scheduling_strategy=here).remote(agents, fetch)
    ray.get(controller.call.remote("live_hosts"))
    return controller, agents


class RouterActorImpl:
    """The router in its own process on a node (the driver's, usually), reading the routing
    table from the controller actor: clients and the router then never share an interpreter."""

    def __init__(self, controller: Any, host: str, port: int) -> None:
        from fastvllm.scheduler.router import Router, Served

        self.served = Served(Router(ControllerHandle(controller, timeout=60.0)), host, port)

    def url(self) -> str:
        return self.served.url

    def stop(self) -> None:
        self.served.stop()


def start_router(
    controller: Any, host: str = "127.0.0.1", port: int = 8100, node_id: str | None = None
) -> Any:
    """Start the router actor (pinned to `node_id`, default: this driver's node); returns its
    handle once it listens."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = node_id or ray.get_runtime_context().get_node_id()
    cls = ray.remote(num_cpus=0, max_concurrency=4)(RouterActorImpl)
    actor = cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(
        controller, host, port
    )
    ray.get(actor.url.remote())
    return actor


class ControllerHandle:
    """Call the controller actor like the local Controller: `h.call("place", "tiny")`."""

    def __init__(self, handle: Any, timeout: float = 600.0) -> None:
        self.handle = handle
        self.timeout = timeout

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return _ray().get(self.handle.call.remote(method, *args), timeout=timeout or self.timeout)

    def instances(self) -> list[dict[str, str]]:
        return list(self.call("instance_list", timeout=30))

    def failed(self, url: str) -> None:
        self.call("backend_failed", url, timeout=60)
