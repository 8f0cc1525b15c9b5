"""Signals handled like Ctrl-C, the journal of operations in flight, and the commands that
clean up after them (gc, ps, stop, rm), without vLLM: small process trees of our own stand in
for a server. tests/test_faults.py runs the same paths with real vLLM and CRIU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastvllm.runtime import atomic, faults, instances, journal, proctree

from .conftest import FASTVLLM

PY = sys.executable


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory of this test's own: its journal and records are nobody else's."""
    d = tmp_path / "run"
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(d))
    return d


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _py(code: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,  # type: ignore[arg-type]
    )


def _ready(p: subprocess.Popen[str]) -> str:
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line, p.stderr.read()  # type: ignore[union-attr]
    return line.strip()


# --- runtime.signals ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_unwinds_like_ctrl_c_and_a_second_one_does_not_cut_the_cleanup(sig: int) -> None:
    p = _py(
        """
        import sys, time
        from fastvllm.runtime import signals
        signals.install()
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt as e:
            print("cleanup", flush=True)
            sys.stdin.readline()  # a second signal lands here: the test's line comes after it
            print("cleanup done", type(e).__name__, flush=True)
            sys.exit(e.exit_code)
        """
    )
    assert _ready(p) == "ready"
    p.send_signal(sig)
    assert _ready(p) == "cleanup"
    p.send_signal(sig)
    out, err = p.communicate("go\n", timeout=30)
    assert "cleanup done Terminated" in out, err
    assert p.returncode == 128 + sig


