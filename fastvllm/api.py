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
from typing import TYPE_CHECKING, Any

from fastvllm.runtime import atomic, instances, journal, shm
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.modes import CriuRestoreMode, LoadMode, SnapshotKind
from fastvllm.runtime.timeline import Timeline

# The pipelines, the scheduler, the weights package and the runtime modules only some
# functions need are imported by those functions: `fastvllm ps` or `stop` (and a restore,
# which needs no snapshot pipeline) must not pay for the others' imports.
if TYPE_CHECKING:
    from fastvllm.restore.pipeline import RestoreResult
    from fastvllm.restore.process import ProcessRestoreResult
    from fastvllm.scheduler.controller import Controller
    from fastvllm.snapshot.pipeline import SnapshotResult
    from fastvllm.snapshot.process import ProcessSnapshotResult
    from fastvllm.weights.loader import LoadStats


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
    learn: bool = True,
) -> SnapshotResult:
    """Launch vLLM on `model` ('tiny' for the built-in one), or take the running server `pid`,
    and write a CRIU snapshot of it to `out`. With `sleep` (the default) the weights and the KV
    cache are released before the dump and reloaded on restore, so the image holds only the
    process skeleton. On a GPU, `sleep_level` is vLLM's: 2 (default) discards weights and KV
    cache, 1 offloads the weights into host memory (and so into the image), 0 keeps both.
    `env` adds environment variables for the launched server (recorded in the manifest).
    `port`/`host` (default 8000 on 127.0.0.1) may also come as vLLM's own --port/--host in
    `vllm_args`; both, disagreeing, is a UsageError. With `learn` (the default; not with
    `leave_running`) a trial restore of the written snapshot learns its hot set, so the first
    restore on this host reads ahead what its tree needs, and proves that the snapshot restores."""
    if pid is not None and model is None and (port is not None or host is not None or vllm_args):
        raise UsageError(
            "--port, --host and vLLM arguments do not apply with --pid: the running server keeps "
            "the address and arguments it has",
            hint="drop them (fastvllm ps shows its address)",
        )
    from fastvllm.runtime import vllm_server
    from fastvllm.snapshot.pipeline import SnapshotOptions, take_snapshot

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
        learn=learn,
    )
    return take_snapshot(opts, timeline, on_bytes)


def snapshot_process(
    pid: int,
    out: str | Path,
    *,
    leave_running: bool = False,
    lock_timeout_s: float | None = None,
    timeline: Timeline | None = None,
) -> ProcessSnapshotResult:
    """Snapshot any process tree rooted at `pid` (GPU or not), with no vLLM steps: GPU
    processes are checkpointed through the CUDA driver first. `fastvllm.restore` brings it back.
    `lock_timeout_s`: seconds to wait for the CUDA lock (None: cuda_checkpoint's default)."""
    from fastvllm.runtime import cuda_checkpoint
    from fastvllm.snapshot.process import take_process_snapshot

    if lock_timeout_s is None:
        lock_timeout_s = cuda_checkpoint.DEFAULT_LOCK_TIMEOUT_S
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
    criu_restore: CriuRestoreMode | str = CriuRestoreMode.AUTO,
    reverify: bool = False,
    keep_affinity: bool = False,
    gpus: str | None = None,
) -> RestoreResult:
    """Restore the vLLM snapshot at `path`; returns once its canary matched and it is serving.
    A plain process snapshot (`snapshot_process`) is `restore_process`'s: `snapshot_kind` tells
    them apart.
    `prefetch` reads the snapshot's files ahead while CRIU restores (checksums checked on the
    way); False checks every checksum first, then restores. `on_bytes` is called with byte
    counts as files are read ahead or verified (for progress bars). `criu_restore` picks how CRIU
    fills memory (runtime.modes.CriuRestoreMode, or its value): "mmap" (the page images mapped
    copy-on-write: the snapshot must then stay in place while the server runs), "copy", "lazy"
    (CRIU's userfaultfd restore), or "auto".
    A file this host already checked and that is unchanged since is not hashed again, unless
    `reverify`. `keep_affinity` binds the threads to the cores they had at snapshot time.
    `gpus` (a GPU snapshot): this host's GPUs to restore onto, by index or UUID, comma-separated,
    one per GPU the snapshot used (runtime.devices.gpu_pairs)."""
    if snapshot_kind(path) is SnapshotKind.PROCESS:
        raise UsageError(
            f"{path} is a plain process snapshot, not a vLLM one",
            hint="restore it with fastvllm.restore_process ('fastvllm restore' picks the right one)",
        )
    from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot

    opts = RestoreOptions(
        Path(path),
        verify,
        health_timeout,
        prefetch,
        prefetch_threads,
        criu_restore=criu_restore,
        reverify=reverify,
        keep_affinity=keep_affinity,
        gpus=gpus,
    )
    return restore_snapshot(opts, timeline, on_bytes)


