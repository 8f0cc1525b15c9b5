"""Plain process mode: snapshot any process tree, GPU or not, with no vLLM steps (users
snapshot their own PyTorch servers this way).

GPU trees: every process holding a /dev/nvidia* device is locked and checkpointed through
the CUDA driver before the CRIU dump (`runtime.cuda_checkpoint`). If the dump fails, or with
`leave_running`, their GPU state is restored and they are unlocked again, so a failed
snapshot leaves the tree serving as it was. All-or-nothing on disk, as the vLLM pipeline is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from fastvllm.runtime import (
    atomic,
    credentials,
    criu,
    cuda_checkpoint,
    journal,
    manifest,
    proctree,
    signals,
    system,
    verified,
)
from fastvllm.runtime.errors import SnapshotExistsError, UsageError
from fastvllm.runtime.timeline import Timeline
from fastvllm.snapshot.pipeline import stage


@dataclass
class ProcessSnapshotResult:
    path: Path
    manifest: manifest.ProcessManifest
    timeline: Timeline

    def as_dict(self) -> dict[str, object]:
        return {
            "snapshot": str(self.path),
            "kind": "process",
            "root_pid": self.manifest.root_pid,
            "tree_pids": self.manifest.tree_pids,
            "cuda_pids": self.manifest.cuda_pids,
            "image_bytes": self.manifest.image_bytes,
            "phases": self.timeline.as_list(),
        }


def tree_of(pid: int) -> list[int]:
    """`pid` and its descendants, root first."""
    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        raise UsageError(f"no process with PID {pid}", hint="check the PID (ps -ef)") from None


def take_process_snapshot(
    pid: int,
    out: Path,
    *,
    leave_running: bool = False,
    lock_timeout_s: float = cuda_checkpoint.DEFAULT_LOCK_TIMEOUT_S,
    timeline: Timeline | None = None,
    after_checkpoint: Callable[[], None] | None = None,
) -> ProcessSnapshotResult:
    """Dump the tree rooted at `pid` into `out`. `after_checkpoint` runs between the CUDA
    checkpoint and the CRIU dump: the failure-injection tests kill a process there. Each step
    registers its undo on the operation's stack (runtime.journal), as the vLLM pipeline does."""
    tl = timeline or Timeline()
    out = out.expanduser().absolute()
    journal.recover()
    system.require_criu_privileges()
    found = criu.find_criu()
    if out.exists():
        raise SnapshotExistsError(f"output directory {out} already exists", hint="choose another --out")
    if pid == os.getpid() or pid in proctree_ancestors():
        raise UsageError(f"PID {pid} is fastvllm itself or its parent", hint="name the tree to snapshot")
    tree = tree_of(pid)
    t = _Tree(
        pid,
        tree,
        cuda_checkpoint.gpu_pids(tree),
        psutil.Process(pid).cmdline(),
        credentials.tree_credential_names(tree),  # names only: the image holds the values
        os.getsid(pid) != pid,
    )
    gpu = cuda_checkpoint.gpu_identity() if t.cuda else None
    journal.clean_partials(atomic.partials_of(out))
    with journal.Operation("snapshot", out) as op:
        staging = stage(op, out, keep_hint=True)
        _dump_tree(op, found, t, staging, tl, leave_running, lock_timeout_s, after_checkpoint)
        with tl.phase("checksums"):
            files = manifest.collect_files(staging)
            verified.record(staging, files)  # hashed just now: a restore here need not again
        m = manifest.ProcessManifest(
            identity=manifest.HostIdentity.here(found.version),
            root_pid=pid,
            tree_pids=tree,
            cmdline=t.cmdline,
            secret_env=t.secret_env,
            cuda_pids=t.cuda,
            shell_job=t.shell_job,
            gpu=gpu.as_dict() if gpu else None,
            files=files,
            image_bytes=criu.image_bytes(staging / "criu"),
        )
        with tl.phase("publish"):
            m.timings = tl.durations()
            m.write(staging)
            atomic.publish(staging, out)
        op.commit()
    return ProcessSnapshotResult(out, m, tl)


@dataclass
class _Tree:
    """The process tree being snapshotted."""

    root: int
    pids: list[int]
    cuda: list[int]  # the processes holding a CUDA context
    cmdline: list[str]
    secret_env: list[str]
    shell_job: bool  # its root is no session leader: its session lives outside the tree


def _dump_tree(
    op: journal.Operation,
    found: criu.Criu,
    t: _Tree,
    staging: Path,
    tl: Timeline,
    leave_running: bool,
    lock_timeout_s: float,
    after_checkpoint: Callable[[], None] | None,
) -> None:
    """The CUDA checkpoint (GPU trees), then the CRIU dump. Undo: what is left of the tree gets
    its GPU state back and keeps serving as it was."""
    gpu_undo = None
    if t.cuda:
        with tl.phase("cuda_checkpoint"), signals.shielded():
            cuda_checkpoint.suspend(t.cuda, lock_timeout_s)
            gpu_undo = op.undo("give_back_gpu", pids=t.cuda)
    if after_checkpoint is not None:
        after_checkpoint()
    # A process that died here would be missing from the image (CRIU dumps what is left
    # of the tree, or fails on a vanished root): refuse, and give the rest its GPU back.
    proctree.require_alive(
        t.pids, "after the CUDA checkpoint, before the CRIU dump" if t.cuda else "before the CRIU dump"
    )
    with tl.phase("criu_dump"):
        criu.dump(
            found,
            t.root,
            staging / "criu",
            staging / "logs" / "criu-dump.log",
            leave_running=leave_running,
            shell_job=t.shell_job,
        )
    if leave_running and gpu_undo is not None:
        with tl.phase("cuda_resume"):
            cuda_checkpoint.resume(t.cuda)
    if not leave_running:
        proctree.wait_gone(t.pids, 30.0, reaped=True)
    if gpu_undo is not None:
        gpu_undo.cancel()  # resumed, or the dumped tree is gone and its state lives in the image


def proctree_ancestors() -> set[int]:
    """Our own ancestors: dumping one of them would freeze the command doing the dump."""
    out: set[int] = set()
    p: psutil.Process | None = psutil.Process()
    while p is not None:
        p = p.parent()
        if p is not None:
            out.add(p.pid)
    return out