def test_an_inherited_ignored_sighup_stays_ignored() -> None:
    code = (
        "import signal; from fastvllm.runtime import signals; signals.install(); "
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is not "
        "signal.SIG_DFL)"
    )
    r = subprocess.run(
        [PY, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert r.stdout.split() == ["True", "True"]


def test_a_signal_during_a_shielded_cleanup_is_raised_after_it() -> None:
    p = _py(
        """
        import os, signal, sys, time
        from fastvllm.runtime import signals
        signals.install()
        try:
            with signals.shielded():
                print("ready", flush=True)
                sys.stdin.readline()  # the test's line comes after its signal
                print("shield done", flush=True)
        except signals.Terminated as e:
            sys.exit(e.exit_code)
        """
    )
    assert _ready(p) == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate("go\n", timeout=30)
    assert "shield done" in out
    assert p.returncode == 143


def test_without_install_a_ctrl_c_during_a_shielded_block_is_raised_after_it() -> None:
    """The Python API (no `install()`): Python's own KeyboardInterrupt would land anywhere in
    the block, e.g. between launching a server and registering its undo; the block holds it
    and raises it once done, then Ctrl-C is the caller's again."""
    p = _py(
        """
        import signal, sys, time
        from fastvllm.runtime import signals
        try:
            with signals.shielded():
                with signals.shielded():  # nested: only the outermost holds the signal
                    print("ready", flush=True)
                    sys.stdin.readline()  # the test's line comes after its signal
                print("shield done", flush=True)
        except KeyboardInterrupt:
            print("interrupted after", flush=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signals.received() is None
        with signals.shielded():  # nothing came: nothing raised
            pass
        sys.exit(3)
        """
    )
    assert _ready(p) == "ready"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate("go\n", timeout=30)
    assert out.split() == ["shield", "done", "interrupted", "after"], (out, err)
    assert p.returncode == 3, err


def test_ctrl_c_at_the_terminal_waits_for_criu_and_does_not_reach_it(tmp_path: Path) -> None:
    """CRIU runs in a process group of its own: a terminal's Ctrl-C (SIGINT to the foreground
    group) reaches fastvllm only, which lets CRIU finish, then raises."""
    fake = tmp_path / "criu"
    started, go, marker = tmp_path / "started", tmp_path / "go", tmp_path / "finished"
    # It finishes only once the test has sent its Ctrl-C ("go"), however late that comes.
    fake.write_text(f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {go} ]; do sleep 0.05; done\ntouch {marker}\n")
    fake.chmod(0o755)
    p = _py(
        f"""
        import sys
        from pathlib import Path
        from fastvllm.runtime import criu, signals
        signals.install()
        print("ready", flush=True)
        try:
            criu._run(criu.Criu("{fake}", "4.2"), ["dump"], Path("{tmp_path}/log"), "dump")
        except KeyboardInterrupt as e:
            print("finished" if Path("{marker}").exists() else "cut", flush=True)
            sys.exit(e.exit_code)
        """,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    assert _ready(p) == "ready"
    _wait_for(started.exists, "the fake CRIU to start")
    os.killpg(p.pid, signal.SIGINT)
    go.touch()
    out, err = p.communicate(timeout=30)
    assert out.split()[-1] == "finished", err
    assert p.returncode == 130


# --- runtime.journal ---------------------------------------------------------------------


def test_an_operation_unwinds_last_first_and_leaves_no_journal(run_dir: Path, tmp_path: Path) -> None:
    done: list[str] = []
    with pytest.raises(RuntimeError), journal.Operation("snapshot", tmp_path / "x") as op:
        op.undo_local(done.append, "first")
        keep = op.undo_local(done.append, "cancelled")
        op.undo_local(done.append, "second")
        keep.cancel()
        (entry,) = journal.entries()
        assert entry[1].owner_pid == os.getpid()
        assert entry[0].stat().st_mode & 0o777 == 0o600
        assert journal.journal_dir().stat().st_mode & 0o777 == 0o700
        raise RuntimeError("boom")
    assert done == ["second", "first"]
    assert journal.entries() == []
    with journal.Operation("restore", tmp_path / "x") as op:
        op.undo_local(done.append, "not on success")
        op.commit()
    assert done == ["second", "first"] and journal.entries() == []


def _sleeping_tree() -> tuple[subprocess.Popen[bytes], int]:
    """A session of its own: a root and a child, as a server tree is."""
    root = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    child = int(root.stdout.readline())  # type: ignore[union-attr]
    return root, child


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    root, child = _sleeping_tree()
    yield root, child
    proctree.stop_session(root.pid, 1.0)
    root.wait()


def test_recover_undoes_what_a_killed_owner_left(run_dir: Path, tmp_path: Path, tree) -> None:  # type: ignore[no-untyped-def]
    root, child = tree
    out = tmp_path / "snap"
    shm_file = Path("/dev/shm") / f"fastvllm-test-{os.getpid()}"
    shm_file.write_bytes(b"x")
    owner = _py(
        f"""
        import time
        from pathlib import Path
        from fastvllm.runtime import atomic, journal
        op = journal.Operation("snapshot", Path("{out}")).__enter__()
        staging = atomic.staging_dir(Path("{out}"))
        op.undo("remove_dir", path=str(staging))
        op.undo("remove_files", paths=["{shm_file}"])
        op.undo("stop_tree", sid={root.pid}, started=0)
        print(staging, flush=True)
        time.sleep(300)
        """,
        env={**os.environ},
    )
    staging = Path(_ready(owner))
    assert staging.is_dir() and not journal.partial_is_stale(staging)
    assert journal.recover() == []  # its owner is alive: not touched
    owner.kill()
    owner.wait()
    lines = journal.recover(say=lambda _l: None)
    assert len(lines) == 1 and f"interrupted snapshot (pid {owner.pid})" in lines[0]
    assert f"stopped server tree {root.pid}" in lines[0] and str(staging) in lines[0]
    assert not staging.exists() and not shm_file.exists()
    assert not proctree.alive(child)
    assert journal.entries() == []


def test_a_partial_directory_of_a_dead_writer_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    p = _py(
        f"""
        import time
        from pathlib import Path
        from fastvllm.runtime import atomic
        print(atomic.staging_dir(Path("{out}")), flush=True)
        time.sleep(300)
        """
    )
    staging = Path(_ready(p))
    assert atomic.partials_of(out) == [staging]
    time.sleep(atomic.STALE_AGE_S + 0.5)  # older than the grace a new writer has to take its lock
    assert not atomic.is_stale(staging)  # its writer holds the lock
    p.kill()
    p.wait()
    _wait_for(lambda: atomic.is_stale(staging), "the lock to be free")
    assert journal.clean_partials([tmp_path], say=lambda _l: None)
    assert not staging.exists()


def test_faults_are_armed_only_by_a_valid_point_and_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.VAR, "dump:criu")
    assert faults.armed() == (faults.Point.DUMP, faults.Fault.CRIU)
    assert faults.criu_args("dump") == [faults.BAD_CRIU_OPTION] and faults.criu_args("restore") == []
    monkeypatch.setenv(faults.VAR, "nowhere:sigterm")
    assert faults.armed() is None
    monkeypatch.delenv(faults.VAR)
    faults.at(faults.Point.LAUNCH, 1)  # unarmed: nothing happens


# --- the commands: ps, stop, gc, rm ----------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FASTVLLM, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_a_tree_whose_root_was_killed_is_listed_and_stopped(run_dir: Path, tree) -> None:  # type: ignore[no-untyped-def]
    """Finding 5 in miniature: kill -9 of the root leaves the rest of its session; ps shows it
    as 'root dead', stop stops it (by its root PID or another of its PIDs)."""
    root, child = tree
    instances.record(instances.Instance(root.pid, "127.0.0.1", 1, "m", "m", [], {}, None, "/dev/null"))
    os.kill(root.pid, signal.SIGKILL)
    root.wait()
    env = {**os.environ, "FASTVLLM_RUN_DIR": str(run_dir)}
    r = _cli("ps", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["pid"] == root.pid and doc["status"] == "root dead"
    r = _cli("doctor", "--skip-vllm", "--json", env=env)
    (left,) = [c for c in json.loads(r.stdout)["checks"] if c["name"] == "leftovers"]
    assert not left["ok"] and f"fastvllm stop {root.pid}" in left["fix"]
    r = _cli("stop", str(child), env=env)
    assert r.returncode == 0, r.stderr
    assert not proctree.alive(child)
    assert json.loads(_cli("ps", "--json", env=env).stdout) == []


def _writer(out: Path, env: dict[str, str], journaled: bool) -> tuple[subprocess.Popen[str], Path]:
    """A process writing a snapshot into `out`: its staging directory, journaled or not (a
    writer in another container, or from before a reboot, is in no journal here)."""
    journal_it = "journal.Operation('snapshot', out).__enter__().undo('remove_dir', path=str(s))"
    p = _py(
        f"""
        import time
        from pathlib import Path
        from fastvllm.runtime import atomic, journal
        out = Path("{out}")
        s = atomic.staging_dir(out)
        {journal_it if journaled else ""}
        print(s, flush=True)
        time.sleep(300)
        """,
        env=env,
    )
    return p, Path(_ready(p))


def test_gc_and_rm_clean_what_a_killed_snapshot_left(run_dir: Path, tmp_path: Path) -> None:
    """Finding 6 in miniature: a killed snapshot's partial directory is found and removed by
    gc (journaled) or rm (not journaled: judged by its writer's lock), never while written."""
    out = tmp_path / "snap"
    env = {**os.environ, "FASTVLLM_RUN_DIR": str(run_dir)}
    p1, s1 = _writer(out, env, journaled=True)
    p2, s2 = _writer(out, env, journaled=False)
    for s in (s1, s2):
        r = _cli("rm", str(s), env=env)
        assert r.returncode == 2 and "being written" in r.stderr, r.stderr
    for p in (p1, p2):
        p.kill()
        p.wait()
    r = _cli("gc", env=env)
    assert r.returncode == 0, r.stderr
    assert f"interrupted snapshot (pid {p1.pid})" in r.stderr and str(s1) in r.stderr
    assert not s1.exists() and s2.exists()  # gc without a DIR knows only the journal's
    _wait_for(lambda: atomic.is_stale(s2), "the killed writer's lock to be free")
    r = _cli("rm", str(s2), env=env)
    assert r.returncode == 0, r.stderr
    assert not s2.exists()
    assert "nothing to clean up" in _cli("gc", str(tmp_path), env=env).stderr


def test_a_live_semaphore_is_not_an_orphan() -> None:
    """A spawn-context multiprocessing semaphore is mapped only under sem_open's deleted
    temporary name; `fastvllm gc` once took its real name for an orphan and removed it, so a
    vLLM server starting at that moment had its engine's worker fail to open it."""
    import glob
    import multiprocessing as mp

    from fastvllm.runtime import shm

    before = set(glob.glob("/dev/shm/sem.mp-*"))
    lock = mp.get_context("spawn").Lock()
    mine = {Path(n) for n in set(glob.glob("/dev/shm/sem.mp-*")) - before}
    assert mine, "the semaphore has a name in /dev/shm"
    assert not mine & set(shm.orphans())
    del lock
