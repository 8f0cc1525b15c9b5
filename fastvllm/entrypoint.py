"""`fastvllm entrypoint`: what a container runs. Restore the model's snapshot from the
mounted directory if there is a good one; otherwise cold-start vLLM, snapshot it (leaving it
running) and serve. Either way, stay in the foreground until SIGTERM, then stop the server.

The snapshot's name is derived from the model and the vLLM arguments, so one volume can
hold several models. A snapshot is only ever seen complete: the pipeline writes to a hidden
staging directory and renames it into place. A snapshot that fails to restore (damaged,
taken on another image, canary mismatch) is moved aside as `<name>.broken-<time>` with the
reason printed, and a cold start follows: never a crash loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastvllm import api
from fastvllm.runtime import instances, proctree, tiny_model, vllm_server
from fastvllm.runtime.errors import (
    CanaryMismatchError,
    CriuError,
    FastVLLMError,
    IdentityMismatchError,
    IntegrityError,
    NotASnapshotError,
)

# What says the snapshot itself is unusable. Anything else (the port is taken, no privileges,
# no CRIU) is the host's problem: the snapshot stays where it is and the error is reported.
SNAPSHOT_FAULTS = (IntegrityError, IdentityMismatchError, NotASnapshotError, CanaryMismatchError, CriuError)


@dataclass
class Served:
    pid: int
    url: str
    how: str  # "restored" | "cold-start"
    seconds: float  # entrypoint start to first completion
    snapshot: Path
    set_aside: str | None = None  # why an existing snapshot was not used, when it was not


def snapshot_name(model: str, vllm_args: Sequence[str]) -> str:
    """A directory name per (model, arguments): a different configuration never restores
    another's snapshot."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or "model").strip("-") or "model"
    digest = hashlib.sha256(json.dumps([str(Path(model).resolve()), list(vllm_args)]).encode()).hexdigest()
    return f"{slug}-{digest[:12]}"


def start(
    model: str,
    snapshots: Path,
    *,
    port: int = vllm_server.DEFAULT_PORT,
    host: str = vllm_server.DEFAULT_HOST,
    vllm_args: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> Served:
    """Restore or cold-start (and snapshot) the server; returns once it has answered."""
    t0 = time.perf_counter()
    model = tiny_model.resolve_model(model)
    snapshots.mkdir(parents=True, exist_ok=True)
    snap = snapshots / snapshot_name(model, vllm_args)
    set_aside = None
    if snap.is_dir():
        try:
            res = api.restore(snap)
            server = res.server  # type: ignore[union-attr]  (a vLLM snapshot: the name says so)
            return Served(server.pid, server.base_url, "restored", time.perf_counter() - t0, snap)
        except SNAPSHOT_FAULTS as e:
            set_aside = e.one_line()
            broken = snap.with_name(f"{snap.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            snap.rename(broken)
            say(f"snapshot {snap} not used: {set_aside}; moved to {broken.name}; cold start instead")
    res = api.snapshot(model, snap, port=port, host=host, vllm_args=vllm_args, leave_running=True)
    assert res.server is not None
    return Served(
        res.server.pid, res.server.base_url, "cold-start", time.perf_counter() - t0, snap, set_aside
    )


def serve_until_signal(served: Served, say: Callable[[str], None] = print) -> int:
    """Foreground until SIGTERM/SIGINT (stop the server, exit 0) or until the server dies
    (exit 7, so the container's restart policy sees it)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not proctree.alive(served.pid):
            say(f"server {served.pid} exited")
            return 7
    say(f"stopping server {served.pid}")
    tree = proctree.session_pids(served.pid)
    instances.stop(served.pid)
    proctree.wait_gone(tree, 30.0, reaped=True)
    return 0


def main(model: str, snapshots: Path, port: int, host: str, vllm_args: Sequence[str]) -> int:
    def say(msg: str) -> None:
        print(f"fastvllm entrypoint: {msg}", file=sys.stderr, flush=True)

    try:
        served = start(model, snapshots, port=port, host=host, vllm_args=vllm_args, say=say)
    except FastVLLMError as e:
        say(f"error: {e.one_line()}")
        return e.exit_code
    doc = {"event": "serving", "how": served.how, "pid": served.pid, "url": served.url}
    doc |= {
        "seconds": round(served.seconds, 3),
        "snapshot": str(served.snapshot),
        "set_aside": served.set_aside,
    }
    print(json.dumps(doc), flush=True)  # one line on stdout: what a supervisor or test reads
    return serve_until_signal(served, say)
