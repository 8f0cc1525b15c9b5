"""The snapshot pipeline: launch vLLM, wait until healthy, warm up, record the canary,
CRIU-dump the tree, hash every file, publish atomically.

All-or-nothing: any failure or Ctrl-C stops the tree we launched and removes the staging
directory, so no partial snapshot and no stray vLLM process is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastvllm.runtime import (
    affinity,
    atomic,
    criu,
    cuda_checkpoint,
    instances,
    manifest,
    proctree,
    shm,
    system,
    tiny_model,
    verified,
    vllm_server,
)
from fastvllm.runtime.errors import FastVLLMError, SnapshotExistsError, UsageError
from fastvllm.runtime.timeline import Timeline
from fastvllm.weights import store

LOG_NAME = "server.log"
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

    def as_dict(self) -> dict[str, object]:
        return {
            "snapshot": str(self.path),
            "image_bytes": self.manifest.image_bytes,
            "cold_start_to_first_completion_s": self.cold_start_s,
            "phases": self.timeline.as_list(),
            "total_s": round(self.timeline.elapsed(), 4),
            "canary_tokens": len(self.manifest.canary.token_ids),
            "server_pid": self.server.pid if self.server else None,
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
    if opts.model is not None:
        opts.model = tiny_model.resolve_model(opts.model)
        vllm_server.validate_model_dir(opts.model)
        vllm_server.ensure_port_free(opts.host, opts.port)
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
    tl = timeline or Timeline()
    opts.out = opts.out.expanduser().absolute()
    proctree.adopt_orphans()
    found = _preflight(opts)
    staging = atomic.staging_dir(opts.out)
    server: vllm_server.Server | None = None
    launched = False
    suspended: list[int] = []  # PIDs whose GPU state is checkpointed and not yet given back
    gpu_level = 0
    sleeping = False
    weights = staging / WEIGHTS_FILE
    cold_start_s: float | None = None
    try:
        on_gpu = vllm_server.cuda_present()
        if opts.model is not None:
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
                server = vllm_server.launch(spec, staging / "logs" / LOG_NAME)
                launched = True
                pid = server.pid
                vllm_server.wait_healthy(server, opts.health_timeout, alive=lambda: proctree.alive(pid))
            name = vllm_server.served_model_name(server)
            with tl.phase("first_completion"):
                vllm_server.complete(server, name, vllm_server.WARMUP_PROMPTS[0], 8)
            cold_start_s = tl.elapsed()
            source_snapshot = None
            env = spec.recorded_env()
        else:
            assert opts.pid is not None
            inst = instances.get(opts.pid)
            model_dir = Path(inst.model)
            spec = vllm_server.LaunchSpec(
                inst.model, inst.port, inst.host, list(inst.vllm_args), worker_extension=inst.worker_extension
            )
            server = vllm_server.Server(inst.pid, inst.host, inst.port, Path(inst.log_path))
            name, source_snapshot, env = inst.served_model_name, inst.snapshot, inst.env
        with tl.phase("warmup"):
            for prompt in vllm_server.WARMUP_PROMPTS:
                vllm_server.complete(server, name, prompt, 16)
        # The canary is computed with a full prefill, as a restored server (whose prefix cache is
        # emptied before the dump) will compute it: a prefix-cache hit takes other kernels, and
        # bf16 greedy tokens can differ between the two (seen on the H100 machine at token 9).
        vllm_server.reset_prefix_cache(server)
        with tl.phase("canary"):
            canary = vllm_server.complete(
                server, name, vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS
            )
        with tl.phase("model_identity"):
            model_id = manifest.model_identity(model_dir)
        sleeping = opts.sleep and spec.worker_extension and not (on_gpu and opts.sleep_level == 0)
        gpu_level = opts.sleep_level if (on_gpu and sleeping) else 0
        weights = staging / WEIGHTS_FILE
        released: dict[str, int] = {}
        shared: store.Shared | None = None
        if sleeping and on_gpu:
            with tl.phase("sleep"):
                for r in vllm_server.rpc(server, "fastvllm_weight_bytes"):
                    for k, v in dict(r).items():  # type: ignore[call-overload]
                        released[k] = released.get(k, 0) + int(v)
                if gpu_level == 2:  # the weights leave the GPU for good: keep them in a file first
                    weights.parent.mkdir(exist_ok=True)
                    vllm_server.rpc(server, "fastvllm_dump_weights", path=str(weights))
                    shared = store.share(weights)
                vllm_server.reset_prefix_cache(server)
                vllm_server.sleep(server, gpu_level)
        elif sleeping:
            with tl.phase("release_weights_kv"):
                weights.parent.mkdir(exist_ok=True)
                vllm_server.reset_prefix_cache(server)
                for r in vllm_server.rpc(server, "fastvllm_weight_bytes"):  # what there is to release
                    for k, v in dict(r).items():  # type: ignore[call-overload]
                        released[k] = released.get(k, 0) + int(v)
                vllm_server.rpc(server, "fastvllm_dump_weights", path=str(weights))
                shared = store.share(weights)
                for r in vllm_server.rpc(server, "fastvllm_release"):
                    for k, v in dict(r).items():  # type: ignore[call-overload]
                        released[k] = released.get(k, 0) + int(v)
        if not sleeping:
            vllm_server.reset_prefix_cache(server)  # (sleeping paths reset it before releasing)
        # CRIU records the log by the path the tree has open; the restore hands a fresh file
        # in its place (--inherit-fd), so the image does not depend on the log staying put.
        log_at_dump = os.readlink(f"/proc/{server.pid}/fd/1")
        tree = proctree.session_pids(server.pid)
        shm_files = shm.files_of(tree)
        (staging / "logs").mkdir(exist_ok=True)
        hook = staging / "logs" / "criu-action.sh"
        hook.write_text(shm.hook_script(shm_files, staging / "shm"))
        hook.chmod(0o700)
        cuda_pids = cuda_checkpoint.gpu_pids(tree) if on_gpu else []
        masks = affinity.record(tree)
        gpu = cuda_checkpoint.gpu_identity() if cuda_pids else None
        if cuda_pids:  # the API server holds a CUDA context too: checkpoint every such process
            with tl.phase("cuda_checkpoint"):
                cuda_checkpoint.suspend(cuda_pids, opts.lock_timeout_s)
                suspended = cuda_pids
            proctree.require_alive(tree, "after the CUDA checkpoint, before the CRIU dump")
        with tl.phase("criu_dump"):
            criu.dump(
                found,
                server.pid,
                staging / "criu",
                staging / "logs" / "criu-dump.log",
                leave_running=opts.leave_running,
                action_script=hook,
            )
        if opts.leave_running:
            if suspended:
                with tl.phase("cuda_resume"):
                    cuda_checkpoint.resume(suspended)
                suspended = []
            if sleeping:
                with tl.phase("reload_weights"):  # the original keeps serving: give it its weights back
                    wake(server, gpu_level, weights, sleeping)
        else:
            suspended = []  # the dumped tree is gone; its GPU state lives in the image
        if not opts.leave_running:
            if server.proc is not None:
                server.proc.wait()
            proctree.wait_gone(tree, 30.0, reaped=True)
            shm.remove(shm_files)  # the snapshot has them; the dead tree leaves them behind
            instances.forget(server.pid)
        with tl.phase("checksums"):
            files = manifest.collect_files(staging, on_bytes=on_hash_bytes)
            verified.record(staging, files)  # hashed just now: a restore here need not again
        m = manifest.Manifest(
            identity=manifest.HostIdentity.here(found.version),
            model=model_id,
            server=manifest.ServerSpec(
                model=str(model_dir),
                served_model_name=name,
                host=spec.host,
                port=spec.port,
                vllm_args=list(spec.extra_args),
                env=env,
                log_path_at_dump=log_at_dump,
                tree_pids=tree,
                worker_extension=spec.worker_extension,
            ),
            canary=manifest.Canary(
                vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS, canary.token_ids, canary.text
            ),
            files=files,
            image_bytes=criu.image_bytes(staging / "criu"),
            source_snapshot=source_snapshot,
            weights_file=WEIGHTS_FILE if (sleeping and gpu_level in (0, 2)) else None,
            sleep_level=gpu_level,
            cuda_pids=cuda_pids,
            affinity=masks,
            gpu=gpu.as_dict() if gpu else None,
            released_bytes=released,
            weights_key=shared.key if shared else None,
            weights_store_path=str(shared.store_path or "") if shared else "",
        )
        with tl.phase("publish"):
            m.timings = {**tl.durations(), "cold_start_to_first_completion_s": cold_start_s or 0.0}
            m.write(staging)
            atomic.publish(staging, opts.out)
    except BaseException as e:
        if suspended:
            # The dump failed after the CUDA checkpoint: the tree gets its GPU state back and,
            # unless we launched it (then it is stopped below) or part of it died, its
            # weights, and keeps serving.
            back = cuda_checkpoint.give_back(suspended)
            if back == suspended and not launched and server is not None:
                wake(server, gpu_level, weights, sleeping)
        if launched and server is not None:
            instances.stop(server.pid)
            if server.proc is not None:
                server.proc.wait()
        kept = keep_logs(staging, opts.out)
        atomic.discard(staging)
        if kept is not None and isinstance(e, FastVLLMError):
            e.hint = f"logs kept in {kept}"
        raise
    if opts.leave_running and launched and server is not None:
        instances.record(
            instances.Instance(
                server.pid,
                spec.host,
                spec.port,
                str(model_dir),
                name,
                list(spec.extra_args),
                env,
                str(opts.out),
                str(opts.out / "logs" / LOG_NAME),
                spec.worker_extension,
            )
        )
    return SnapshotResult(opts.out, m, tl, cold_start_s, server if opts.leave_running else None)


def wake(server: vllm_server.Server, level: int, weights: Path, sleeping: bool) -> None:
    """Give a sleeping server back what sleep took: GPU level 2 re-allocates the weights, fills
    them with fastvllm's loader, then re-allocates the KV cache; level 1 wakes everything (the
    weights come back from host memory); the CPU path reloads into the released tensors."""
    if level == 2:
        vllm_server.wake_up(server, "weights")
        vllm_server.rpc(server, "fastvllm_reload", path=str(weights))
        vllm_server.wake_up(server, "kv_cache")
    elif level == 1:
        vllm_server.wake_up(server)
    elif sleeping and not vllm_server.cuda_present():
        vllm_server.rpc(server, "fastvllm_reload", path=str(weights))