def restore_process(
    path: str | Path,
    *,
    verify: bool = True,
    timeline: Timeline | None = None,
    criu_restore: CriuRestoreMode | str = CriuRestoreMode.AUTO,
    reverify: bool = False,
) -> ProcessRestoreResult:
    """Restore a plain process snapshot (`snapshot_process`) without vLLM steps: CRIU, then the
    CUDA driver gives each GPU process its device state back. The options are `restore`'s."""
    from fastvllm.restore.process import restore_process_snapshot

    return restore_process_snapshot(
        Path(path), verify=verify, timeline=timeline, criu_restore=criu_restore, reverify=reverify
    )


def snapshot_kind(path: str | Path) -> SnapshotKind:
    """What the snapshot at `path` holds: VLLM (`restore` it) or PROCESS (`restore_process` it).
    Only a readable manifest decides; anything else counts as VLLM, and `restore`'s checks
    (privileges first) then say what is wrong with it."""
    from fastvllm.runtime import manifest

    where = Path(path).expanduser()
    if not (where / manifest.MANIFEST).is_file():
        return SnapshotKind.VLLM
    return manifest.kind(where)


def remove(path: str | Path) -> None:
    """Delete the snapshot at `path`, unless a running process maps its page images (restored
    in mmap mode: its memory is those files until it exits or is snapshotted again; unlinked,
    they would live on invisibly, holding their disk space)."""
    from fastvllm.runtime import manifest, mapped

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
    from fastvllm.runtime import criu

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


def dump_weights(source: str | Path, out: str | Path, *, share: bool = False) -> dict[str, Any]:
    """Write a flat weight file from a running server (`source` is its root PID: the weights as
    vLLM post-processed them) or from a safetensors checkpoint (a directory or file)."""
    from fastvllm.runtime import vllm_server, worker_rpc
    from fastvllm.weights import convert, fileformat, store

    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists", hint="pick a new path or remove the old file")
    if str(source).isdigit():
        inst = instances.get(int(str(source)))
        if not inst.worker_extension:
            raise UsageError(
                f"server {source} was started without fastvllm's worker extension",
                hint="launch it through 'fastvllm snapshot --leave-running' (sleep on, the default)",
            )
        server = vllm_server.Server(
            inst.pid, inst.host, inst.port, Path(inst.log_path), token=inst.control_token
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        worker_rpc.dump_weights(server, out.resolve())
        idx = fileformat.read_index(out)
    else:
        idx = convert.from_safetensors(Path(source), out)
    doc: dict[str, Any] = {
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
    mode: LoadMode | str = LoadMode.AUTO,
) -> tuple[dict[str, Any], LoadStats]:
    """Load a flat weight file into fresh tensors on `device` ('cpu' or 'cuda'); returns
    (name -> tensor, LoadStats). None for a tunable means the measured default. `mode` "map"
    (the CPU default) hands out copy-on-write views of the file, "copy" private memory."""
    from fastvllm.weights import loader

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("no CUDA device is visible", hint="use --device cpu, or run on a GPU host")
    return loader.load(
        Path(path),
        device,
        threads=threads or loader.DEFAULT_THREADS,
        chunk=chunk or loader.DEFAULT_CHUNK,
        buffers=buffers or None,
        direct=direct,
        verify=verify,
        on_bytes=on_bytes,
        mode=mode,
    )


def running() -> list[instances.Instance]:
    return instances.running()


def cluster(snapshots: str | Path, *, slots: int | None = None, name: str = "local") -> Controller:
    """The embedded (single-host, no Ray) runtime over a snapshot directory: `.place(model)`
    (a Decision), `.start(model)` (restores where it is fastest), `.instances()`, `.stop_all()`.
    A router in front: `fastvllm.scheduler.router.Served(Router(c), host, port)`. A fleet runs
    the same controller on Ray (`fastvllm.scheduler.ray_runtime.start`)."""
    from fastvllm.scheduler.agent import NodeAgent
    from fastvllm.scheduler.controller import Controller, LocalClient

    where = Path(snapshots).expanduser()
    if not where.is_dir():
        raise UsageError(f"{where} is not a directory", hint="pass the folder that holds your snapshots")
    return Controller({name: LocalClient(NodeAgent(name, where, slots))})
