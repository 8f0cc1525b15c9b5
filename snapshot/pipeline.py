"""The snapshot pipeline: launch vLLM, wait until healthy, warm up, record the canary,
CRIU-dump the tree, hash every file, publish atomically.

All-or-nothing: any failure or Ctrl-C stops the tree we launched and removes the staging
directory, so no partial snapshot and no stray vLLM process is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.runtime import (
    affinity,
    atomic,
    config,
    credentials,
    criu,
    cuda_checkpoint,
    devices,
    discard,
    faults,
    instances,
    journal,
    manifest,
    proctree,
    ranks,
    shm,
    signals,
    system,
    tiny_model,
    verified,
    vllm_server,
    worker_rpc,
)
from fastvllm.runtime.errors import (
    FastVLLMError,
    ServerError,
    SnapshotExistsError,
    TreeChangedError,
    UsageError,
)
from fastvllm.runtime.timeline import Timeline
from fastvllm.snapshot import learn
from fastvllm.weights import store

LOG_NAME = "server.log"
REAP_TIMEOUT_S = 60.0  # stop_tree SIGKILLs what outlives its grace: the exit comes well before
WEIGHTS_FILE = "weights/model.fvw"


@dataclass
class SnapshotOptions:
    out: Path
    model: str | None = None  # a model directory ('tiny': the built-in one), to launch a fresh server
    pid: int | None = None  # or the root PID of a running server fastvllm launched/restored
    port: int = vllm_server.DEFAULT_PORT
    host: str = vllm_server.DEFAULT_HOST
    vllm_args: list[str] = field(default_factory=list)
    leave_running: bool = False
    # After publishing: a trial restore from evicted page images learns the hot set (snapshot.learn)
    # and proves the snapshot restores. Not with leave_running (the original holds its PIDs, port).
    learn: bool = True
    health_timeout: float = 900.0
    sleep: bool = True  # release weights + KV cache before the dump
    # GPU: vLLM's sleep level before the CUDA checkpoint. 2 discards weights and KV cache (the
    # restore reloads the weights with fastvllm's loader); 1 offloads the weights to host memory
    # (they land in the CRIU image); 0 keeps everything on the GPU (all of it in the image).
    sleep_level: int = 2
    lock_timeout_s: float = cuda_checkpoint.DEFAULT_LOCK_TIMEOUT_S
    env: dict[str, str] = field(
        default_factory=dict
    )  # for the launched server (e.g. VLLM_CPU_OMP_THREADS_BIND)


@dataclass
class SnapshotResult:
    path: Path
    manifest: manifest.Manifest
    timeline: Timeline
    cold_start_s: float | None  # launch to first completion, when we launched the server
    server: vllm_server.Server | None  # still serving when leave_running
    trial: dict[str, Any] | None = None  # what the trial restore saw (snapshot.learn)

    def as_dict(self) -> dict[str, object]:
        return {
            "snapshot": str(self.path),
            "image_bytes": self.manifest.image_bytes,
            "cold_start_to_first_completion_s": self.cold_start_s,
            "phases": self.timeline.as_list(),
            "total_s": round(self.timeline.elapsed(), 4),
            "canary_tokens": len(self.manifest.canary.token_ids),
            "server_pid": self.server.pid if self.server else None,
            "url": self.server.base_url if self.server else None,
            "listen": self.server.listen_url if self.server else None,
            "trial_restore": self.trial,
        }


def _preflight(opts: SnapshotOptions) -> criu.Criu:
    """Every check that needs no side effect, before anything is started or written."""
    if (opts.model is None) == (opts.pid is None):
        raise UsageError("give either a MODEL to launch or --pid of a running server", hint="see --help")
    system.require_criu_privileges()
    found = criu.find_criu()
    if opts.out.exists():
        raise SnapshotExistsError(
            f"output directory {opts.out} already exists",
            hint="choose another --out or delete the old snapshot",
        )
    if opts.sleep_level not in (0, 1, 2):
        raise UsageError(f"--sleep-level {opts.sleep_level} is not 0, 1 or 2", hint="use 2 (the default)")
    config.GPU_GRAPH_MEMORY.get()  # the server's worker reads it at launch: a bad value fails here
    if opts.model is not None:
        opts.model = tiny_model.resolve_model(opts.model)
        vllm_server.validate_model_dir(opts.model)
        vllm_server.ensure_port_free(opts.host, opts.port)
        if not vllm_server.cuda_present():  # a parallel server whose cores or memory do not suffice
            import psutil

            env = {**os.environ, **opts.env}
            vllm_server.cpu_parallel_bind(opts.vllm_args, env)
            free_gib = psutil.virtual_memory().available / 2**30
            vllm_server.check_cpu_parallel_memory(opts.vllm_args, env, free_gib)
    return found


def keep_logs(staging: Path, out: Path) -> Path | None:
    """A failed snapshot leaves nothing at `out`, but its logs are what explains the failure."""
    logs = staging / "logs"
    if not logs.is_dir() or not any(logs.iterdir()):
        return None
    dest = Path(tempfile.gettempdir()) / "fastvllm-failed" / f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.move(str(logs), dest)
    return dest


def take_snapshot(
    opts: SnapshotOptions,
    timeline: Timeline | None = None,
    on_hash_bytes: Callable[[int], None] | None = None,
) -> SnapshotResult:
    """Launch the server (or take the running one), warm it up, record its canary, release
    its weights and KV cache, CRIU-dump it, hash and publish. Each step registers its undo on
    the operation's stack (runtime.journal.Operation): a failure, Ctrl-C, SIGTERM or SIGHUP
    unwinds it here, and if this process is killed the journal lets the next command do it."""
    tl = timeline or Timeline()
    opts.out = opts.out.expanduser().absolute()
    proctree.adopt_orphans()
    journal.recover()
    found = _preflight(opts)
    journal.clean_partials(atomic.partials_of(opts.out))  # a dead snapshot's, into the same --out
    on_gpu = vllm_server.cuda_present()
    with journal.Operation("snapshot", opts.out) as op:
        staging = stage(op, opts.out)
        s = _launch(op, opts, staging, tl, on_gpu) if opts.model is not None else _attach(opts)
        canary, model_id = _warm_up(s, tl)
        rel = _release(op, opts, s, staging, tl, on_gpu)
        dumped = _dump(op, opts, found, s, rel, staging, tl, on_gpu)
        m = _manifest(found, s, rel, dumped, canary, model_id, staging, tl, on_hash_bytes)
        _publish(m, s, staging, opts.out, tl)
        trial = learn.trial_restore(op, opts.out, m, tl) if opts.learn and not opts.leave_running else None
        op.commit()
    if opts.leave_running and s.launched:
        _record(s, opts.out)
    return SnapshotResult(opts.out, m, tl, s.cold_start_s, s.server if opts.leave_running else None, trial)


@dataclass
class _Served:
    """The server being snapshotted: how it runs, and what the manifest records of it."""

    server: vllm_server.Server
    spec: vllm_server.LaunchSpec
    model_dir: Path
    name: str
    env: dict[str, str]
    source_snapshot: str | None = None
    cold_start_s: float | None = None  # launch to first completion, when launched here
    stop: journal.Undo | None = None  # stops the tree launched here (None: --pid, it runs on)

    @property
    def launched(self) -> bool:
        return self.stop is not None


@dataclass
class _Released:
    """What the server gave up before the dump, and how a --pid server gets it back."""

    sleeping: bool
    gpu_level: int
    weights: Path
    released: dict[str, int] = field(default_factory=dict)
    gpu_state: dict[str, object] = field(default_factory=dict)  # what the CUDA checkpoint moves
    shared: store.Shared | None = None  # rank 0's weight file in the store
    # Every rank's weight file, rank order (relative to the snapshot), and the parallel layout
    # the workers reported (rank, world_size, tensor_parallel_size of rank 0).
    weight_files: list[str] = field(default_factory=list)
    parallel: dict[str, int] = field(default_factory=dict)
    worker_pids: list[int] = field(default_factory=list)  # each rank's process, rank order
    intact: bool = True  # the server still holds its weights
    kept: journal.Undo | None = None  # a --pid server's way back to serving after a failure

    def set_intact(self, intact: bool) -> None:
        self.intact = intact
        if self.kept is not None:
            self.kept.update(intact=intact)


@dataclass
class _Dumped:
    """The tree as CRIU dumps it, and what the manifest records of it."""

    log_at_dump: str
    tree: list[int]
    shm_files: list[Path]  # what the snapshot keeps a copy of
    shm_names: list[Path]  # what to remove once the tree is gone
    hook: Path
    cuda_pids: list[int]
    masks: dict[str, list[int]]
    secret_env: list[str]
    gpu: cuda_checkpoint.GpuIdentity | None


def stage(op: journal.Operation, out: Path, *, keep_hint: bool = False) -> Path:
    """The hidden staging directory a snapshot is written to. Undo: its logs are moved aside
    (they explain the failure, named in the error's hint, after the hint it had with
    `keep_hint`), then it is removed."""
    with signals.shielded():
        staging = atomic.staging_dir(out)
        op.undo("remove_dir", path=str(staging))

    def logs_aside(_type: object, e: BaseException | None, _tb: object) -> bool:
        kept = keep_logs(staging, out)
        if kept is not None and isinstance(e, FastVLLMError):
            e.hint = f"{e.hint}; logs kept in {kept}" if keep_hint and e.hint else f"logs kept in {kept}"
        return False

    op.push(logs_aside)
    return staging


def _launch(
    op: journal.Operation, opts: SnapshotOptions, staging: Path, tl: Timeline, on_gpu: bool
) -> _Served:
    """Launch vLLM on the model and wait until it has answered once. Undo: stop its tree."""
    assert opts.model is not None
    model_dir = vllm_server.validate_model_dir(opts.model)
    args = list(opts.vllm_args)
    if on_gpu and opts.sleep and opts.sleep_level and "--enable-sleep-mode" not in args:
        args.append("--enable-sleep-mode")
    spec = vllm_server.LaunchSpec(
        str(model_dir),
        opts.port,
        opts.host,
        args,
        worker_extension=opts.sleep,
        env_overrides=opts.env,
    )
    system.ensure_io_uring_disabled()
    with tl.phase("launch_to_healthy"):
        with signals.shielded():  # no instant at which it runs with no undo to stop it
            server = vllm_server.launch(spec, staging / "logs" / LOG_NAME)
            op.undo_local(_reap, server)
            stop = op.undo("stop_tree", sid=server.pid, started=op.started)
        pid = server.pid
        faults.at(faults.Point.LAUNCH, pid)
        vllm_server.wait_healthy(server, opts.health_timeout, alive=lambda: proctree.alive(pid))
    faults.at(faults.Point.HEALTHY, pid)
    name = vllm_server.served_model_name(server)
    with tl.phase("first_completion"):
        vllm_server.complete(server, name, vllm_server.WARMUP_PROMPTS[0], 8)
    return _Served(server, spec, model_dir, name, spec.recorded_env(), None, tl.elapsed(), stop)


def _reap(server: vllm_server.Server) -> None:
    """Collect the launched server's exit status once its tree was stopped (no zombie). Bounded:
    an undo must end even where the server outlived the stop."""
    if server.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(REAP_TIMEOUT_S)


def _attach(opts: SnapshotOptions) -> _Served:
    """A server fastvllm launched or restored earlier (--pid): it runs on whatever happens."""
    assert opts.pid is not None
    inst = instances.get(opts.pid)
    spec = vllm_server.LaunchSpec(
        inst.model, inst.port, inst.host, list(inst.vllm_args), worker_extension=inst.worker_extension
    )
    server = vllm_server.Server(inst.pid, inst.host, inst.port, Path(inst.log_path), token=inst.control_token)
    return _Served(server, spec, Path(inst.model), inst.served_model_name, inst.env, inst.snapshot)


def _warm_up(s: _Served, tl: Timeline) -> tuple[vllm_server.Completion, manifest.ModelIdentity]:
    """Warm the server up, record its canary, and the model's identity."""
    faults.at(faults.Point.WARMUP, s.server.pid)
    with tl.phase("warmup"):
        for prompt in vllm_server.WARMUP_PROMPTS:
            vllm_server.complete(s.server, s.name, prompt, 16)
    # The canary is computed with a full prefill, as a restored server (whose prefix cache is
    # emptied before the dump) will compute it: a prefix-cache hit takes other kernels, and
    # bf16 greedy tokens can differ between the two (seen on the H100 machine at token 9).
    vllm_server.reset_prefix_cache(s.server)
    with tl.phase("canary"):
        canary = vllm_server.complete(
            s.server, s.name, vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS
        )
    with tl.phase("model_identity"):
        model_id = manifest.model_identity(s.model_dir)
    return canary, model_id


