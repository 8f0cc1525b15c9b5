"""Serving from a container built from Dockerfile.criu, driven from the host through the Docker
SDK: start a container whose entrypoint restores a snapshot from a mounted volume, while the
host reads the snapshot's files into the page cache (which the container shares: one kernel).
That overlap is what the seed experiment did with vmtouch beside `docker run`.

The container's entrypoint prints one JSON line on stdout once its server answered; this
module waits for that line and reports it with the timings.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.prefetch import warm
from fastvllm.restore import order
from fastvllm.runtime import manifest
from fastvllm.runtime.errors import EnvironmentNotReadyError, ServerError, UsageError

SNAPSHOTS_MOUNT = "/snapshots"
LABEL = "fastvllm"  # every container started here carries it (value: the snapshot's name)

# What CRIU needs inside the container (Dockerfile.criu says why for each). Not --privileged:
# that grants every capability the engine knows, and fails where the host's bounding set
# lacks one (CAP_SYS_RESOURCE here). CAP_SYS_ADMIN stands in for CAP_CHECKPOINT_RESTORE,
# which Docker 20.10 cannot name. systempaths=unconfined leaves /proc/sys writable, which the
# entrypoint uses to keep the snapshot's PIDs free (entrypoint.make_room_for_pids). A private
# cgroup namespace makes every container's cgroup "/" to CRIU, so a tree dumped in one
# container restores into another's cgroup instead of looking for the first one's.
CAPABILITIES = ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "DAC_READ_SEARCH", "SYS_TIME"]
RUN_PRIVILEGES: dict[str, Any] = {
    "cap_add": CAPABILITIES,
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
    "shm_size": "2g",
    "cgroupns": "private",
}
# `--security-opt systempaths=unconfined` is the CLI's spelling; the API's is empty lists here.
UNMASKED: dict[str, list[str]] = {"MaskedPaths": [], "ReadonlyPaths": []}


def docker_client(timeout: int = 600) -> Any:
    try:
        import docker
    except ImportError as e:
        raise EnvironmentNotReadyError(
            "the Docker SDK for Python is not installed", hint="pip install docker (scripts/setup.sh does)"
        ) from e
    try:
        dc = docker.from_env(timeout=timeout)
        dc.ping()
    except Exception as e:
        raise EnvironmentNotReadyError(
            f"no Docker engine answers ({type(e).__name__})",
            hint="start dockerd (or set DOCKER_HOST) and retry",
        ) from e
    return dc


def entrypoint_command(
    model: str,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    name: str | None = None,
    vllm_args: Sequence[str] = (),
) -> list[str]:
    """The arguments of the image's ENTRYPOINT (`fastvllm entrypoint`)."""
    cmd = [model, "--snapshots", SNAPSHOTS_MOUNT, "--host", host, "--port", str(port)]
    if name:
        cmd += ["--name", name]
    return [*cmd, "--", *vllm_args] if vllm_args else cmd


def start(
    dc: Any,
    image: str,
    volume: Path,
    command: Sequence[str],
    *,
    name: str | None = None,
    labels: dict[str, str] | None = None,
) -> Any:
    """Start (detached) a container of `image` with `volume` (a host directory) at /snapshots."""
    import docker

    volume.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The low-level API: the SDK's run() cannot express unmasked /proc paths.
    host_config = dc.api.create_host_config(
        binds={str(volume.resolve()): {"bind": SNAPSHOTS_MOUNT, "mode": "rw"}}, **RUN_PRIVILEGES
    )
    host_config.update(UNMASKED)
    try:
        created = dc.api.create_container(
            image, list(command), name=name, labels=labels or {}, host_config=host_config
        )
    except docker.errors.ImageNotFound as e:
        raise UsageError(f"image {image} not found", hint="build it from Dockerfile.criu") from e
    c = dc.containers.get(created["Id"])
    try:
        c.start()
    except BaseException:
        c.remove(force=True)
        raise
    return c


