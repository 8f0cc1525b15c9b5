"""The fault-injection matrix: for each (point, fault), the real CLI (`python -m fastvllm.cli`)
runs with FASTVLLM_FAULT=<point>:<fault> (runtime/faults.py, test-only) and we check what it
leaves: its exit code, no process of the server tree (or, with --pid, the original still
serving), no partial directory, no /dev/shm file of the tree, and that the next command works.

CI runs a fixed subset that covers every point and every fault at least once (6 vLLM launches;
the restore cases share one snapshot). The whole matrix:

    FASTVLLM_FAULT_MATRIX=full flock /tmp/fastvllm-slow.lock \\
        .venv/bin/python -m pytest tests/test_faults.py -m slow

docs/fault-matrix.md shows the matrix and the results of its last full run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fastvllm.runtime import criu, journal, manifest, proctree, shm, vllm_server
from fastvllm.runtime.faults import RESTORE_POINTS, SNAPSHOT_POINTS, Fault, Point

from .conftest import FASTVLLM, PROMPTS, TEST_PORT, SharedSnapshot, completions, needs_criu

pytestmark = [pytest.mark.slow, needs_criu]

FULL = os.environ.get("FASTVLLM_FAULT_MATRIX", "") == "full"
PORT = TEST_PORT + 20  # the snapshot cases' servers (the shared snapshot's restores use TEST_PORT)
SIGNAL_EXIT = {
    Fault.SIGTERM: 128 + signal.SIGTERM,
    Fault.SIGINT: 128 + signal.SIGINT,
    Fault.SIGHUP: 128 + signal.SIGHUP,
    Fault.SIGKILL: -signal.SIGKILL,  # (137 in a shell)
}
CRIU_FAILED = 6
# What a server killed under the pipeline fails with: the server error, CRIU's, or a tree that
# changed under the dump; or 0 where the kill came after the step that needed it (the dump done).
SERVER_KILLED = {0, 6, 7, 11}
GPU = vllm_server.cuda_present()


@dataclass(frozen=True)
class Case:
    point: Point
    fault: Fault

    @property
    def id(self) -> str:
        return f"{self.point}:{self.fault}"


def _applies(point: Point, fault: Fault) -> bool:
    if fault is Fault.KILL_WORKER:  # tensor-parallel trees only: tests/test_tensor_parallel.py
        return False
    if fault is Fault.CRIU:  # CRIU runs at these points only
        return point in (Point.DUMP, Point.CRIU_RESTORE)
    if fault is Fault.KILL_SERVER:  # before CRIU there is no restored server to kill
        return point is not Point.VALIDATE
    return True


def _cases(points: tuple[Point, ...], ci: list[tuple[Point, Fault]]) -> list[Case]:
    if FULL:
        return [Case(p, f) for p in points for f in Fault if _applies(p, f)]
    return [Case(p, f) for p, f in ci]


# The CI subset. Snapshot (one launch each; the --pid cases below reuse one server): every
# snapshot point but the GPU's cuda_checkpoint, and the findings' SIGTERM, SIGHUP, SIGKILL.
SNAPSHOT_CI = [
    (Point.LAUNCH, Fault.SIGTERM),
    (Point.HEALTHY, Fault.KILL_SERVER),
    (Point.WARMUP, Fault.SIGHUP),
    (Point.DUMP, Fault.SIGKILL),  # then a snapshot into the same --out cleans up and succeeds
]
# A server that runs on (--pid, --leave-running): whatever the fault, it serves on, unchanged.
PID_CI = [(Point.RELEASE, Fault.SIGINT), (Point.DUMP, Fault.SIGTERM), (Point.PUBLISH, Fault.SIGKILL)]
# Restore: every point, every fault, the findings' SIGTERM/SIGKILL/SIGINT while CRIU runs.
RESTORE_CI = [
    (Point.VALIDATE, Fault.SIGTERM),
    (Point.CRIU_RESTORE, Fault.SIGTERM),
    (Point.CRIU_RESTORE, Fault.SIGINT),
    (Point.CRIU_RESTORE, Fault.SIGKILL),
    (Point.CRIU_RESTORE, Fault.CRIU),
    (Point.HEALTH, Fault.KILL_SERVER),
    (Point.WEIGHT_LOAD, Fault.SIGHUP),
    (Point.CANARY, Fault.SIGKILL),
]
SNAPSHOT_CASES = _cases(
    tuple(p for p in SNAPSHOT_POINTS if GPU or p is not Point.CUDA_CHECKPOINT), SNAPSHOT_CI
)
PID_CASES = _cases((Point.WARMUP, Point.RELEASE, Point.DUMP, Point.PUBLISH), PID_CI)
PID_CASES = [c for c in PID_CASES if c.fault is not Fault.KILL_SERVER]  # (it would not serve on)
RESTORE_CASES = _cases(RESTORE_POINTS, RESTORE_CI)


class _Reaper:
    """This test process reaps the orphans of the commands it runs, as the init of a usual host
    (systemd, a container's tini) does: a CLI killed by the matrix leaves its children (CRIU,
    the server tree it stops later) to the nearest reaper, and their zombies hold PIDs that the
    next restore needs back. This machine's PID 1 reaps adopted orphans only now and then (it
    left some for over a minute), which would make the next restore wait for it, not for
    fastvllm. Our own commands' exit statuses are left to their Popen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ours: set[int] = set()  # the CLIs we run, whose exit status we read
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.1):
            with self.lock:
                for child in psutil.Process().children():
                    with contextlib.suppress(psutil.Error, ChildProcessError):
                        if child.pid not in self.ours and child.status() == psutil.STATUS_ZOMBIE:
                            os.waitpid(child.pid, os.WNOHANG)