def _release(
    op: journal.Operation, opts: SnapshotOptions, s: _Served, staging: Path, tl: Timeline, on_gpu: bool
) -> _Released:
    """Close the server's readiness gate, then release its weights and KV cache (vLLM's sleep,
    on a GPU). Undo, for a server that runs on (--pid): its weights back, then its clients."""
    sleeping = opts.sleep and s.spec.worker_extension and not (on_gpu and opts.sleep_level == 0)
    rel = _Released(sleeping, opts.sleep_level if (on_gpu and sleeping) else 0, staging / WEIGHTS_FILE)
    server = s.server
    if not s.launched:
        rel.kept = op.undo(
            "wake_server",
            local=lambda: serve_again(server, rel.intact, rel.gpu_level, rel.weights, rel.sleeping),
            pid=server.pid,
            host=server.host,
            port=server.port,
            log=str(server.log_path),
            token=server.token,
            level=rel.gpu_level,
            weights=str(rel.weights),
            sleeping=sleeping,
            intact=True,
        )
    # Clients get 503 from here until a restore's canary has passed (the image is taken
    # closed, so every restore starts closed) or, with --leave-running, the original has its
    # weights back. Closing waits for the client requests in flight: none sees the release.
    vllm_server.set_gate(server, open=False)
    if sleeping and on_gpu:
        _sleep_gpu(server, rel, tl)
    elif sleeping:
        _release_cpu(server, rel, tl)
    else:
        vllm_server.reset_prefix_cache(server)  # (sleeping paths reset it before releasing)
    faults.at(faults.Point.RELEASE, server.pid)
    return rel


