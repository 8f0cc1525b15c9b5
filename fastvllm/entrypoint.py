"""`fastvllm entrypoint`: what a container runs. Restore the model's snapshot from the
mounted directory if there is a good one; otherwise cold-start vLLM, snapshot it (leaving it
running) and serve. Either way, stay in the foreground until SIGTERM, then stop the server.

The snapshot's name is derived from the model, the vLLM arguments and the image's identity,
so one volume can hold several models and image versions. A snapshot is only ever seen
complete: the pipeline writes to a hidden staging directory and renames it into place. A
snapshot that fails to restore (damaged, taken on another image, canary mismatch) is moved
aside as `<name>.broken-<time>` with the reason printed, and a cold start follows: never a
crash loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastvllm import api
from fastvllm.runtime import instances, journal, manifest, proctree, signals, system, tiny_model, vllm_server
from fastvllm.runtime.errors import (
    CanaryMismatchError,
    CriuError,
    FastVLLMError,
    IdentityMismatchError,
    IntegrityError,
    NotASnapshotError,
    SnapshotExistsError,
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
    listen: str = ""  # the address it binds (`url` is where it is reached from this host)


def snapshot_name(model: str, vllm_args: Sequence[str], image: str = "") -> str:
    """A directory name per (model, arguments, image): a different configuration never restores
    another's snapshot."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or "model").strip("-") or "model"
    key: list[object] = [str(Path(model).resolve()), list(vllm_args)]
    if image:  # (outside an image the name stays what it always was)
        key.append(image)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return f"{slug}-{digest[:12]}"


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
PID_MARGIN = 8192  # room above the snapshot's highest PID for the threads CRIU restores too


def make_room_for_pids(snap: Path, say: Callable[[str], None]) -> None:
    """In a fresh container (we are PID 1 of a new PID namespace), CRIU must re-create the
    snapshot's PIDs and thread IDs, which a fresh namespace hands out from 1 up: the threads
    and helpers we start before CRIU (read-ahead, criu itself) would take some of them. Moving
    the namespace's PID counter above them keeps them free. Without the privilege to write it
    (a container that is not --privileged mounts /proc/sys read-only) the restore still runs,
    and the pipeline's PID check reports a collision should one happen."""
    if os.getpid() != 1:
        return
    try:
        pids = manifest.load(snap).server.tree_pids
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        target = min(max(pids, default=0) + PID_MARGIN, pid_max - 1024)
        if int(NS_LAST_PID.read_text()) < target:
            NS_LAST_PID.write_text(f"{target}\n")
    except (OSError, ValueError, FastVLLMError) as e:
        say(f"could not move the PID counter above the snapshot's PIDs ({e}); restoring anyway")


# Caches whose files vLLM's processes keep open or mapped (torch.compile's compiled kernels are
# loaded as shared objects from vLLM's cache). CRIU reopens them by path on restore, so in a
# container they must outlive the container: they go on the volume, one directory per image.
CACHE_ENV = {
    "VLLM_CACHE_ROOT": "vllm",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
}


