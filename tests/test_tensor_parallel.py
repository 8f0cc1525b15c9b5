"""A tensor-parallel server (TP=2) snapshotted and restored, end to end, on the CPU: vLLM's CPU
backend runs it as two worker processes that all-reduce through shared memory, each holding
half of every split weight. The restore must reload each rank's own shard and come back
token-identical; a snapshot or a restore that loses a worker must leave nothing behind and
say which rank it lost (issue 25).

One vLLM launch (module scope, 1-2 min on the 2-core machine). fastvllm binds the workers'
threads itself (VLLM_CPU_OMP_THREADS_BIND, one core list per rank) where vLLM's `auto` would
refuse a host with fewer NUMA nodes than workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastvllm.runtime import instances, journal, manifest, proctree, shm, vllm_server
from fastvllm.runtime.faults import Fault, Point
from fastvllm.weights import fileformat

from .conftest import FASTVLLM, PROMPTS, TEST_PORT, completions, needs_criu, run_cli

pytestmark = [pytest.mark.slow, needs_criu]

PORT = TEST_PORT + 30  # apart from the shared snapshot's (TEST_PORT) and the fault matrix's (+20)
TP = 2
HANG_GUARD_S = 900  # per CLI call: a vLLM start on a busy 2-core machine can take minutes
TREE_GONE_S = 120  # a stopped tree's processes exit and are reaped (generous on a busy host)


@dataclass
class TpSnapshot:
    path: Path
    name: str
    before: list[list[int]]  # PROMPTS' greedy tokens from the original TP=2 server
    env: dict[str, str]  # the recorded server environment
    # `fastvllm snapshot --pid` of the same server with its rank-1 worker killed after the release
    lost_worker: subprocess.CompletedProcess[str]
    worker_pids: list[int]  # the original's worker PIDs, rank order
    out_of_failed: Path  # where that snapshot would have been written


def _fault_cli(*args: str, fault: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTVLLM_FAULT": fault}
    return subprocess.run(
        [*FASTVLLM, *args], capture_output=True, text=True, timeout=HANG_GUARD_S, check=False, env=env
    )


def _error_line(stderr: str) -> str:
    """The one line a failure prints (after the live timeline's lines)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _stop(pid: int) -> None:
    """Stop a server tree by its session (never by name); wait until its PIDs are free."""
    import fastvllm

    tree = proctree.session_pids(pid)
    if tree:
        fastvllm.stop(pid)
        proctree.wait_gone(tree, TREE_GONE_S, reaped=True)


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[TpSnapshot]:
    """Launch a TP=2 server, snapshot it (--leave-running), record its answers, then snapshot it
    again with --pid while a worker is killed (it serves no more after that), and stop it."""
    if vllm_server.cuda_present():
        pytest.skip("the CPU test of tensor parallelism (a GPU host runs vLLM's GPU backend)")
    if len(os.sched_getaffinity(0)) < TP:
        pytest.skip(f"TP={TP} on the CPU needs {TP} cores")
    import fastvllm

    root = tmp_path_factory.mktemp("tp")
    snap = fastvllm.snapshot(
        str(tiny_model),
        out=root / "tp2",
        port=PORT,
        leave_running=True,
        vllm_args=["--tensor-parallel-size", str(TP), "--dtype", "float32"],
    )
    assert snap.server is not None
    try:
        name = snap.manifest.server.served_model_name
        before = completions(snap.server.base_url, name, PROMPTS)
        lost = _fault_cli(
            "snapshot",
            "--pid",
            str(snap.server.pid),
            "--out",
            str(root / "lost"),
            fault=f"{Point.RELEASE}:{Fault.KILL_WORKER}",
        )
    finally:
        _stop(snap.server.pid)
    try:
        m = snap.manifest
        yield TpSnapshot(
            snap.path, name, before, dict(m.server.env), lost, list(m.worker_pids), root / "lost"
        )
    finally:
        for inst in fastvllm.running():  # a restore a failed test left behind
            if inst.port == PORT:
                _stop(inst.pid)
        shutil.rmtree(root, ignore_errors=True)


def test_manifest_records_the_parallel_layout(tp: TpSnapshot) -> None:
    m = manifest.load(tp.path)
    assert m.tensor_parallel_size == TP and m.world_size == TP
    assert m.devices == {"kind": "cpu"}
    assert len(m.worker_pids) == TP and set(m.worker_pids) <= set(m.server.tree_pids)
    files = m.all_weight_files()
    assert files[0] == m.weights_file and len(files) == TP
    # each rank wrote its own shard: the same tensor names, other bytes
    idx = [fileformat.read_index(tp.path / f) for f in files]
    assert [i.meta["rank"] for i in idx] == list(range(TP))
    assert {t.name for t in idx[0].tensors} == {t.name for t in idx[1].tensors}
    assert idx[0].data_xxh3_128 != idx[1].data_xxh3_128
    # one core list per worker, set by fastvllm (the user set none)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and vllm_server.numa_nodes() < TP:
        assert tp.env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == TP - 1


def test_snapshot_that_loses_a_worker_names_the_rank_and_writes_nothing(tp: TpSnapshot) -> None:
    r = tp.lost_worker
    assert r.returncode == 11, r.stderr  # TreeChangedError
    line = _error_line(r.stderr)
    assert f"1 (PID {tp.worker_pids[1]})" in line and "nothing was written" in line, r.stderr
    assert not tp.out_of_failed.exists()
    assert not [p for p in tp.out_of_failed.parent.iterdir() if p.name.startswith(".lost")]


def test_restore_that_loses_a_worker_stops_the_tree_and_names_the_rank(tp: TpSnapshot) -> None:
    m = manifest.load(tp.path)
    r = _fault_cli("restore", str(tp.path), "--json", fault=f"{Point.WEIGHT_LOAD}:{Fault.KILL_WORKER}")
    assert r.returncode != 0, r.stdout
    assert f"1 (PID {m.worker_pids[1]})" in _error_line(r.stderr), r.stderr
    # no process of the tree is left, half-restored or otherwise, and nothing of it is recorded
    assert not proctree.wait_gone(m.server.tree_pids, TREE_GONE_S, reaped=True)
    assert not [i for i in instances.running() if i.port == PORT]
    assert not journal.orphaned()  # the failed restore unwound its own undo stack
    saved = tp.path / "shm"
    left = [f.name for f in saved.iterdir() if (shm.SHM / f.name).exists()] if saved.is_dir() else []
    assert not left, left


def test_restore_is_token_identical(tp: TpSnapshot) -> None:
    r = run_cli("restore", str(tp.path), "--json", timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    try:
        assert res["canary_ok"] is True
        # both workers reloaded their own shards
        loads = (res.get("gpu") or {}).get("load") or []
        assert sorted(x["rank"] for x in loads) == list(range(TP)), loads
        assert completions(res["url"], tp.name, PROMPTS) == tp.before
    finally:
        _stop(res["pid"])
    # the workers' shared-memory segments went with the tree
    saved = tp.path / "shm"
    left = [f.name for f in saved.iterdir() if (shm.SHM / f.name).exists()] if saved.is_dir() else []
    assert not left, left