def _sleep_gpu(server: vllm_server.Server, rel: _Released, tl: Timeline) -> None:
    with tl.phase("sleep"):
        _add(rel.released, worker_rpc.totals(worker_rpc.weight_bytes(server)))
        if rel.gpu_level == 2:  # the weights leave the GPU for good: keep them in a file first
            _dump_weights(server, rel)
        vllm_server.reset_prefix_cache(server)
        rel.set_intact(False)
        vllm_server.sleep(server, rel.gpu_level)
        rel.gpu_state["worker"] = cuda_checkpoint.release_worker_cache(server)


def _release_cpu(server: vllm_server.Server, rel: _Released, tl: Timeline) -> None:
    with tl.phase("release_weights_kv"):
        vllm_server.reset_prefix_cache(server)
        _add(rel.released, worker_rpc.totals(worker_rpc.weight_bytes(server)))  # what there is to release
        _dump_weights(server, rel)
        rel.set_intact(False)
        _add(rel.released, worker_rpc.totals(worker_rpc.release(server)))


def _dump_weights(server: vllm_server.Server, rel: _Released) -> None:
    """Every worker writes its own shard: rank 0 to `rel.weights`, the others beside it
    (weights.fileformat.rank_path). Each file goes into the content-addressed store."""
    rel.weights.parent.mkdir(exist_ok=True)
    results = sorted(worker_rpc.dump_weights(server, rel.weights), key=lambda r: r.rank)
    root = rel.weights.parent.parent  # the staging directory
    rel.weight_files = [str(Path(r.path).relative_to(root)) for r in results]
    rel.worker_pids = [r.pid for r in results if r.pid is not None]
    rel.parallel = {
        "world_size": results[0].world_size if results else 1,
        "tensor_parallel_size": results[0].tensor_parallel_size if results else 1,
    }
    shared = [store.share(root / f) for f in rel.weight_files]
    rel.shared = shared[0] if shared else None


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    """Add the workers' summed byte counts into `into`."""
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def _dump(
    op: journal.Operation,
    opts: SnapshotOptions,
    found: criu.Criu,
    s: _Served,
    rel: _Released,
    staging: Path,
    tl: Timeline,
    on_gpu: bool,
) -> _Dumped:
    """CRIU-dump the tree (after the CUDA checkpoint on a GPU). With --leave-running the
    original gets its GPU state and its weights back and reopens; otherwise it is gone."""
    # First right after the release: once one worker dies vLLM stops the rest, and only the
    # first to go says which rank failed.
    _require_workers(rel, "after the release, before the CRIU dump")
    d = _prepare_dump(op, s.server, staging, on_gpu)
    gpu_undo = _cuda_checkpoint(op, opts, d, rel, tl) if d.cuda_pids else None
    _require_workers(rel, "before the CRIU dump")
    faults.at(faults.Point.DUMP, s.server.pid)  # (fires while CRIU runs)
    with tl.phase("criu_dump"):
        criu.dump(
            found,
            s.server.pid,
            staging / "criu",
            staging / "logs" / "criu-dump.log",
            leave_running=opts.leave_running,
            action_script=d.hook,
        )
    if gpu_undo is not None and opts.leave_running:
        with tl.phase("cuda_resume"):
            cuda_checkpoint.resume(d.cuda_pids)
    if gpu_undo is not None:
        gpu_undo.cancel()  # resumed, or the dumped tree is gone and its GPU state is in the image
    if opts.leave_running:
        if rel.sleeping:
            with tl.phase("reload_weights"):  # the original keeps serving: give it its weights back
                wake(s.server, rel.gpu_level, rel.weights, rel.sleeping)
        rel.set_intact(True)
        vllm_server.set_gate(s.server, open=True)  # its clients are served again
    else:
        _tree_gone(s, d)
    if rel.kept is not None:
        rel.kept.cancel()  # serving again, or dumped and gone
    return d


