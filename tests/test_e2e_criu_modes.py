"""The CRIU restore modes on the real vLLM server of the shared snapshot: each mode gives the
same tokens as the original server; a mmap-restored server keeps the snapshot in use (inspect
names it, rm refuses), and snapshotting it again gives a snapshot that restores with the first
one moved out of reach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastvllm.runtime import criu, manifest, proctree

import fastvllm

from .conftest import PROMPTS, SharedSnapshot, completions, needs_criu, run_cli
from .test_criu_mmap import needs_patched

pytestmark = [pytest.mark.slow, needs_criu]


@pytest.mark.parametrize("mode", [pytest.param("mmap", marks=needs_patched), "copy", "lazy"])
def test_each_restore_mode_gives_the_same_tokens(
    mode: str, shared_snapshot: SharedSnapshot, restored_cleanup: list[int]
) -> None:
    if mode == "lazy" and not criu.supports_lazy(criu.find_criu()):
        pytest.skip("CRIU's lazy restore needs userfaultfd (criu check --feature uffd-noncoop)")
    r = run_cli("restore", str(shared_snapshot.path), "--criu-restore", mode, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    restored_cleanup.append(res["pid"])
    assert res["criu_restore"] == mode and res["canary_ok"] is True
    assert completions(res["url"], shared_snapshot.served_model_name, PROMPTS) == shared_snapshot.before

    r = run_cli("inspect", str(shared_snapshot.path), "--json")
    assert r.returncode == 0, r.stderr
    users = {u["pid"] for u in json.loads(r.stdout)["mapped_by"]}
    tree = set(proctree.session_pids(res["pid"]))
    if mode == "mmap":
        assert res["pid"] in users and users <= tree
        r = run_cli("rm", str(shared_snapshot.path))
        assert r.returncode == 2 and "in use" in r.stderr and str(res["pid"]) in r.stderr
        manifest.verify_files(shared_snapshot.path, manifest.load(shared_snapshot.path).files)
    else:
        assert not users


@needs_patched
def test_a_mmap_restored_server_snapshots_again_on_its_own(
    shared_snapshot: SharedSnapshot, tmp_path: Path, restored_cleanup: list[int]
) -> None:
    first = fastvllm.restore(shared_snapshot.path, criu_restore="mmap")
    restored_cleanup.append(first.server.pid)
    assert first.criu_restore == "mmap"
    # the restored server serves (touching and writing pages mapped from the images) ...
    assert (
        completions(first.server.base_url, shared_snapshot.served_model_name, PROMPTS)
        == shared_snapshot.before
    )
    # ... and is snapshotted again: those mappings become memory in the new images
    again = fastvllm.snapshot(out=tmp_path / "again", pid=first.server.pid)
    assert "maps the CRIU image" in (again.path / "logs" / "criu-dump.log").read_text()
    assert not proctree.alive(first.server.pid)

    moved = shared_snapshot.path.with_name("moved-away")
    shared_snapshot.path.rename(moved)  # the new snapshot must not need the old one's files
    try:
        second = fastvllm.restore(again.path, criu_restore="mmap")
        restored_cleanup.append(second.server.pid)
        got = completions(second.server.base_url, shared_snapshot.served_model_name, PROMPTS)
        assert got == shared_snapshot.before
        r = run_cli("inspect", str(again.path), "--json")
        assert second.server.pid in {u["pid"] for u in json.loads(r.stdout)["mapped_by"]}
        tree = proctree.session_pids(second.server.pid)
        fastvllm.stop(second.server.pid)
        proctree.wait_gone(tree, 30, reaped=True)
        r = run_cli("rm", str(again.path))  # nothing maps it any more
        assert r.returncode == 0, r.stderr
        assert not again.path.exists()
    finally:
        moved.rename(shared_snapshot.path)
