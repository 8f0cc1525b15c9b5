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
from fastvllm.runtime import atomic, criu, cuda_checkpoint, manifest, proctree, system, verified
from fastvllm.runtime.errors import FastVLLMError, SnapshotExistsError, UsageError
from fastvllm.runtime.timeline import Timeline
from fastvllm.snapshot.pipeline import keep_logs


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
    checkpoint and the CRIU dump: the failure-injection tests kill a process there."""
    tl = timeline or Timeline()
    out = out.expanduser().absolute()
    system.require_criu_privileges()
    found = criu.find_criu()
    if out.exists():
        raise SnapshotExistsError(f"output directory {out} already exists", hint="choose another --out")
    if pid == os.getpid() or pid in proctree_ancestors():
        raise UsageError(f"PID {pid} is fastvllm itself or its parent", hint="name the tree to snapshot")
    tree = tree_of(pid)
    cuda = cuda_checkpoint.gpu_pids(tree)
    gpu = cuda_checkpoint.gpu_identity() if cuda else None
    cmdline = psutil.Process(pid).cmdline()
    shell_job = os.getsid(pid) != pid
    staging = atomic.staging_dir(out)
    suspended = False
    try:
        if cuda:
            with tl.phase("cuda_checkpoint"):
                cuda_checkpoint.suspend(cuda, lock_timeout_s)
                suspended = True
        if after_checkpoint is not None:
            after_checkpoint()
        # A process that died here would be missing from the image (CRIU dumps what is left
        # of the tree, or fails on a vanished root): refuse, and give the rest its GPU back.
        proctree.require_alive(
            tree, "after the CUDA checkpoint, before the CRIU dump" if cuda else "before the CRIU dump"
        )
        with tl.phase("criu_dump"):
            criu.dump(
                found,
                pid,
                staging / "criu",
                staging / "logs" / "criu-dump.log",
                leave_running=leave_running,
                shell_job=shell_job,
            )
        if leave_running and suspended:
            with tl.phase("cuda_resume"):
                cuda_checkpoint.resume(cuda)
            suspended = False
        if not leave_running:
            proctree.wait_gone(tree, 30.0, reaped=True)
            suspended = False  # the dumped tree is gone; its state lives in the image
        with tl.phase("checksums"):
            files = manifest.collect_files(staging)
            verified.record(staging, files)  # hashed just now: a restore here need not again
        m = manifest.ProcessManifest(
            identity=manifest.HostIdentity.here(found.version),
            root_pid=pid,
            tree_pids=tree,
            cmdline=cmdline,
            cuda_pids=cuda,
            shell_job=shell_job,
            gpu=gpu.as_dict() if gpu else None,
            files=files,
            image_bytes=criu.image_bytes(staging / "criu"),
        )
        with tl.phase("publish"):
            m.timings = tl.durations()
            m.write(staging)
            atomic.publish(staging, out)
    except BaseException as e:
        if suspended:
            cuda_checkpoint.give_back(cuda)  # what is left of the tree keeps serving, GPU state and all
        kept = keep_logs(staging, out)
        atomic.discard(staging)
        if kept is not None and isinstance(e, FastVLLMError):
            e.hint = f"{e.hint}; logs kept in {kept}" if e.hint else f"logs kept in {kept}"
        raise
    return ProcessSnapshotResult(out, m, tl)


def proctree_ancestors() -> set[int]:
    """Our own ancestors: dumping one of them would freeze the command doing the dump."""
    out: set[int] = set()
    p: psutil.Process | None = psutil.Process()
    while p is not None:
        p = p.parent()
        if p is not None:
            out.add(p.pid)
    return out
