"""The Python API: the CLI is a thin layer over these functions.

import fastvllm
snap = fastvllm.snapshot("tiny", out="/srv/snaps/tiny")
srv = fastvllm.restore("/srv/snaps/tiny")
print(srv.time_to_first_completion_s, srv.server.base_url)
fastvllm.stop(srv.server.pid)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from fastvllm.restore.pipeline import RestoreOptions, RestoreResult, restore_snapshot
from fastvllm.restore.process import ProcessRestoreResult, restore_process_snapshot
from fastvllm.runtime import (
    atomic,
    criu,
    cuda_checkpoint,
    instances,
    journal,
    manifest,
    mapped,
    shm,
    vllm_server,
)
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.timeline import Timeline
from fastvllm.scheduler.controller import Controller
from fastvllm.snapshot.pipeline import SnapshotOptions, SnapshotResult, take_snapshot
from fastvllm.snapshot.process import ProcessSnapshotResult, take_process_snapshot


def snapshot(
    model: str | None = None,
    out: str | Path = "",
    *,
    pid: int | None = None,
    port: int | None = None,
    host: str | None = None,
    vllm_args: Sequence[str] = (),
    leave_running: bool = False,
    sleep: bool = True,
    sleep_level: int = 2,
    health_timeout: float = 900.0,
    timeline: Timeline | None = None,
    on_bytes: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
) -> SnapshotResult:
    """Launch vLLM on `model` ('tiny' for the built-in one), or take the running server `pid`,
    and write a CRIU snapshot of it to `out`. With `sleep` (the default) the weights and the KV
    cache are released before the dump and reloaded on restore, so the image holds only the
    process skeleton. On a GPU, `sleep_level` is vLLM's: 2 (default) discards weights and KV
    cache, 1 offloads the weights into host memory (and so into the image), 0 keeps both.
    `env` adds environment variables for the launched server (recorded in the manifest).
    `port`/`host` (default 8000 on 127.0.0.1) may also come as vLLM's own --port/--host in
    `vllm_args`; both, disagreeing, is a UsageError."""
    if pid is not None and model is None and (port is not None or host is not None or vllm_args):
        raise UsageError(
            "--port, --host and vLLM arguments do not apply with --pid: the running server keeps "
            "the address and arguments it has",
            hint="drop them (fastvllm ps shows its address)",
        )
    port, host, vllm_args = vllm_server.resolve_address(port, host, vllm_args)
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
        sleep_level=sleep_level,
        env=dict(env or {}),
    )
    return take_snapshot(opts, timeline, on_bytes)


def snapshot_process(
    pid: int,
    out: str | Path,
    *,
    leave_running: bool = False,
    lock_timeout_s: float = cuda_checkpoint.DEFAULT_LOCK_TIMEOUT_S,
    timeline: Timeline | None = None,
) -> ProcessSnapshotResult:
    """Snapshot any process tree rooted at `pid` (GPU or not), with no vLLM steps: GPU
    processes are checkpointed through the CUDA driver first. `fastvllm.restore` brings it back."""
    return take_process_snapshot(
        pid, Path(out), leave_running=leave_running, lock_timeout_s=lock_timeout_s, timeline=timeline
    )


def is_fastvllm_server(pid: int) -> bool:
    """Was `pid` launched or restored by fastvllm as a vLLM server (vLLM snapshot path)?"""
    try:
        instances.get(pid)
    except UsageError:
        return False
    return True


def restore(
    path: str | Path,
    *,
    verify: bool = True,
    health_timeout: float = 120.0,
    prefetch: bool = True,
    prefetch_threads: int = 0,
    timeline: Timeline | None = None,
    on_bytes: Callable[[int], None] | None = None,
    criu_restore: str = "auto",
    reverify: bool = False,
    keep_affinity: bool = False,
) -> RestoreResult | ProcessRestoreResult:
    """Restore the snapshot at `path`; returns once its canary matched and it is serving. A
    plain process snapshot (`snapshot_process`) is restored without vLLM steps and gives a
    ProcessRestoreResult.
    `prefetch` reads the snapshot's files ahead while CRIU restores (checksums checked on the
    way); False checks every checksum first, then restores. `on_bytes` is called with byte
    counts as files are read ahead or verified (for progress bars). `criu_restore` picks how CRIU
    fills memory: "mmap" (the page images mapped copy-on-write: the snapshot must then stay in
    place while the server runs), "copy", "lazy" (CRIU's userfaultfd restore), or "auto".
    A file this host already checked and that is unchanged since is not hashed again, unless
    `reverify`. `keep_affinity` binds the threads to the cores they had at snapshot time."""
    where = Path(path).expanduser()
    # Only a readable manifest decides the kind; anything else goes down the vLLM path, whose
    # checks (privileges first) produce the right error.
    if (where / manifest.MANIFEST).is_file() and manifest.kind(where) == "process":
        return restore_process_snapshot(
            Path(path), verify=verify, timeline=timeline, criu_restore=criu_restore, reverify=reverify
        )
    opts = RestoreOptions(
        Path(path),
        verify,
        health_timeout,
        prefetch,
        prefetch_threads,
        criu_restore=criu_restore,
        reverify=reverify,
        keep_affinity=keep_affinity,
    )
    return restore_snapshot(opts, timeline, on_bytes)


def remove(path: str | Path) -> None:
    """Delete the snapshot at `path`, unless a running process maps its page images (restored
    in mmap mode: its memory is those files until it exits or is snapshotted again; unlinked,
    they would live on invisibly, holding their disk space)."""
    where = Path(path).expanduser()
    if atomic.is_partial(where) and where.is_dir():  # a staging directory, `.NAME.partial-*`
        if not journal.partial_is_stale(where):
            raise UsageError(
                f"{where} is a snapshot being written right now",
                hint="wait for it to finish or stop the 'fastvllm snapshot' writing it",
            )
        shutil.rmtree(where)
        return
    manifest.kind(where)  # not a snapshot: NotASnapshotError, nothing removed
    users = mapped.snapshot_mappers(where)
    if users:
        pids = ", ".join(str(u.pid) for u in users)
        raise UsageError(
            f"snapshot {where} is in use: PIDs {pids} map its page images (restored with "
            "--criu-restore mmap; deleted, they would hold its disk space until they exit)",
            hint=f"stop them first: fastvllm stop {users[0].pid}; then remove it",
        )
    shutil.rmtree(where)


def stop(pid: int, grace: float = 10.0) -> None:
    """Stop a server fastvllm launched or restored (its whole session), and remove the
    /dev/shm files it leaves behind when it does not exit cleanly."""
    instances.stop(pid, grace)


def find_server(pid: int) -> instances.Instance:
    """The server fastvllm knows that `pid` belongs to: its root PID, or any PID of its tree
    (a tree whose root was killed keeps its session: it is found, and can be stopped)."""
    try:
        return instances.get(pid, root_dead_ok=True)
    except UsageError:
        inst = instances.owner_of(pid)
        if inst is None:
            raise
        return inst


def gc(paths: Sequence[str | Path] = ()) -> list[str]:
    """Clean up what interrupted operations left (runtime.journal): stop orphan server trees,
    remove staging directories (also those found in or named by `paths`, e.g. after a reboot)
    and the /dev/shm files no process holds. Returns one line per thing cleaned."""
    quiet: Callable[[str], None] = lambda _line: None  # noqa: E731
    lines = journal.recover(say=quiet)
    lines += journal.clean_partials([Path(p) for p in paths], say=quiet)
    claimed = journal.claimed_files()
    left = shm.orphans(claimed)
    if left:
        shm.remove(left)
        names = ", ".join(p.name for p in left[:4]) + (", ..." if len(left) > 4 else "")
        lines.append(f"removed {len(left)} /dev/shm files no process holds ({names})")
    for work in criu.stale_scratch(claimed):
        criu.remove_scratch(work)
        lines.append(f"removed {work}, a CRIU work directory no CRIU uses")
    return lines


def servers(probe: bool = True) -> list[tuple[instances.Instance, instances.Health]]:
    """Every server fastvllm knows that still has a process, with its health: serving, not
    answering, or its root dead (the rest of its tree runs on: 'fastvllm stop' stops it)."""
    return instances.known(probe)


def dump_weights(source: str | Path, out: str | Path, *, share: bool = False) -> dict[str, object]:
    """Write a flat weight file from a running server (`source` is its root PID: the weights as
    vLLM post-processed them) or from a safetensors checkpoint (a directory or file)."""
    from fastvllm.weights import convert, fileformat, store

    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists", hint="pick a new path or remove the old file")
    if str(source).isdigit():
        inst = instances.get(int(source))
        if not inst.worker_extension:
            raise UsageError(
                f"server {source} was started without fastvllm's worker extension",
                hint="launch it through 'fastvllm snapshot --leave-running' (sleep on, the default)",
            )
        server = vllm_server.Server(
            inst.pid, inst.host, inst.port, Path(inst.log_path), token=inst.control_token
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        vllm_server.rpc(server, "fastvllm_dump_weights", path=str(out.resolve()))
        idx = fileformat.read_index(out)
    else:
        idx = convert.from_safetensors(Path(source), out)
    doc: dict[str, object] = {
        "path": str(out),
        "tensors": len(idx.tensors),
        "bytes": idx.file_size,
        "key": idx.data_xxh3_128,
    }
    if share:
        shared = store.share(out)
        doc.update(store_path=str(shared.store_path or ""), deduplicated=shared.deduplicated)
        if shared.reason:
            doc["not_shared"] = shared.reason
    return doc


def load_weights(
    path: str | Path,
    device: str = "cpu",
    *,
    threads: int | None = None,
    chunk: int | None = None,
    buffers: int | None = None,
    direct: bool | None = None,
    verify: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    mode: str = "auto",
) -> tuple[dict[str, object], object]:
    """Load a flat weight file into fresh tensors on `device` ('cpu' or 'cuda'); returns
    (name -> tensor, LoadStats). None for a tunable means the measured default. `mode` "map"
    (the CPU default) hands out copy-on-write views of the file, "copy" private memory."""
    from fastvllm.weights import loader

    kw: dict[str, object] = {"direct": direct, "verify": verify, "on_bytes": on_bytes, "mode": mode}
    kw.update({k: v for k, v in (("threads", threads), ("chunk", chunk), ("buffers", buffers)) if v})
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("no CUDA device is visible", hint="use --device cpu, or run on a GPU host")
    return loader.load(Path(path), device, **kw)  # type: ignore[arg-type]


def running() -> list[instances.Instance]:
    return instances.running()


def cluster(snapshots: str | Path, *, slots: int | None = None, name: str = "local") -> Controller:
    """The embedded (single-host, no Ray) runtime over a snapshot directory: `.place(model)`
    (a Decision), `.start(model)` (restores where it is fastest), `.instances()`, `.stop_all()`.
    A router in front: `fastvllm.scheduler.router.Served(Router(c), host, port)`. A fleet runs
    the same controller on Ray (`fastvllm.scheduler.ray_runtime.start`)."""
    from fastvllm.scheduler.agent import NodeAgent
    from fastvllm.scheduler.controller import LocalClient

    where = Path(snapshots).expanduser()
    if not where.is_dir():
        raise UsageError(f"{where} is not a directory", hint="pass the folder that holds your snapshots")
    return Controller({name: LocalClient(NodeAgent(name, where, slots))})
