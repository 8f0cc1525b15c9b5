"""Fault injection, for tests only: never set FASTVLLM_FAULT outside the test suite.

`FASTVLLM_FAULT=<point>:<fault>` makes the pipelines fire `fault` when they reach `point`
(tests/test_faults.py runs the real CLI with it and checks what is left; docs/fault-matrix.md
has the matrix). Unset, every hook here is a dictionary lookup and nothing else.

Points, in pipeline order. snapshot: `launch` (the server spawned, not yet healthy),
`healthy`, `warmup`, `release` (the gate closed, weights and KV cache just released),
`cuda_checkpoint` (GPU only), `dump` (while CRIU dumps), `publish` (all written, before the
rename).
restore: `validate` (checks, before anything runs), `criu_restore` (while CRIU restores),
`health` (the tree restored, before /health answers), `weight_load`, `canary`.

Faults: `sigterm`, `sigint`, `sighup`, `sigkill` (sent to the fastvllm process itself),
`kill-server` (SIGKILL to the server's root process), `kill-worker` (SIGKILL to the
highest-ranked worker process of a tensor-parallel server; nothing where there is none),
`criu` (CRIU really fails: it is run
with an option it does not know; `dump` and `criu_restore` only).

At the two CRIU points the fault fires from a thread once the CRIU child is at work (its log
has its first lines; restoring, the tree's root exists), so it lands while CRIU runs; what the
tests check holds wherever it lands.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import threading
import time
from pathlib import Path

from fastvllm.runtime import config

VAR = config.FAULT.name


class Point(enum.StrEnum):
    LAUNCH = "launch"
    HEALTHY = "healthy"
    WARMUP = "warmup"
    RELEASE = "release"
    CUDA_CHECKPOINT = "cuda_checkpoint"
    DUMP = "dump"
    PUBLISH = "publish"
    VALIDATE = "validate"
    CRIU_RESTORE = "criu_restore"
    HEALTH = "health"
    WEIGHT_LOAD = "weight_load"
    CANARY = "canary"


class Fault(enum.StrEnum):
    SIGTERM = "sigterm"
    SIGINT = "sigint"
    SIGHUP = "sighup"
    SIGKILL = "sigkill"
    KILL_SERVER = "kill-server"
    KILL_WORKER = "kill-worker"
    CRIU = "criu"


SNAPSHOT_POINTS = (
    Point.LAUNCH,
    Point.HEALTHY,
    Point.WARMUP,
    Point.RELEASE,
    Point.CUDA_CHECKPOINT,
    Point.DUMP,
    Point.PUBLISH,
)
RESTORE_POINTS = (Point.VALIDATE, Point.CRIU_RESTORE, Point.HEALTH, Point.WEIGHT_LOAD, Point.CANARY)
# The points that fire while CRIU runs, by the CRIU action (runtime.criu._run's `what`).
CRIU_POINTS = {"dump": Point.DUMP, "restore": Point.CRIU_RESTORE}
SIGNAL_OF = {
    Fault.SIGTERM: signal.SIGTERM,
    Fault.SIGINT: signal.SIGINT,
    Fault.SIGHUP: signal.SIGHUP,
    Fault.SIGKILL: signal.SIGKILL,
}
BAD_CRIU_OPTION = "--fastvllm-injected-fault"


def armed() -> tuple[Point, Fault] | None:
    """The (point, fault) FASTVLLM_FAULT names, or None (unset, or not a valid pair)."""
    raw = config.FAULT.get()
    if not raw:
        return None
    point, _, fault = raw.partition(":")
    try:
        return Point(point.strip()), Fault(fault.strip())
    except ValueError:
        return None


_server: dict[str, int] = {}  # the server root a CRIU point's kill-server fault is aimed at


def at(point: Point, server_pid: int | None = None) -> None:
    """The pipeline reached `point`; `server_pid` is the root of its server, where there is
    one. At a CRIU point this only aims the fault: it fires once CRIU runs (`criu_started`)."""
    got = armed()
    if got is None or got[0] is not point:
        return
    if point in CRIU_POINTS.values():
        if server_pid is not None:
            _server[point] = server_pid
        return
    _fire(got[1], server_pid)


def criu_args(what: str) -> list[str]:
    """Extra CRIU arguments: an option CRIU rejects when the `criu` fault is armed at `what`."""
    got = armed()
    if got is not None and got[1] is Fault.CRIU and CRIU_POINTS.get(what) is got[0]:
        return [BAD_CRIU_OPTION]
    return []


def criu_started(what: str, criu_pid: int, log: Path) -> None:
    """A CRIU child started for `what` ('dump', 'restore'): fire an armed fault from a thread
    once CRIU is at work (its log has lines; restoring, the tree's root exists: the tree is
    half built) or has exited, whichever comes first."""
    got = armed()
    point = CRIU_POINTS.get(what)
    if got is None or point is None or got[0] is not point or got[1] is Fault.CRIU:
        return
    fault, server = got[1], _server.get(point)

    from fastvllm.runtime import proctree

    def started() -> bool:
        """CRIU is at work: its log has lines and, for a restore, the tree's root exists."""
        try:
            root_up = server is None or what != "restore" or proctree.pid_exists(server)
            return log.stat().st_size > 0 and root_up
        except OSError:
            return False

    def watch() -> None:
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            if started():
                break
            try:
                os.kill(criu_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        _fire(fault, server)

    threading.Thread(target=watch, name="fault-injection", daemon=True).start()


def last_worker(server_pid: int) -> int | None:
    """The PID of the highest-ranked worker process of a parallel server's tree (vLLM titles
    them VLLM::Worker_TP<rank>, _PP<rank>_TP<rank>, ...), None if it has none (one worker runs
    inside the engine core)."""
    from fastvllm.runtime import proctree

    workers = []
    for pid in proctree.session_pids(server_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if "::Worker" in title:
            workers.append((title, pid))
    return max(workers)[1] if workers else None


def _fire(fault: Fault, server_pid: int | None) -> None:
    if fault in (Fault.KILL_SERVER, Fault.KILL_WORKER):
        target = server_pid
        if fault is Fault.KILL_WORKER and server_pid is not None:
            target = last_worker(server_pid)
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
            if fault is Fault.KILL_WORKER:
                _wait_dead(target)
        return
    sig = SIGNAL_OF.get(fault)
    if sig is None:
        return
    os.kill(os.getpid(), sig)
    if threading.current_thread() is threading.main_thread():
        # The handler runs at the next bytecode boundary; wait for it here, not further on.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            time.sleep(0.01)


def _wait_dead(pid: int, timeout: float = 60.0) -> None:
    """Until `pid` has exited (a zombie counts): a process killed with much memory mapped takes
    a while to go, and the fault means "the worker died here", not "was signalled here"."""
    from fastvllm.runtime import proctree

    deadline = time.monotonic() + timeout
    while proctree.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