def _prepare_dump(op: journal.Operation, server: vllm_server.Server, staging: Path, on_gpu: bool) -> _Dumped:
    """What the dump needs and the manifest records: the tree, its /dev/shm files and the
    action script that copies them while CRIU holds the tree frozen."""
    # CRIU records the log by the path the tree has open; the restore hands a fresh file
    # in its place (--inherit-fd), so the image does not depend on the log staying put.
    try:
        log_at_dump = os.readlink(f"/proc/{server.pid}/fd/1")
    except OSError as e:
        raise ServerError(
            f"the server's root process {server.pid} exited before the dump; nothing was written",
            hint=f"see its log {server.log_path}",
        ) from e
    tree = proctree.session_pids(server.pid)
    shm_files = shm.files_of(tree)
    # The snapshot keeps copies: once the tree is gone its /dev/shm files go too (and the names
    # of its semaphores, which it maps under deleted ones).
    shm_names = shm.names_of(tree)
    op.undo("remove_files", paths=[str(f) for f in shm_names], unless_alive=tree)
    (staging / "logs").mkdir(exist_ok=True)
    hook = staging / "logs" / "criu-action.sh"
    hook.write_text(shm.hook_script(shm_files, staging / "shm"))
    hook.chmod(0o700)
    cuda_pids = cuda_checkpoint.gpu_pids(tree) if on_gpu else []
    masks = affinity.record(tree)
    secret_env = credentials.tree_credential_names(tree)  # names only: the image holds the values
    gpu = cuda_checkpoint.gpu_identity() if cuda_pids else None
    return _Dumped(log_at_dump, tree, shm_files, shm_names, hook, cuda_pids, masks, secret_env, gpu)


