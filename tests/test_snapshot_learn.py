"""`fastvllm snapshot` ends with a trial restore that learns the snapshot's hot set (snapshot.learn):
the first restore on the host then reads it ahead like every later one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastvllm.restore import hotset
from fastvllm.runtime import instances, manifest, proctree

from .conftest import TEST_PORT, needs_criu, run_cli, servers_on_port


@pytest.mark.slow
@needs_criu
def test_snapshot_learns_the_hot_set(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "s"
    try:
        r = run_cli("snapshot", str(tiny_model), "--out", str(out), "--port", str(TEST_PORT), "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
        trial = doc["trial_restore"]
        assert trial["restored"] and trial["canary_ok"] and trial["hot_set_learned"], trial
        assert "learn_hot_set" in [p["name"] for p in doc["phases"]]
        assert hotset.path_of(out).is_file()
        m = manifest.load(out)
        learned = hotset.load(out, {f.path: f.size for f in m.files})
        assert learned is not None and learned.bytes == trial["hot_set_bytes"] > 0
        # the trial's server is stopped and forgotten: the port and the snapshot's PIDs are free
        assert not servers_on_port(TEST_PORT)
        assert not [p for p in m.server.tree_pids if proctree.alive(p)]
        assert not [i for i in instances.running() if i.snapshot == str(out)]
    finally:
        for pid in servers_on_port(TEST_PORT):
            proctree.stop_session(os.getsid(pid))