def container_environment(snapshots: Path, image: str) -> Path | None:
    """In a fastvllm image, make what the server holds independent of the container it ran in
    (each setting only where the user has not set it):
    - the compile caches go to `<snapshots>/.cache-<image>/`: a snapshot taken in one container
      then restores in the next, whose own filesystem starts without them;
    - vLLM's internal sockets (torch.distributed's store, Gloo's listeners) bind 127.0.0.1 / lo
      instead of the container's address, which the next container does not have (CRIU:
      "Can't bind inet socket ... Cannot assign requested address"). One server per container
      is one node.
    Returns the cache directory, or None outside an image."""
    if not image:
        return None
    root = snapshots / f".cache-{image}"
    for var, sub in CACHE_ENV.items():
        os.environ.setdefault(var, str(root / sub))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def start(
    model: str,
    snapshots: Path,
    *,
    port: int | None = None,
    host: str | None = None,
    vllm_args: Sequence[str] = (),
    name: str | None = None,
    say: Callable[[str], None] = print,
) -> Served:
    """Restore or cold-start (and snapshot) the server; returns once it has answered. `name`
    picks the snapshot directory instead of the derived one (`fastvllm restore --container`
    names the one the host has read ahead). `port`/`host` (8000 on 127.0.0.1 by default) may
    come as vLLM's own --port/--host in `vllm_args` too, as for `api.snapshot`."""
    t0 = time.perf_counter()
    # First, so the snapshot's name is the same however the address was spelled.
    port, host, vllm_args = vllm_server.resolve_address(port, host, vllm_args)
    model = tiny_model.resolve_model(model)
    snapshots.mkdir(parents=True, exist_ok=True)
    image = system.image_identity()
    container_environment(snapshots, image)
    snap = snapshots / (name or snapshot_name(model, vllm_args, image))
    set_aside = None
    for attempt in range(2):
        if snap.is_dir():
            make_room_for_pids(snap, say)
            try:
                server = api.restore(snap).server
                took = time.perf_counter() - t0
                return Served(server.pid, server.base_url, "restored", took, snap, listen=server.listen_url)
            except SNAPSHOT_FAULTS as e:
                set_aside = e.one_line()
                broken = snap.with_name(f"{snap.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                try:
                    snap.rename(broken)
                    say(f"snapshot {snap} not used: {set_aside}; moved to {broken.name}; cold start instead")
                except FileNotFoundError:  # another container set it aside first
                    say(f"snapshot {snap} not used: {set_aside}; cold start instead")
        try:
            taken = api.snapshot(model, snap, port=port, host=host, vllm_args=vllm_args, leave_running=True)
        except SnapshotExistsError:
            # Another container sharing the volume published this snapshot while ours was being
            # written (ours was discarded with its server): restore theirs instead, once.
            if attempt == 0 and snap.is_dir():
                say(f"another container published {snap.name} first; restoring it")
                continue
            raise
        assert taken.server is not None
        return Served(
            taken.server.pid,
            taken.server.base_url,
            "cold-start",
            time.perf_counter() - t0,
            snap,
            set_aside,
            listen=taken.server.listen_url,
        )
    raise AssertionError("unreachable")


def serve_until_signal(served: Served, say: Callable[[str], None] = print) -> int:
    """Foreground until SIGTERM/SIGINT/SIGHUP (stop the server, exit 0) or until the server
    dies (exit 7, so the container's restart policy sees it). A signal inherited as ignored
    (nohup's SIGHUP) stays ignored."""
    stop = threading.Event()
    for sig in signals.SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
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


def main(
    model: str,
    snapshots: Path,
    port: int | None,
    host: str | None,
    vllm_args: Sequence[str],
    name: str | None = None,
) -> int:
    def say(msg: str) -> None:
        print(f"fastvllm entrypoint: {msg}", file=sys.stderr, flush=True)

    # SIGTERM, SIGHUP or SIGINT before the server serves (docker stop during a cold start or a
    # restore): unwind through the pipelines' cleanup (the server stopped, no half-written
    # snapshot), exit 128 + the signal. As PID 1 of a container, a signal without a handler
    # would be ignored until Docker's SIGKILL.
    signals.install()
    try:
        journal.recover(say)  # what an entrypoint killed before (same volume, same host) left
        served = start(model, snapshots, port=port, host=host, vllm_args=vllm_args, name=name, say=say)
    except FastVLLMError as e:
        say(f"error: {e.one_line()}")
        return e.exit_code
    except signals.Terminated as e:
        say(f"stopped by {e.name} before serving")
        return e.exit_code
    doc = {"event": "serving", "how": served.how, "pid": served.pid, "url": served.url}
    doc["listen"] = served.listen
    doc |= {
        "seconds": round(served.seconds, 3),
        "snapshot": str(served.snapshot),
        "set_aside": served.set_aside,
    }
    print(json.dumps(doc), flush=True)  # one line on stdout: what a supervisor or test reads
    return serve_until_signal(served, say)
