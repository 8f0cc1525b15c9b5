"""The CLI's own surface: help that teaches, inspect, doctor, and Ctrl-C during a snapshot."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import FASTVLLM, TEST_PORT, SharedSnapshot, needs_criu, run_cli, servers_on_port


def test_help_lists_the_commands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("snapshot", "restore", "inspect", "doctor", "bench", "demo"):
        assert cmd in r.stdout
    r = run_cli("snapshot", "--help")
    assert "--out" in r.stdout and "--leave-running" in r.stdout and "vLLM" in r.stdout


@needs_criu
def test_doctor_json_reports_every_check() -> None:
    r = run_cli("doctor", "--json", "--skip-vllm")
    doc = json.loads(r.stdout)
    names = {c["name"] for c in doc["checks"]}
    assert {"CRIU >= 4.2", "criu check", "privileges", "io_uring", "CUDA checkpoint"} <= names
    assert r.returncode == (0 if doc["ok"] else 9)
    for c in doc["checks"]:
        if c["required"] and not c["ok"]:
            assert c["fix"], f"failing check {c['name']} says no fix"


@pytest.mark.slow
@needs_criu
def test_inspect_shows_the_manifest(shared_snapshot: SharedSnapshot) -> None:
    r = run_cli("inspect", str(shared_snapshot.path), "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["server"]["port"] == TEST_PORT and doc["canary"]["token_ids"]
    r = run_cli("inspect", str(shared_snapshot.path))
    assert r.returncode == 0 and "canary" in r.stdout and "CRIU" in r.stdout


@pytest.mark.slow
@needs_criu
def test_ctrl_c_during_snapshot_leaves_nothing(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "s"
    p = subprocess.Popen(
        [*FASTVLLM, "snapshot", str(tiny_model), "--out", str(out), "--port", str(TEST_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A harness that runs the suite in the background (a shell's `&`) starts it with SIGINT
        # ignored, and Python keeps an inherited SIG_IGN: Ctrl-C must reach the CLI here.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def server() -> list[int]:  # the CLI's own command line names the port too
        return [pid for pid in servers_on_port(TEST_PORT) if pid != p.pid]

    deadline = time.monotonic() + 60
    while not server() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server(), "the vLLM server never started"
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists()
    assert not [x for x in tmp_path.iterdir() if ".partial-" in x.name]
    assert not servers_on_port(TEST_PORT)
