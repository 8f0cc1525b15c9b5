"""End to end on a real vLLM server and the real criu binary: snapshot, kill, restore, compare
completions token for token (several prompts, not only the canary); then snapshot the
restored server and restore that."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fastvllm.runtime import bind_ports, cpu_share, criu, manifest, proctree
from fastvllm.runtime.errors import FastVLLMError

import fastvllm

from .conftest import (
    PROMPTS,
    TEST_PORT,
    SharedSnapshot,
    completions,
    needs_criu,
    page_image_vm_flags,
    run_cli,
    servers_on_port,
)

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
    phases = {p["name"]: p for p in res["phases"]}
    assert set(phases) >= {"validate", "readahead", "criu_restore", "readahead_wait", "first_completion"}
    # the read-ahead (with the checksums) runs beside CRIU's restore, not before it
    assert (
        phases["readahead"]["start_s"]
        < phases["criu_restore"]["start_s"] + phases["criu_restore"]["duration_s"]
    )
    assert "verify_checksums" not in phases
    # CRIU's work files (stats, pidfile, cgroup yard) went to a scratch directory, now gone:
    # neither the image directory nor the logs nor /dev/shm keeps them (runtime.criu._scratch_dir)
    assert not list((shared_snapshot.path / "criu").glob("stats-restore*"))
    assert not list((shared_snapshot.path / "logs").glob("*.pid"))
    assert not list(Path("/dev/shm").glob("fastvllm-criu-work-*"))
    found = criu.find_criu()
    if found.path == criu.PATCHED_CRIU:  # built to keep its kernel probes on tmpfs
        assert (criu.KDAT_DIR / "criu.kdat").is_file()
    if res["criu_restore"] == "mmap" and criu.supports_mmap_random(found):
        # the snapshot's own files are trusted here, so nothing read its page images whole:
        # the tree's runs mapped from them fault one page at a time (VmFlags "rr": MADV_RANDOM)
        flags = page_image_vm_flags(proctree.session_pids(res["pid"]))
        assert flags and all("rr" in f for f in flags), flags
    if cpu_share.group_path() is not None:  # the restored tree yields to other work (runtime.cpu_share)
        assert {cpu_share.group_of(p) for p in proctree.session_pids(res["pid"])} == {"/" + cpu_share.CGROUP}
    # on a GPU: the staging buffers kept in the image (emptied after the CUDA checkpoint,
    # runtime/discard.py) passed the loader's probe, and the CUDA restore's host copy was mapped
    # in from outside (runtime/prefault.py)
    for load in (res.get("gpu") or {}).get("load", []):
        assert load["pool"] in ("", "kept"), load  # "": a CPU load stages nothing
    _assert_left_out_of_the_image(manifest.load(shared_snapshot.path))
    if (res.get("gpu") or {}).get("prefault") is not None:
        assert all(p["reads"] > 0 for p in res["gpu"]["prefault"].values()), res["gpu"]
    # the tree's own listening sockets sit below the ephemeral ports (runtime/native/bind_ports.c)
    listening = {
        c.laddr.port
        for p in proctree.session_pids(res["pid"])
        for c in psutil.Process(p).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    } - {TEST_PORT}
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert listening and all(bind_ports.LOW <= p < ephemeral_low for p in listening), sorted(listening)
    after = completions(res["url"], shared_snapshot.served_model_name, PROMPTS)
    assert after == shared_snapshot.before

    # 2. snapshot the restored server (it is not our child: found through its instance record)
    snap2 = fastvllm.snapshot(out=tmp_path / "again", pid=res["pid"])
    assert snap2.manifest.source_snapshot == str(shared_snapshot.path)
    assert snap2.manifest.canary.token_ids == manifest.load(shared_snapshot.path).canary.token_ids
    assert not proctree.alive(res["pid"])  # the dump stopped it

    # 3. restore the second-generation snapshot with the Python API, the serial way (every
    #    checksum first, no read-ahead)
    again = fastvllm.restore(snap2.path, prefetch=False)
    restored_cleanup.append(again.server.pid)
    assert again.canary_ok
    # the second generation's buffers are memfds (CRIU restored them so), the first's were
    # anonymous shared memory: both are emptied, and both restore as the loader's kept pool
    _assert_left_out_of_the_image(snap2.manifest)
    for load in (again.gpu or {}).get("load", []):
        assert isinstance(load, dict) and load["pool"] in ("", "kept"), load
    assert "verify_checksums" in again.timeline.durations() and "readahead" not in again.timeline.durations()
    assert (
        completions(again.server.base_url, shared_snapshot.served_model_name, PROMPTS)
        == shared_snapshot.before
    )

    fastvllm.stop(again.server.pid)
    assert not servers_on_port(TEST_PORT)


def _assert_left_out_of_the_image(m: manifest.Manifest) -> None:
    """On a GPU snapshot whose workers kept their staging buffers, every kept byte was punched
    out of the image (runtime/discard.py), and, with FASTVLLM_GPU_GRAPH_MEMORY=release and
    CUDA graphs on, every worker's graphs allocate from vLLM's sleep-mode allocator, so their
    memory is out of the image too (weights/graph_memory.py; the restore's token-for-token
    answers above prove the graphs replay on it mapped back empty); nothing to check on the CPU."""
    state = m.gpu_state or {}
    for w in state.get("worker") or []:
        g = w.get("graph_memory") if isinstance(w, dict) else None
        if g and g.get("mode") == "release":
            assert g.get("patched"), g
            if "--enforce-eager" not in os.environ.get("FASTVLLM_TEST_VLLM_ARGS", ""):
                assert g.get("installed") and g.get("graph_bytes", 0) > 0, g
    pools = [w.get("pinned_pool") or {} for w in state.get("worker") or [] if isinstance(w, dict)]
    kept = sum(int(p["bytes"]) for p in pools if p.get("kept"))
    if kept:
        assert state.get("staging_discarded_bytes") == kept, state


def test_restore_order_of_a_real_snapshot(shared_snapshot: SharedSnapshot) -> None:
    """Every CRIU pagemap names a page image that exists, and the plan reads the small
    images before the page images and the weight file after them."""
    from fastvllm.restore import order

    m = manifest.load(shared_snapshot.path)
    pagemaps = [f.path for f in m.files if f.path.startswith("criu/pagemap-")]
    assert pagemaps
    for pm in pagemaps:
        n = order.pages_id(shared_snapshot.path / pm)
        assert n is not None and (shared_snapshot.path / f"criu/pages-{n}.img").is_file()
    got = [e.path for e in order.restore_order(shared_snapshot.path, m)]
    assert sorted(got) == sorted(f.path for f in m.files)
    first_pages = min(i for i, p in enumerate(got) if p.startswith("criu/pages-"))
    assert all(not p.startswith("criu/") or p.startswith("criu/pages-") for p in got[first_pages:])
    if m.weights_file:
        assert got.index(m.weights_file) > first_pages


def test_damaged_page_image_fails_the_restore(shared_snapshot: SharedSnapshot, tmp_path) -> None:
    """With the read-ahead on, page images are checked while CRIU restores and the canary runs;
    a flipped byte in one still fails the restore (exit 4, naming the file) and leaves no server
    behind, however the canary went."""
    import shutil

    src = shared_snapshot.path
    m = manifest.load(src)
    name = max((f for f in m.files if f.path.startswith("criu/pages-")), key=lambda f: f.size).path
    dst = tmp_path / "damaged"
    dst.mkdir(mode=0o700)
    shutil.copy2(src / "manifest.json", dst / "manifest.json")
    for sub in sorted(p.name for p in src.iterdir() if p.is_dir() and p.name != "logs"):
        (dst / sub).mkdir()
        for f in (src / sub).iterdir():
            if f"{sub}/{f.name}" == name:
                shutil.copy2(f, dst / sub / f.name)
            else:
                (dst / sub / f.name).symlink_to(f)
    with open(dst / name, "r+b") as f:  # near the end: memory the canary is unlikely to touch
        f.seek(m.files[[e.path for e in m.files].index(name)].size - 4096 - 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run_cli("restore", str(dst))
    assert r.returncode == 4, r.stderr
    assert name in r.stderr and "checksum" in r.stderr
    assert not servers_on_port(TEST_PORT)
    assert not any(proctree.alive(p) for p in m.server.tree_pids)


@contextlib.contextmanager
def _held(files: list[Path]) -> Iterator[None]:
    """`files` read in and locked in RAM (mlock) for the block, so that a restore inside it
    finds them cached, as on a host that is not busy; a skip where they cannot be locked."""
    from fastvllm.prefetch import warm

    try:
        locked = warm.lock(files)
    except FastVLLMError as e:
        pytest.skip(f"the snapshot's files could not be held in the page cache: {e}")
    with locked:
        yield


def test_a_restore_trusts_what_this_host_checked_and_reads_the_hot_set(
    shared_snapshot: SharedSnapshot, restored_cleanup: list[int]
) -> None:
    """The snapshot's files were hashed when it was written, and a restore records what it
    hashed: the next restore on this host reads them without hashing them again (until they
    change, see test_damaged_page_image_fails_the_restore; a re-snapshot in another test
    hard-links the weight file into the store, which changes its ctime, so the first restore
    here may hash that one), a restore learns the tree's hot set (staged by restore step) and
    the next reads it first; --reverify hashes everything again. Tokens stay identical throughout.
    With CRIU's random faults (patch 0003) a hot set is learned only from page images the tree
    faulted in from a cold cache (restore.pipeline._Faults): a warm restore learns nothing."""
    from fastvllm.prefetch import warm
    from fastvllm.restore import hotset

    path = shared_snapshot.path
    images = sorted((path / "criu").glob("pages-*.img"))
    hotset.path_of(path).unlink(missing_ok=True)
    exact = criu.supports_mmap_random(criu.find_criu())
    got = []
    for reverify in (False, False, True):
        if exact and not got:
            # warm: the page images held in the page cache for this restore (a long suite's
            # reclaim may have taken some since the snapshot was written)
            with _held(images):
                r = fastvllm.restore(path)
            restored_cleanup.append(r.server.pid)
            fastvllm.stop(r.server.pid)
            assert r.criu_restore != "mmap" or not hotset.path_of(path).exists()
            warm.evict(images)  # the next one faults them in from the disk, and learns
        r = fastvllm.restore(path, reverify=reverify)
        restored_cleanup.append(r.server.pid)
        assert r.canary_ok and r.readahead is not None
        got.append(r.readahead)
        fastvllm.stop(r.server.pid)
    assert hotset.path_of(path).is_file()
    learned = hotset.load(path, {f.path: f.size for f in manifest.load(path).files})
    # staged by restore step: the weight reload and the first completion needed pages /health had not
    assert learned is not None and max(f.stage for f in learned.files) > hotset.STAGE_TREE
    first, second, again = got
    n_files = len(manifest.load(path).files)
    assert int(first["hashed_files"]) + int(first["trusted_files"]) == n_files  # type: ignore[call-overload]
    assert second["hashed_files"] == 0 and second["trusted_files"] == n_files
    assert int(second["hot_planned_bytes"]) > 0  # type: ignore[call-overload]
    assert again["trusted_files"] == 0 and int(again["hashed_files"]) > 0  # type: ignore[call-overload]
    assert not servers_on_port(TEST_PORT)


def test_a_warm_restore_reads_nothing_ahead_that_is_cached_and_trusted(
    shared_snapshot: SharedSnapshot, restored_cleanup: list[int]
) -> None:
    """With every page image and weight file in the page cache and checked before on this host,
    a restore reads none of them again and starts no hot-set reader (reading cached pages only
    competes with CRIU and the CUDA restore), and still answers token for token."""
    from fastvllm.prefetch import residency
    from fastvllm.restore import pipeline

    path = shared_snapshot.path
    m = manifest.load(path)
    r = fastvllm.restore(path)  # this host checks (or already trusts) every file
    restored_cleanup.append(r.server.pid)
    fastvllm.stop(r.server.pid)
    big = sorted(path / rel for rel in pipeline._big_files(m))
    with _held(big):  # in the page cache for the whole restore, whatever else the host reads
        assert pipeline._big_files_cached(residency.Sampled(path), m)
        r = fastvllm.restore(path)
    restored_cleanup.append(r.server.pid)
    try:
        assert r.canary_ok and r.readahead is not None
        assert r.readahead["trusted_files"] == len(m.files) and r.readahead["hashed_files"] == 0
        assert r.readahead["hot_bytes"] == 0 and r.readahead["gpu_bytes"] == 0
        assert int(r.readahead["bytes"]) < sum(p.stat().st_size for p in big) // 10  # type: ignore[call-overload]
        assert "readahead_hot" not in r.timeline.durations()
        name = shared_snapshot.served_model_name
        assert completions(r.server.base_url, name, PROMPTS) == shared_snapshot.before
    finally:
        fastvllm.stop(r.server.pid)