_REAPER = _Reaper()


@pytest.fixture(scope="module", autouse=True)
def reaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _REAPER.thread.start()
    yield
    _REAPER.done.set()
    _REAPER.thread.join()
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


_PR_SET_CHILD_SUBREAPER = 36


def _cli(
    *args: str, fault: Case | None = None, tag: str = "", timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """The real CLI, with the fault armed; `tag` marks its environment, which the server it
    launches inherits, so the test finds every process of that server's tree afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "FASTVLLM_FAULT"}
    if fault is not None:
        env["FASTVLLM_FAULT"] = fault.id
    if tag:
        env["FASTVLLM_TEST_CASE"] = tag
    cmd = [*FASTVLLM, *args]
    with _REAPER.lock:
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # A shell's background job starts with SIGINT ignored, which Python keeps: the
            # sigint fault must reach the CLI.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        _REAPER.ours.add(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(args)} ran over {timeout} s: {err[-2000:]}") from None
    finally:
        _REAPER.ours.discard(p.pid)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment carries FASTVLLM_TEST_CASE=tag."""
    want = f"FASTVLLM_TEST_CASE={tag}".encode()
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if want in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0"):
                out.append(p.pid)
        except OSError:
            continue
    return out


def _shm_names() -> set[Path]:
    """vLLM's, multiprocessing's and CRIU's files in /dev/shm, and CRIU's work directories."""
    return {p for pat in (*shm.ORPHAN_PATTERNS, f"{criu.SCRATCH_PREFIX}*") for p in shm.SHM.glob(pat)}


def _no_orphan_shm(before: set[Path]) -> None:
    stray = sorted((_shm_names() - before) - shm.held())
    assert not stray, f"/dev/shm files or CRIU work directories left that no process holds: {stray}"


def _no_partial(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".partial-" in p.name]
    assert not left, f"partial directories left: {left}"


def _gc() -> str:
    r = _cli("gc")
    assert r.returncode == 0, r.stderr
    return r.stderr


def _check_exit(case: Case, rc: int, err: str) -> None:
    if case.fault in SIGNAL_EXIT:
        assert rc == SIGNAL_EXIT[case.fault], f"{case.id}: exit {rc}\n{err[-3000:]}"
    elif case.fault is Fault.CRIU:
        assert rc == CRIU_FAILED and "CRIU" in err, f"{case.id}: exit {rc}\n{err[-3000:]}"
    else:
        assert rc in SERVER_KILLED, f"{case.id}: exit {rc}\n{err[-3000:]}"
    if rc > 0:
        assert "Traceback" not in err, err[-3000:]


# --- snapshot --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=lambda c: c.id)
def test_snapshot_fault(case: Case, tiny_model: Path, tmp_path: Path) -> None:
    """A snapshot of a server it launches: on any fault, nothing is left, and the next
    command works (for the SIGKILL mid-dump: a snapshot into the same --out, which cleans up
    the dead one's partial directory and server first)."""
    out, tag, shm_before = tmp_path / "s", uuid.uuid4().hex, _shm_names()
    args = ["snapshot", str(tiny_model), "--out", str(out), "--port", str(PORT)]
    try:
        r = _cli(*args, fault=case, tag=tag)
        _check_exit(case, r.returncode, r.stderr)
        if case.fault is Fault.SIGKILL and case.point is Point.DUMP and not FULL:
            nxt = _cli(*args)  # no gc first: the snapshot itself finds what the killed one left
            assert nxt.returncode == 0, nxt.stderr
            assert "cleaned up after an interrupted snapshot" in nxt.stderr, nxt.stderr
            manifest.load(out)
        else:
            if case.fault is Fault.SIGKILL:
                _gc()
            if r.returncode == 0:
                manifest.load(out)  # complete (the server died after the dump): fine
            else:
                assert not out.exists()
        assert not _tagged(tag), "a process of the server's tree was left"
        _no_partial(tmp_path)
        _no_orphan_shm(shm_before)
        assert not journal.orphaned()
        vllm_server.ensure_port_free("127.0.0.1", PORT)  # the next snapshot can have it
    finally:
        for pid in _tagged(tag):
            proctree.stop_session(os.getsid(pid), 1.0)


@dataclass
class Running:
    """A server launched by `snapshot --leave-running`, and what it answered before."""

    pid: int
    url: str
    name: str
    before: list[list[int]]


# --- restore ---------------------------------------------------------------------------------


def _tree_gone(m: manifest.Manifest) -> None:
    alive = [p for p in m.server.tree_pids if proctree.alive(p)]
    assert not alive, f"processes of the restored tree left: {alive}"


def _shm_of(snap: Path) -> list[Path]:
    """The /dev/shm files a restore of `snap` puts back."""
    saved = snap / "shm"
    return [shm.SHM / f.name for f in saved.iterdir()] if saved.is_dir() else []


def _restore_and_stop(snap: Path, before: list[list[int]], name: str) -> str:
    """The next restore: it succeeds and answers as the original did; then it is stopped."""
    r = _cli("restore", str(snap), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    pid = int(doc["pid"])
    try:
        assert completions(str(doc["url"]), name, PROMPTS) == before
    finally:
        tree = proctree.session_pids(pid)
        assert _cli("stop", str(pid)).returncode == 0
        proctree.wait_gone(tree, 30, reaped=True)
    return r.stderr


@pytest.mark.parametrize("case", RESTORE_CASES, ids=lambda c: c.id)
def test_restore_fault(case: Case, shared_snapshot: SharedSnapshot) -> None:
    """A restore: on any fault the tree it restored is stopped (also when CRIU was interrupted,
    or never reported the tree's root), the /dev/shm files it put back are gone, and the next
    restore succeeds (after a SIGKILL, that restore itself cleans up first)."""
    snap = shared_snapshot.path
    m = manifest.load(snap)
    shm_before = _shm_names()
    r = _cli("restore", str(snap), fault=case, timeout=300)
    _check_exit(case, r.returncode, r.stderr)
    if r.returncode == 0:  # a kill that landed too late to matter: the restore succeeded
        assert _cli("stop", str(min(m.server.tree_pids))).returncode == 0
        proctree.wait_gone(m.server.tree_pids, 30, reaped=True)
    if case.fault is Fault.SIGKILL:
        # The next command cleans up: `ps` (the CI case at the canary), else the next restore.
        if case.point is Point.CANARY:
            ps = _cli("ps", "--json")
            assert not [d for d in json.loads(ps.stdout) if d["pid"] in m.server.tree_pids]
            assert "cleaned up after an interrupted restore" in ps.stderr, ps.stderr
        else:
            err = _restore_and_stop(snap, shared_snapshot.before, shared_snapshot.served_model_name)
            if case.point is not Point.VALIDATE:  # (killed before it had started anything)
                assert "cleaned up after an interrupted restore" in err, err
    _tree_gone(m)
    assert not [f for f in _shm_of(snap) if f.exists()], "the /dev/shm files put back were left"
    _no_orphan_shm(shm_before)
    assert not journal.orphaned()
    _restore_and_stop(snap, shared_snapshot.before, shared_snapshot.served_model_name)


def test_kill_9_of_a_restored_root_then_stop_and_restore_again(shared_snapshot: SharedSnapshot) -> None:
    """Finding 5: kill -9 of a restored server's root leaves its engine and worker; ps lists
    the tree as 'root dead', doctor names it, stop stops it, and the next restore works."""
    snap = shared_snapshot.path
    m = manifest.load(snap)
    r = _cli("restore", str(snap), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    root = int(json.loads(r.stdout)["pid"])
    try:
        rest = [p for p in proctree.session_pids(root) if p != root]
        assert rest, "the restored tree has no process but its root"
        os.kill(root, signal.SIGKILL)
        proctree.wait_gone([root], 30)
        assert all(proctree.alive(p) for p in rest)  # (what the finding saw)
        ps = json.loads(_cli("ps", "--json").stdout)
        mine = [(d["pid"], d["status"]) for d in ps if d["pid"] in m.server.tree_pids]
        assert mine == [(root, "root dead")]
        again = _cli("restore", str(snap))
        assert again.returncode != 0 and f"fastvllm stop {root}" in again.stderr, again.stderr
        doc = json.loads(_cli("doctor", "--skip-vllm", "--json").stdout)
        (left,) = [c for c in doc["checks"] if c["name"] == "leftovers"]
        assert not left["ok"] and f"fastvllm stop {root}" in left["fix"]
        assert _cli("stop", str(root)).returncode == 0
        proctree.wait_gone(m.server.tree_pids, 30, reaped=True)
        _tree_gone(m)
    finally:
        for p in m.server.tree_pids:
            if proctree.alive(p):
                proctree.stop_session(os.getsid(p), 1.0)
    _restore_and_stop(snap, shared_snapshot.before, shared_snapshot.served_model_name)


# --- a running server snapshotted again (last: on a GPU its server holds its share of the
# device memory until the module ends, and the restores above must not compete with it) ------


@pytest.fixture(scope="module")
def running_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    out = tmp_path_factory.mktemp("pid-cases") / "base"
    r = _cli("snapshot", str(tiny_model), "--out", str(out), "--port", str(PORT), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    pid, url = int(doc["server_pid"]), str(doc["url"])
    try:
        name = manifest.load(out).server.served_model_name
        yield Running(pid, url, name, completions(url, name, PROMPTS))
    finally:
        tree = proctree.session_pids(pid)
        _cli("stop", str(pid))
        proctree.wait_gone(tree, 30, reaped=True)


@pytest.mark.parametrize("case", PID_CASES, ids=lambda c: c.id)
def test_snapshot_fault_of_a_running_server(case: Case, running_server: Running, tmp_path: Path) -> None:
    """--pid with --leave-running: a server that ran before the snapshot serves on after any
    fault, with its weights (the same tokens) and its gate open, and nothing else is left."""
    s, out = running_server, tmp_path / "again"
    shm_before = _shm_names()
    r = _cli("snapshot", "--pid", str(s.pid), "--out", str(out), "--leave-running", fault=case)
    _check_exit(case, r.returncode, r.stderr)
    if case.fault is Fault.SIGKILL:
        _gc()
    assert not out.exists()
    _no_partial(tmp_path)
    _no_orphan_shm(shm_before)
    assert not journal.orphaned()
    ps = json.loads(_cli("ps", "--json").stdout)
    assert [d["status"] for d in ps if d["pid"] == s.pid] == ["serving"]
    assert completions(s.url, s.name, PROMPTS) == s.before
