"""End to end on a real vLLM server and the real criu binary: snapshot, kill, restore, compare
completions token for token (several prompts, not only the canary); then snapshot the
restored server and restore that."""

from __future__ import annotations

import json

import pytest
from fastvllm.runtime import manifest, proctree

import fastvllm

from .conftest import PROMPTS, TEST_PORT, SharedSnapshot, completions, needs_criu, run_cli, servers_on_port

pytestmark = [pytest.mark.slow, needs_criu]


def test_snapshot_is_published_private_and_complete(shared_snapshot: SharedSnapshot) -> None:
    path = shared_snapshot.path
    assert (path.stat().st_mode & 0o777) == 0o700
    m = manifest.load(path)
    assert m.server.port == TEST_PORT
    assert m.canary.token_ids and len(m.canary.token_ids) == m.canary.max_tokens
    assert m.image_bytes > 100 << 20  # a real process tree, not an empty dump
    assert any(f.path.startswith("criu/pages-") for f in m.files)
    for key in ("launch_to_healthy", "criu_dump", "checksums", "cold_start_to_first_completion_s"):
        assert m.timings[key] > 0
    # nothing but the snapshot itself was left in its parent
    assert [p.name for p in shared_snapshot.root.iterdir()] == ["tiny"]


def test_restore_is_token_identical_and_resnapshot_restores(
    shared_snapshot: SharedSnapshot, tmp_path, restored_cleanup: list[int]
) -> None:
    # 1. restore through the CLI, as a user would, with --json
    r = run_cli("restore", str(shared_snapshot.path), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    restored_cleanup.append(res["pid"])
    assert res["canary_ok"] is True
    assert {p["name"] for p in res["phases"]} >= {
        "validate",
        "verify_checksums",
        "criu_restore",
        "first_completion",
    }
    after = completions(res["url"], shared_snapshot.served_model_name, PROMPTS)
    assert after == shared_snapshot.before

    # 2. snapshot the restored server (it is not our child: found through its instance record)
    snap2 = fastvllm.snapshot(out=tmp_path / "again", pid=res["pid"])
    assert snap2.manifest.source_snapshot == str(shared_snapshot.path)
    assert snap2.manifest.canary.token_ids == manifest.load(shared_snapshot.path).canary.token_ids
    assert not proctree.alive(res["pid"])  # the dump stopped it

    # 3. restore the second-generation snapshot with the Python API
    again = fastvllm.restore(snap2.path)
    restored_cleanup.append(again.server.pid)
    assert again.canary_ok
    assert (
        completions(again.server.base_url, shared_snapshot.served_model_name, PROMPTS)
        == shared_snapshot.before
    )

    fastvllm.stop(again.server.pid)
    assert not servers_on_port(TEST_PORT)