def _cuda_checkpoint(
    op: journal.Operation, opts: SnapshotOptions, d: _Dumped, rel: _Released, tl: Timeline
) -> journal.Undo:
    """Lock and checkpoint every process holding a CUDA context (the API server holds one too).
    Undo: give their GPU state back; a tree that lost part of it is not woken or reopened."""
    faults.at(faults.Point.CUDA_CHECKPOINT)
    with tl.phase("cuda_checkpoint"), signals.shielded():
        rel.gpu_state["processes"] = cuda_checkpoint.suspend(d.cuda_pids, opts.lock_timeout_s)
        undo = op.undo("give_back_gpu", local=lambda: _give_back(d.cuda_pids, rel), pids=d.cuda_pids)
        rel.gpu_state["staging_discarded_bytes"] = _discard_staging(rel.gpu_state.get("worker"))
    _require_workers(rel, "after the CUDA checkpoint, before the CRIU dump")
    proctree.require_alive(d.tree, "after the CUDA checkpoint, before the CRIU dump")
    return undo


def _discard_staging(workers: object) -> int:
    """The loader's kept staging buffers, emptied in every worker that kept them: their bytes
    never matter, and CRIU would copy them back into memfds on every restore
    (runtime/discard.py). Returns the bytes dropped."""
    total = 0
    for w in workers if isinstance(workers, list) else []:
        pool = w.get("pinned_pool") if isinstance(w, dict) else None
        if isinstance(pool, dict) and pool.get("kept") and pool.get("pid") and pool.get("ranges"):
            total += discard.shmem_ranges(int(pool["pid"]), [(int(a), int(n)) for a, n in pool["ranges"]])
    return total


