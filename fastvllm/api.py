"""The Python API: the CLI is a thin layer over these functions.

import fastvllm
snap = fastvllm.snapshot("tiny", out="/srv/snaps/tiny")
srv = fastvllm.restore("/srv/snaps/tiny")
print(srv.time_to_first_completion_s, srv.server.base_url)
fastvllm.stop(srv.server.pid)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fastvllm.restore.pipeline import RestoreOptions, RestoreResult, restore_snapshot
from fastvllm.runtime import instances, vllm_server
from fastvllm.runtime.timeline import Timeline
from fastvllm.snapshot.pipeline import SnapshotOptions, SnapshotResult, take_snapshot


def snapshot(
    model: str | None = None,
    out: str | Path = "",
    *,
    pid: int | None = None,
    port: int = vllm_server.DEFAULT_PORT,
    host: str = vllm_server.DEFAULT_HOST,
    vllm_args: Sequence[str] = (),
    leave_running: bool = False,
    sleep: bool = True,
    health_timeout: float = 900.0,
    timeline: Timeline | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> SnapshotResult:
    """Launch vLLM on `model` ('tiny' for the built-in one), or take the running server `pid`,
    and write a CRIU snapshot of it to `out`. With `sleep` (the default) the weights and the KV
    cache are released before the dump and reloaded on restore, so the image holds only the
    process skeleton."""
    opts = SnapshotOptions(
        out=Path(out),
        model=model,
        pid=pid,
        port=port,
        host=host,
        vllm_args=list(vllm_args),
        leave_running=leave_running,
        health_timeout=health_timeout,
        sleep=sleep,
    )
    return take_snapshot(opts, timeline, on_bytes)


def restore(
    path: str | Path,
    *,
    verify: bool = True,
    health_timeout: float = 120.0,
    timeline: Timeline | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Restore the snapshot at `path`; returns once its canary matched and it is serving.
    `on_bytes` is called with byte counts as checksums are verified (for progress bars)."""
    return restore_snapshot(RestoreOptions(Path(path), verify, health_timeout), timeline, on_bytes)


def stop(pid: int, grace: float = 10.0) -> None:
    """Stop a server fastvllm launched or restored (its whole session), and remove the
    /dev/shm files it leaves behind when it does not exit cleanly."""
    instances.stop(pid, grace)


def running() -> list[instances.Instance]:
    return instances.running()
