"""Records of servers fastvllm launched or restored and left serving, keyed by root PID.

A restored tree is not our child and carries no label; the record says which snapshot it
came from and how it was launched, so `fastvllm snapshot --pid` can snapshot it again and
`fastvllm stop` can stop exactly it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastvllm.runtime import config, proctree, shm
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.proctree import alive


def instances_dir() -> Path:
    return config.RUN_DIR.get()


@dataclass
class Instance:
    pid: int
    host: str
    port: int
    model: str
    served_model_name: str
    vllm_args: list[str]
    env: dict[str, str]
    snapshot: str | None  # the snapshot it was restored from, if any
    log_path: str
    worker_extension: bool = False
    # "mmap": the tree maps its snapshot's page images (the snapshot must stay in place)
    criu_restore: str = "copy"
    # The server's control token (runtime.control_guard): the record is its owner's alone (0600)
    control_token: str = field(default="", repr=False)


def record(inst: Instance) -> Path:
    d = instances_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):  # made by an older fastvllm, or mkdir's mode cut by the umask
        if d.stat().st_uid == os.geteuid():
            os.chmod(d, 0o700)
    path = d / f"{inst.pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the server's token
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(inst), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def forget(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (instances_dir() / f"{pid}.json").unlink()


def get(pid: int, *, root_dead_ok: bool = False) -> Instance:
    """The record of the server whose root is `pid`, while that root runs (`root_dead_ok`:
    while any process of its session does: a tree whose root was killed, to be stopped)."""
    path = instances_dir() / f"{pid}.json"
    if path.is_file() and (alive(pid) or (root_dead_ok and _session_alive(pid))):
        with contextlib.suppress(OSError, ValueError, TypeError):
            return Instance(**json.loads(path.read_text()))
    if path.is_file() and not _session_alive(pid):
        forget(pid)
    raise UsageError(
        f"PID {pid} is not a vLLM server fastvllm launched or restored",
        hint="'fastvllm ps' lists them",
    )


def _session_alive(pid: int) -> bool:
    """Whether a process of the session `pid` led still runs. While one does, no new process
    can be given the PID `pid` (the kernel keeps a session's id for its members)."""
    return alive(pid) or bool(proctree.session_pids(pid))


def _records() -> list[Instance]:
    out: list[Instance] = []
    d = instances_dir()
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(Instance(**json.loads(path.read_text())))
    return out


def running() -> list[Instance]:
    """Servers whose root process runs. A record whose whole tree is gone is dropped; one
    whose root died while the rest of its session runs is kept (`known()` lists it)."""
    out = []
    for inst in _records():
        if alive(inst.pid):
            out.append(inst)
        elif not _session_alive(inst.pid):
            forget(inst.pid)
    return out


class Health(enum.StrEnum):
    """What `fastvllm ps` says of a server it knows."""

    SERVING = "serving"
    NOT_ANSWERING = "not answering"  # its root runs, its /health does not answer 200
    ROOT_DEAD = "root dead"  # its root was killed, the rest of its tree runs: 'fastvllm stop' it


def known(probe: bool = True) -> list[tuple[Instance, Health]]:
    """Every server fastvllm knows that still has a process, with its health (`probe`: ask
    its /health, else a running root counts as serving)."""
    out = []
    for inst in _records():
        if alive(inst.pid):
            out.append((inst, _health(inst) if probe else Health.SERVING))
        elif _session_alive(inst.pid):
            out.append((inst, Health.ROOT_DEAD))
        else:
            forget(inst.pid)
    return out


def _health(inst: Instance) -> Health:
    """As a client sees it: /health without fastvllm's token (a closed gate answers 503)."""
    from fastvllm.runtime import localhttp, vllm_server

    try:
        r = localhttp.get(vllm_server.connect_host(inst.host), inst.port, "/health", timeout=2.0)
    except localhttp.HTTPError:
        return Health.NOT_ANSWERING
    return Health.SERVING if r.status_code == 200 else Health.NOT_ANSWERING


def owner_of(pid: int) -> Instance | None:
    """The known server whose session `pid` belongs to (its root may be dead)."""
    try:
        sid = os.getsid(pid)
    except OSError:
        return None
    for inst in _records():
        if inst.pid == sid:
            return inst
    return None


def stop(pid: int, grace: float = 10.0) -> None:
    """Stop a server tree by its session id and clean up what a killed tree leaves behind:
    its /dev/shm files and its record. The one way every stage stops a server."""
    files = shm.names_of(proctree.session_pids(pid))
    proctree.stop_session(pid, grace)
    shm.remove(files)
    forget(pid)