def _require_workers(rel: _Released, when: str) -> None:
    """Every worker rank of a parallel server is still there `when`: one that died would be
    missing from the image (CRIU dumps what is left). Refuse, naming the rank."""
    gone = ranks.dead(rel.worker_pids) if len(rel.worker_pids) > 1 else []
    if gone:
        raise TreeChangedError(
            f"{ranks.describe('exited', gone)} {when}; nothing was written",
            hint="the rest of the tree is not snapshotted without it: see the server log for why it "
            "exited, then snapshot again",
        )


def _give_back(pids: list[int], rel: _Released) -> None:
    if cuda_checkpoint.give_back(pids) != pids and rel.kept is not None:
        rel.kept.cancel()  # part of the tree did not get its GPU state back: it stays closed


def _tree_gone(s: _Served, d: _Dumped) -> None:
    """Without --leave-running CRIU ends the tree once dumped: wait for it, remove the /dev/shm
    files it leaves (the snapshot has them), forget it."""
    if s.server.proc is not None:
        s.server.proc.wait()
    left = proctree.wait_gone(d.tree, 30.0, reaped=True)
    shm.remove(d.shm_names)
    instances.forget(s.server.pid)
    if s.stop is not None and not left:
        s.stop.cancel()  # nothing of it to stop, and its PIDs may be others' from now on


