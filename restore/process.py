"""Restore a plain process snapshot (`snapshot.process`): CRIU restore, then the CUDA driver
gives each GPU process its device state back and unlocks it. No health check or canary:
fastvllm does not know what the tree serves. Any failure kills what was restored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from fastvllm.runtime import (
    criu,
    cuda_checkpoint,
    journal,
    manifest,
    proctree,
    restore_lock,
    system,
    verified,
)
from fastvllm.runtime.errors import IdentityMismatchError
from fastvllm.runtime.modes import CriuRestoreMode, SnapshotKind
from fastvllm.runtime.timeline import Timeline


@dataclass
class ProcessRestoreResult:
    snapshot: Path
    pid: int
    manifest: manifest.ProcessManifest
    timeline: Timeline
    criu_restore: CriuRestoreMode = CriuRestoreMode.COPY

    def as_dict(self) -> dict[str, object]:
        return {
            "snapshot": str(self.snapshot),
            "kind": SnapshotKind.PROCESS,
            "pid": self.pid,
            "cuda_pids": self.manifest.cuda_pids,
            "phases": self.timeline.as_list(),
            "restore_s": round(self.timeline.elapsed(), 4),
            "criu_restore": self.criu_restore,
        }


def _check_host(m: manifest.ProcessManifest, found: criu.Criu) -> None:
    here = manifest.HostIdentity.here(found.version)
    diffs = [d for d in m.identity.differences(here) if d.startswith(("criu", "kernel"))]
    if m.gpu is not None:
        gpu_here = cuda_checkpoint.gpu_identity()
        if gpu_here is None:
            diffs.append(f"GPU: snapshot on a {m.gpu['model']}, none here")
        else:
            diffs += cuda_checkpoint.GpuIdentity(**m.gpu).differences(gpu_here)
    if diffs:
        raise IdentityMismatchError(
            "snapshot was taken on a different host setup: " + "; ".join(diffs),
            hint="restore on a host with the same CRIU, kernel, GPU model and driver",
        )
    criu.check_ids_free([f.path for f in m.files], m.tree_pids)


def restore_process_snapshot(
    path: Path,
    *,
    verify: bool = True,
    timeline: Timeline | None = None,
    criu_restore: CriuRestoreMode | str = CriuRestoreMode.AUTO,
    reverify: bool = False,
) -> ProcessRestoreResult:
    """`criu_restore`: see criu.resolve_mode; in mmap mode the tree keeps the snapshot's page
    images mapped while it runs. As for a vLLM snapshot (`runtime.verified`), a file this host
    already hashed and that is unchanged since is not hashed again, unless `reverify`."""
    with restore_lock.restoring(path.expanduser()):  # a second restore of it fails at once
        return _restore_process_snapshot(path, verify, timeline, criu_restore, reverify)


def _restore_process_snapshot(
    path: Path, verify: bool, timeline: Timeline | None, criu_restore: CriuRestoreMode | str, reverify: bool
) -> ProcessRestoreResult:
    tl = timeline or Timeline()
    path = path.expanduser().absolute()
    journal.recover()  # what an interrupted snapshot or restore left
    system.require_criu_privileges()
    proctree.adopt_orphans()
    with tl.phase("validate"):
        m = manifest.load_process(path)
        found = criu.find_criu()
        mode = criu.resolve_mode(found, criu_restore)
        _check_host(m, found)
        proctree.wait_gone(m.tree_pids, 30.0, reaped=True)
    trusted = verified.unchanged(path, m.files) if verify and not reverify else set()
    if verify and (unchecked := [f for f in m.files if f.path not in trusted]):
        with tl.phase("verify_checksums"):
            manifest.verify_files(path, unchecked)
        verified.record(path, unchecked)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)  # private, as the rest of the snapshot
    pid: int | None = None
    try:
        with tl.phase("criu_restore"):
            pid = criu.restore(
                found,
                path / "criu",
                logs / f"criu-restore-{stamp}-{os.getpid()}.log",
                {},
                shell_job=m.shell_job,
                mode=mode,
            )
        if m.cuda_pids:
            with tl.phase("cuda_restore"):
                cuda_checkpoint.resume(m.cuda_pids)
    except BaseException:
        for p in m.tree_pids:  # CRIU gave them their old PIDs; none may outlive a failed restore
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        proctree.wait_gone(m.tree_pids, 30.0, reaped=True)
        raise
    return ProcessRestoreResult(path, pid, m, tl, mode)