def address(container: Any, port: int) -> str:
    """The container's server as the host reaches it: its bridge address (no published port,
    so any number of containers can serve the same port each in its own network namespace)."""
    container.reload()
    ip = container.attrs["NetworkSettings"].get("IPAddress") or ""
    if not ip:
        for net in container.attrs["NetworkSettings"].get("Networks", {}).values():
            ip = net.get("IPAddress") or ip
    if not ip:
        raise ServerError(f"container {container.name} has no IP address", hint="is it on a bridge network?")
    return f"http://{ip}:{port}"


def logs_tail(container: Any, lines: int = 25) -> str:
    with contextlib.suppress(Exception):
        return container.logs(tail=lines).decode(errors="replace")
    return ""


def wait_serving(container: Any, timeout: float = 900.0) -> dict[str, Any]:
    """Follow the container's stdout until the entrypoint's {"event": "serving"} line; an
    exited container or the timeout raises ServerError with the end of its logs."""
    found: dict[str, Any] = {}

    def follow() -> None:
        buf = b""
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict) and doc.get("event") == "serving":
                        found.update(doc)
                        return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    reader.join(timeout)
    if found:
        return found
    container.reload()
    state = container.attrs.get("State", {})
    why = f"exited with {state.get('ExitCode')}" if state.get("Status") == "exited" else "timed out"
    raise ServerError(
        f"container {container.name} did not report serving ({why})",
        hint=f"docker logs {container.name}",
        detail=logs_tail(container),
    )


@dataclass
class ContainerRestore:
    container_id: str
    container_name: str
    url: str
    how: str  # what the entrypoint did: "restored" or "cold-start" (the snapshot was set aside)
    seconds: float  # container start to the entrypoint's serving line
    entrypoint_seconds: float  # what the entrypoint measured inside
    prefetch: dict[str, object] = field(default_factory=dict)
    set_aside: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "container": self.container_name,
            "container_id": self.container_id,
            "url": self.url,
            "how": self.how,
            "start_to_serving_s": round(self.seconds, 3),
            "entrypoint_s": round(self.entrypoint_seconds, 3),
            "prefetch": self.prefetch,
            "set_aside": self.set_aside,
        }


def restore(
    image: str,
    snapshot: Path,
    *,
    name: str | None = None,
    prefetch: bool = True,
    timeout: float = 900.0,
    dc: Any = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ContainerRestore:
    """Restore `snapshot` (a directory on this host, taken by the image's entrypoint) in a new
    container of `image`: its parent directory is mounted as the volume, and the container's
    entrypoint restores exactly that snapshot. With `prefetch`, the host reads the snapshot's
    files into the page cache, in the order the restore needs them, while the container starts.
    The container is left serving; stop it with `docker stop` (SIGTERM stops the server)."""
    snapshot = snapshot.expanduser().absolute()
    m = manifest.load(snapshot)  # a clear error when it is not a vLLM snapshot
    if not m.identity.image:
        raise UsageError(
            f"{snapshot} was not taken in a container",
            hint="restore it on the host with 'fastvllm restore', or take it with the image's entrypoint",
        )
    dc = dc or docker_client()
    files = [snapshot / e.path for e in order.restore_order(snapshot, m)]
    stats: dict[str, object] = {}
    reader: threading.Thread | None = None
    if prefetch:

        def read_ahead() -> None:
            try:
                stats.update(warm.warm(files, on_bytes=on_bytes).as_dict())
            except Exception as e:  # the container's own reads still work: report, do not fail
                stats["error"] = str(e)

        reader = threading.Thread(target=read_ahead, name="fastvllm-container-prefetch", daemon=True)
    cmd = entrypoint_command(
        m.server.model,
        host=m.server.host,
        port=m.server.port,
        name=snapshot.name,
        vllm_args=m.server.vllm_args,
    )
    t0 = time.perf_counter()
    if reader is not None:
        reader.start()
    container = start(dc, image, snapshot.parent, cmd, name=name, labels={LABEL: snapshot.name})
    try:
        doc = wait_serving(container, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            container.remove(force=True)
        raise
    seconds = time.perf_counter() - t0
    if reader is not None:
        reader.join()
    return ContainerRestore(
        container.id,
        container.name,
        address(container, m.server.port),
        str(doc.get("how")),
        seconds,
        float(doc.get("seconds") or 0.0),
        stats,
        doc.get("set_aside"),
    )
