"""Plain process mode on a real PyTorch process (a transformers Llama with random weights):
`fastvllm snapshot --pid` of a tree fastvllm did not launch, the tree killed by the dump,
`fastvllm restore`, and the same greedy tokens and parameter bytes afterwards. On a GPU the
device memory goes through the CUDA checkpoint API; that case skips without one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastvllm.runtime import manifest, proctree

from .conftest import needs_criu, run_cli

pytestmark = [pytest.mark.slow, needs_criu]
WORKER = Path(__file__).parent / "progs" / "llama_worker.py"


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _ask(work: Path, n: int) -> dict[str, object]:
    (work / f"go-{n}").write_text("1")
    _wait_for(work / f"out-{n}.json")
    return json.loads((work / f"out-{n}.json").read_text())


@pytest.fixture
def worker_tree(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """The worker in a session of its own; killed at teardown whatever happened (the PID may
    belong to the restored copy by then: CRIU gives it back its PID)."""
    work = tmp_path / "work"
    work.mkdir()
    log = open(work / "worker.log", "ab")  # noqa: SIM115 (the worker holds it for its lifetime)
    device, *mode = request.param.split(":")  # "cuda:busy": the worker keeps the GPU spinning
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), device, str(work), *mode],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    try:
        _wait_for(work / "ready")
        yield proc.pid, work
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            proc.wait(timeout=30)
        proctree.wait_gone([proc.pid], 30.0, reaped=True)


@pytest.mark.parametrize(
    "worker_tree",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA checkpoint API)"
                ),
            ],
        ),
    ],
    indirect=True,
)
def test_process_snapshot_restores_the_same_tokens(worker_tree: tuple[int, Path], tmp_path: Path) -> None:
    pid, work = worker_tree
    before = _ask(work, 0)
    snap = tmp_path / "snap"
    r = run_cli("snapshot", "--pid", str(pid), "--out", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "process" and doc["root_pid"] == pid
    m = manifest.load_process(snap)
    if before["device"] != "cpu":  # (a CPU-only torch process on a GPU host may hold /dev/nvidia* too)
        assert m.cuda_pids == [pid] and m.gpu is not None
    elif not torch.cuda.is_available():
        assert not m.cuda_pids and m.gpu is None
    proctree.wait_gone([pid], 10.0, reaped=True)
    assert not proctree.alive(pid)  # the dump stopped it

    r = run_cli("inspect", str(snap))
    assert r.returncode == 0 and "plain process tree" in r.stdout
    r = run_cli("restore", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pid"] == pid
    # the snapshot hashed its files on this host just before: the restore trusts them
    assert "verify_checksums" not in [p["name"] for p in doc["phases"]]
    after = _ask(work, 1)
    assert after["tokens"] == before["tokens"]
    assert after["digest"] == before["digest"]  # every parameter byte, on the device it lives on
    assert after["device"] == before["device"]

    # A file changed since is hashed again and refused, trusted or not.
    os.kill(pid, signal.SIGKILL)
    proctree.wait_gone([pid], 30.0, reaped=True)
    page = max((snap / "criu").glob("pages-*.img"), key=lambda f: f.stat().st_size)
    with open(page, "r+b") as f:
        f.seek(page.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run_cli("restore", str(snap))
    assert r.returncode != 0 and "checksum" in (r.stderr + r.stdout).lower(), r.stderr
    assert not proctree.alive(pid)


def test_process_snapshot_of_a_missing_pid(tmp_path: Path) -> None:
    r = run_cli("snapshot", "--pid", "999999", "--out", str(tmp_path / "s"))
    assert r.returncode == 2
    assert "999999" in r.stderr
    assert not (tmp_path / "s").exists()


GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA checkpoint API)"),
]


@pytest.mark.parametrize("worker_tree", [pytest.param("cuda:busy", marks=GPU)], indirect=True)
def test_cuda_lock_timeout_leaves_the_process_running(worker_tree: tuple[int, Path], tmp_path: Path) -> None:
    from fastvllm.runtime import cuda_checkpoint

    pid, _ = worker_tree
    time.sleep(1.0)  # spin kernels queued
    r = run_cli("snapshot", "--pid", str(pid), "--out", str(tmp_path / "s"), "--lock-timeout", "0.3")
    assert r.returncode == 10, r.stderr
    assert "timed out" in r.stderr
    assert not (tmp_path / "s").exists()
    assert proctree.alive(pid) and cuda_checkpoint.state(pid) == "running"


@pytest.mark.parametrize("worker_tree", [pytest.param("cuda", marks=GPU)], indirect=True)
def test_failed_criu_restore_after_a_cuda_checkpoint_leaves_nothing(
    worker_tree: tuple[int, Path], tmp_path: Path
) -> None:
    pid, work = worker_tree
    _ask(work, 0)
    snap = tmp_path / "snap"
    r = run_cli("snapshot", "--pid", str(pid), "--out", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    m = manifest.load_process(snap)
    assert m.cuda_pids
    # an image CRIU cannot read, with its checksum updated so that only CRIU notices
    (snap / "criu/pstree.img").write_bytes(b"\x00" * 16)
    doc = json.loads((snap / "manifest.json").read_text())
    for f in doc["files"]:
        if f["path"] == "criu/pstree.img":
            f["size"], f["xxh3_128"] = 16, manifest.hash_file(snap / "criu/pstree.img")
    (snap / "manifest.json").write_text(json.dumps(doc))
    r = run_cli("restore", str(snap))
    assert r.returncode == 6, r.stderr
    assert "CRIU restore failed" in r.stderr
    assert not any(proctree.alive(p) for p in m.tree_pids)


@pytest.mark.parametrize("worker_tree", ["cpu:pair", pytest.param("cuda:pair", marks=GPU)], indirect=True)
@pytest.mark.parametrize("victim", ["child", "root"])
def test_a_process_dying_between_checkpoint_and_dump(
    worker_tree: tuple[int, Path], victim: str, tmp_path: Path
) -> None:
    """A process of the tree is killed after the CUDA checkpoint (on a GPU) and before the
    CRIU dump: the snapshot is refused naming it, nothing is written, and the survivor is
    unlocked with its GPU state back (and, when it is the root, still answers the same)."""
    from fastvllm.runtime import cuda_checkpoint
    from fastvllm.runtime.errors import TreeChangedError
    from fastvllm.snapshot.process import take_process_snapshot

    pid, work = worker_tree
    before = _ask(work, 0)
    child = int((work / "child.pid").read_text())
    target, survivor = (child, pid) if victim == "child" else (pid, child)
    on_gpu = before["device"] != "cpu"

    def kill() -> None:
        if on_gpu:
            assert cuda_checkpoint.state(target) == "checkpointed"
        os.kill(target, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while proctree.alive(target) and time.monotonic() < deadline:
            time.sleep(0.02)

    snap = tmp_path / "snap"
    with pytest.raises(TreeChangedError) as err:
        take_process_snapshot(pid, snap, after_checkpoint=kill)
    print(err.value.one_line())
    assert str(target) in err.value.message and "exited" in err.value.message
    assert not snap.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert proctree.alive(survivor)
    if on_gpu:
        assert cuda_checkpoint.state(survivor) == "running"
    if victim == "child":
        assert _ask(work, 1)["tokens"] == before["tokens"]