def _manifest(
    found: criu.Criu,
    s: _Served,
    rel: _Released,
    d: _Dumped,
    canary: vllm_server.Completion,
    model_id: manifest.ModelIdentity,
    staging: Path,
    tl: Timeline,
    on_hash_bytes: Callable[[int], None] | None,
) -> manifest.Manifest:
    """Hash every file and describe the snapshot."""
    with tl.phase("checksums"):
        files = manifest.collect_files(staging, on_bytes=on_hash_bytes)
        verified.record(staging, files)  # hashed just now: a restore here need not again
    return manifest.Manifest(
        identity=manifest.HostIdentity.here(found.version),
        model=model_id,
        server=manifest.ServerSpec(
            model=str(s.model_dir),
            served_model_name=s.name,
            host=s.spec.host,
            port=s.spec.port,
            vllm_args=list(s.spec.extra_args),
            env=s.env,
            log_path_at_dump=d.log_at_dump,
            tree_pids=d.tree,
            worker_extension=s.spec.worker_extension,
            control_token=s.server.token,
        ),
        canary=manifest.Canary(
            vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS, canary.token_ids, canary.text
        ),
        files=files,
        image_bytes=criu.image_bytes(staging / "criu"),
        source_snapshot=s.source_snapshot,
        weights_file=WEIGHTS_FILE if (rel.sleeping and rel.gpu_level in (0, 2)) else None,
        sleep_level=rel.gpu_level,
        cuda_pids=d.cuda_pids,
        affinity=d.masks,
        secret_env=d.secret_env,
        gpu=d.gpu.as_dict() if d.gpu else None,
        gpu_state=rel.gpu_state,
        released_bytes=rel.released,
        **_layout(s, rel, d),
        weights_key=rel.shared.key if rel.shared else None,
        weights_store_path=str(rel.shared.store_path or "") if rel.shared else "",
    )


def _layout(s: _Served, rel: _Released, d: _Dumped) -> dict[str, Any]:
    """The manifest's record of the parallel layout: every rank's weight file, the tensor-
    parallel size and worker count (as the workers reported them, else as vLLM's arguments
    give them), and the devices they ran on (a restore elsewhere must match them)."""
    tp, pp = vllm_server.parallel_sizes(s.spec.extra_args)
    world = rel.parallel.get("world_size", tp * pp)
    on_gpu = bool(d.cuda_pids)
    return {
        "weights_files": rel.weight_files if len(rel.weight_files) > 1 else [],
        "tensor_parallel_size": rel.parallel.get("tensor_parallel_size", tp),
        "world_size": world,
        "worker_pids": rel.worker_pids,
        "devices": devices.of_tree(devices.list_gpus() if on_gpu else [], world, s.env, on_gpu).as_dict(),
    }


def _publish(m: manifest.Manifest, s: _Served, staging: Path, out: Path, tl: Timeline) -> None:
    faults.at(faults.Point.PUBLISH, s.server.pid)
    with tl.phase("publish"):
        m.timings = {**tl.durations(), "cold_start_to_first_completion_s": s.cold_start_s or 0.0}
        m.write(staging)
        atomic.publish(staging, out)


def _record(s: _Served, out: Path) -> None:
    """A server launched here and left running (--leave-running): `fastvllm ps` lists it."""
    instances.record(
        instances.Instance(
            s.server.pid,
            s.spec.host,
            s.spec.port,
            str(s.model_dir),
            s.name,
            list(s.spec.extra_args),
            s.env,
            str(out),
            str(out / "logs" / LOG_NAME),
            s.spec.worker_extension,
            control_token=s.server.token,
        )
    )


def wake(server: vllm_server.Server, level: int, weights: Path, sleeping: bool) -> None:
    """Give a sleeping server back what sleep took: GPU level 2 re-allocates the weights, fills
    them with fastvllm's loader, then re-allocates the KV cache; level 1 wakes everything (the
    weights come back from host memory); the CPU path reloads into the released tensors."""
    if level == 2:
        vllm_server.wake_up(server, "weights")
        worker_rpc.reload(server, worker_rpc.ReloadArgs(str(weights)))
        vllm_server.wake_up(server, "kv_cache")
    elif level == 1:
        vllm_server.wake_up(server)
    elif sleeping and not vllm_server.cuda_present():
        worker_rpc.reload(server, worker_rpc.ReloadArgs(str(weights)))


def serve_again(server: vllm_server.Server, intact: bool, level: int, weights: Path, sleeping: bool) -> None:
    """After a failed snapshot of a server that keeps serving (--pid): its weights back where
    they were released (`intact` False), then its readiness gate open. Best effort, under the
    error being reported: a server that cannot get its weights back stays closed (503) rather
    than answer without them."""
    try:
        if not intact:
            wake(server, level, weights, sleeping)
        vllm_server.set_gate(server, open=True)
    except Exception:  # (a bad answer too: nothing here may hide the error being reported)
        pass
