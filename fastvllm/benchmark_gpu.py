"""GPU restore of a real vLLM server against its cold start, for one or more models in one run,
with the breakdown issue 22 asks for: where a GPU restore's time goes, process by process and
phase by phase, timed in-process and as a user waits.

What it measures, per model (`--model 3b,8b`):

- cold start: launch -> first completion (vLLM as a user runs it), then a sleep-2 snapshot of
  the same server: its phases, per checkpointed process what the CUDA checkpoint moved, and the
  CRIU image split per process into CPU memory and the host copy of device memory;
- restores of that snapshot, page cache warm (every file of it read just before) and cold
  (dropped; in a VM only the guest's cache), in these variants:
  - `cli`: `fastvllm restore` with its defaults, spawned as a user runs it, timed from the spawn
    to the first completion answered to a separate client (the headline); `cli-copy`,
    `cli-mmap`: the same with `--criu-restore copy|mmap`;
  - `c`: fastvllm's default restore, in-process (`restore_snapshot`);
  - `b`: sleep 2 + vLLM's own `reload_weights` from the model directory (what vLLM's built-in
    snapshot does), CRIU in copy mode (as stock CRIU), no read-ahead, no checksums;
  - `mmap`, `copy`: in-process with CRIU in that mode; `mmap-old`: mmap without the read-ahead of
    the CUDA checkpoint's host copy; `copy-serial`: the tree's CUDA restores one after the other;
  - `sweep`: the loader's threads and chunk size swept inside a restored server (the process a
    restore's load runs in), reloading the same weights.
  Before the timed restores of a model, one cold restore learns the snapshot's hot set (`prime`),
  as a host's first restore does.

and once per machine the bounds: pinned host-to-device copy (a fresh CUDA process), the disk's
parallel cold read, and the page cache's parallel read (the host side of the loader's copy).

The steps run in the order of what matters most (`plan`): the first model's cold start, warm
and cold default restores as a user waits; then each other model's; then (b) and (c) warm; then
the rest. `--budget-s` drops the steps that no longer fit (each has an estimate); the JSON is
written after every step, the PNG chart at the end.

    python -m fastvllm.scripts.bench_gpu_restore --model 3b,8b --budget-s 500 --out results/gpu-restore
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Per-model vLLM arguments. A fifth of the GPU for the 3b; the 8b's 14 GB of weights need more
# room for a KV cache. CUDA graphs on, as vLLM serves by default (`--eager` turns them off).
BASE_ARGS = ["--attention-backend", "FLASH_ATTN", "--max-model-len", "1024"]
GPU_UTIL = {"8b": "0.3", "*": "0.2"}
VARIANTS = (
    "prime,cli,agent,agent-held,c,b,c-held,c-noprefault,c-v2,sweep,cli-copy,copy,mmap-old,noahead,inplace"
)
# (c) with one setting changed (runtime/config.py), timed beside (c) in the same run: the
# host copy left to the driver's own faults, CRIU's log at warnings, 12-16 loader readers, the
# loader's thread that hands buffers back sleeping on its events instead of spinning, readers at
# a lower priority than the thread issuing the copies, readers copying out of a mapping of the
# file instead of reading it.
VARIANT_ENV = {
    "c-noprefault": {"FASTVLLM_GPU_PREFAULT_THREADS": "0"},
    "c-v2": {"FASTVLLM_CRIU_LOG_LEVEL": "2"},
    **{f"c-r{n}": {"FASTVLLM_LOADER_THREADS": str(n)} for n in (10, 12, 14, 16)},
    "c-block": {"FASTVLLM_LOADER_COPY_WAIT": "block"},
    **{f"c-nice{n}": {"FASTVLLM_LOADER_READER_NICE": str(n)} for n in (5, 10)},
    "c-r16-nice5": {"FASTVLLM_LOADER_THREADS": "16", "FASTVLLM_LOADER_READER_NICE": "5"},
    "c-mapped": {"FASTVLLM_LOADER_READS": "mapped"},
    "c-r14-mapped": {"FASTVLLM_LOADER_THREADS": "14", "FASTVLLM_LOADER_READS": "mapped"},
    "c-held": {},  # this process holds the weights in pinned memory, as `fastvllm agent --hold`
}
HELD = "@held"  # a sweep row's `held`: the socket of this process's held copy (`_holding`)
PROMPT = "A separate client asks the restored server:"
# The loader's settings (worker_rpc.ReloadArgs fields) reloaded in a restored server by the
# `sweep` step, with the staging buffers kept in its image (a load with more readers than kept
# buffers uses those): readers and chunk sizes; the copy thread's wait and the readers'
# priority; reads through a mapping of the file; each half of the pipeline alone, to tell which
# one bounds the whole (reads with no copies; copies of the buffers as they are, last: they
# leave the weights wrong).
SWEEP_GRID: list[dict[str, Any]] = [
    *({"threads": t, "chunk_mib": c} for c in (8, 16) for t in (10, 12, 14, 16)),
    {"threads": 14, "copy_wait": "block"},
    {"threads": 14, "reader_nice": 5},
    {"threads": 16, "copy_wait": "block", "reader_nice": 5},
    {"threads": 12, "reads": "mapped"},
    {"threads": 14, "reads": "mapped"},
    {"threads": 14, "only": "reads"},
    {"threads": 16, "only": "reads"},
    {"threads": 14, "only": "reads", "reads": "mapped"},
    {"held": HELD},
    {"threads": 14, "only": "copies"},
]
SWEEP_REPS = 2

_H2D = r"""
import json, time, torch
n = 1 << 30
src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
dst = torch.empty(n, dtype=torch.uint8, device="cuda")
dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
best = 0.0
for _ in range(5):
    t = time.perf_counter(); dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    best = max(best, n / (time.perf_counter() - t) / 1e9)
print(json.dumps({"pinned_h2d_gbps": best}))
"""


class StepKind(enum.Enum):
    SNAPSHOT = "snapshot"  # launch (the cold start) and the sleep-2 snapshot
    BOUNDS = "bounds"  # the machine's bounds, once
    PRIME = "prime"  # a host's first restore: learns the hot set
    RESTORE = "restore"
    SWEEP = "sweep"  # the loader's settings swept in a restored server


@dataclass(frozen=True)
class Step:
    model: str
    kind: StepKind
    variant: str = ""
    cond: str = ""
    rep: int = 1

    @property
    def key(self) -> str:
        """Where its figures go in the model's `runs`."""
        if self.kind is StepKind.RESTORE:
            return f"{self.variant}/{self.cond}"
        return self.kind.value


def plan(
    models: list[str],
    *,
    reps: int = 2,
    variants: set[str] | None = None,
    conditions: set[str] | None = None,
) -> list[Step]:
    """Every step of a run, most important first: the first model's cold start, its default
    restores as a user waits (warm, cold) and (c) against (b) warm; then each other model's
    cold start, warm default as a user waits, (c) and (b) warm, cold default; (b) and (c) cold,
    further repetitions, the loader sweep, and the variants kept for comparison. `variants`
    and `conditions` filter the restores (None: all of VARIANTS, warm and cold); snapshots,
    bounds and primes stay."""
    want = set(VARIANTS.split(",")) if variants is None else variants
    conds = {"warm", "cold"} if conditions is None else conditions
    first, rest = models[0], models[1:]
    steps: list[Step] = []

    def restore(m: str, v: str, c: str, rep: int = 1) -> None:
        if v in want and c in conds:
            steps.append(Step(m, StepKind.RESTORE, v, c, rep))

    # the prime: a host's first restore, cold (the snapshot learned its hot set already)
    prime = [StepKind.PRIME] if "prime" in want else []
    steps += [Step(first, StepKind.SNAPSHOT), Step(first, StepKind.BOUNDS), *(Step(first, k) for k in prime)]
    ab = [v for v in VARIANT_ENV if v in want]  # each beside (c), in turn
    restore(first, "cli", "warm")
    restore(first, "cli", "cold")
    restore(first, "c", "warm")
    restore(first, "b", "warm")
    restore(first, "agent", "warm")
    restore(first, "agent-held", "warm")
    for m in rest:  # a failed or slow snapshot of a bigger model costs nothing of the above
        steps += [Step(m, StepKind.SNAPSHOT), *(Step(m, k) for k in prime)]
        restore(m, "cli", "warm")
        restore(m, "agent", "warm")
        restore(m, "agent-held", "warm")
        restore(m, "c", "warm")
        restore(m, "b", "warm")
        restore(m, "cli", "cold")
    for m in models:  # one setting changed at a time, right after (c) ran
        for v in ab:
            restore(m, v, "warm")
    for rep in range(2, reps + 1):  # the warm waits are the figures asked for: their medians next
        for m in models:
            for v in ("cli", "agent", "agent-held"):
                restore(m, v, "warm", rep)
        for m in models:
            for v in ("c", *ab):
                restore(m, v, "warm", rep)
    for m in models:
        restore(m, "b", "cold")
        restore(m, "c", "cold")
    for rep in range(2, reps + 1):
        for m in models:
            for v, c in (("cli", "cold"), ("b", "warm")):
                restore(m, v, c, rep)
    if "sweep" in want:
        steps += [Step(m, StepKind.SWEEP) for m in models]
    for rep in range(1, reps + 1):  # what the CUDA restore's time depends on (issue 22, item 1)
        for m in models:
            for v in ("noahead", "inplace"):
                restore(m, v, "warm", rep)
    for rep in range(1, reps + 1):
        for m in models:
            for v, c in (("cli-copy", "warm"), ("copy", "warm"), ("cli-mmap", "warm"), ("mmap", "warm")):
                restore(m, v, c, rep)
            for v in ("mmap-old", "copy", "cli-copy", "mmap", "copy-serial"):
                restore(m, v, "cold", rep)
    return steps


@dataclass
class Sizes:
    """What a model's steps move, in GB, for their time estimates (the image is ~4 GB for every
    model measured; its real size replaces the guess once the snapshot is taken)."""

    weights_gb: float
    image_gb: float = 4.0


def estimate_s(step: Step, sizes: Sizes, disk_gbps: float = 1.8) -> float:
    """A generous guess of a step's seconds on the H100 machine, from its measured runs
    (docs/benchmarks/gpu-restore.md: a 3b cold start takes 55-107 s, its snapshot ~30 s,
    a restore 8-12 s with its preparation)."""
    total = sizes.weights_gb + sizes.image_gb
    cold_read = total / max(disk_gbps, 0.1)
    if step.kind is StepKind.SNAPSHOT:
        return 70.0 + 12.0 * sizes.weights_gb
    if step.kind is StepKind.BOUNDS:
        return 10.0 + sizes.weights_gb / max(disk_gbps, 0.1)
    if step.kind is StepKind.SWEEP:
        return 10.0 + len(SWEEP_GRID) * SWEEP_REPS * (0.3 + sizes.weights_gb / 20.0)
    if step.kind is StepKind.PRIME or step.cond == "cold":
        return 8.0 + 1.3 * cold_read
    extra = 1.5 * sizes.weights_gb / 5.0 if step.variant == "b" else 0.0  # vLLM's own reload
    return 8.0 + 0.3 * total + extra


def skip_reason(step: Step, has_snapshot: bool, est: float, left: float) -> str | None:
    """Why `step` does not run (None: it runs): its model has no snapshot (it failed, or did not
    fit), or its estimate `est` exceeds the `left` seconds of the budget."""
    if step.kind is not StepKind.SNAPSHOT and not has_snapshot:
        return "no snapshot of this model"
    if est > left:
        return f"out of time budget (needs ~{est:.0f} s, {max(left, 0):.0f} s left)"
    return None


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _vllm_args(model: str, extra: list[str]) -> list[str]:
    util = GPU_UTIL.get(model, GPU_UTIL.get("*"))
    return [*BASE_ARGS, *(["--gpu-memory-utilization", util] if util else []), *extra]


def _bounds(weights: Path) -> dict[str, Any]:
    """The machine's bounds for a restore: pinned host-to-device bandwidth (a fresh process, as
    the restored worker is), the disk's parallel cold read of the weight file, and the page
    cache's parallel read of it (the host side of the loader's staging copy)."""
    from fastvllm.prefetch import warm
    from fastvllm.runtime import system

    out: dict[str, Any] = {}
    r = subprocess.run([sys.executable, "-c", _H2D], capture_output=True, text=True, check=False, timeout=300)
    try:
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        out["pinned_h2d_error"] = (r.stderr or r.stdout)[-500:]
    system.drop_page_cache()
    st = warm.warm([weights], threads=16)
    out["disk_cold_read_gbps"] = round(st.gbps, 3)
    out["disk_cold_read_bytes"] = st.bytes
    # The file is in the page cache now: preadv into a buffer per thread (the loader's copy,
    # less the DMA engine reading its buffers at the same time), with the loader's threads and 16.
    for n in (10, 16):
        st = warm.warm([weights], threads=n, method="read")
        out[f"page_cache_read_gbps_{n}_threads"] = round(st.gbps, 2)
    return out


def _gpu_breakdown(snap: Path) -> dict[str, Any]:
    """The snapshot's image split per process (CPU memory / the CUDA checkpoint's host copy),
    and what the checkpoint moved, as the snapshot recorded it."""
    from fastvllm.runtime import criu_images, manifest

    m = manifest.load(snap)
    procs = m.gpu_state.get("processes", {})
    ranges = {int(p): [tuple(r) for r in v.get("host_copy_ranges", [])] for p, v in procs.items()}
    split = criu_images.split(snap / "criu", ranges)
    return {
        "image_bytes": m.image_bytes,
        "weights_bytes": next((f.size for f in m.files if f.path == m.weights_file), 0),
        "per_process": {
            str(pid): {
                **s,
                "role": "cuda" if pid in m.cuda_pids else "cpu",
                **{k: v for k, v in procs.get(str(pid), {}).items() if k != "host_copy_ranges"},
                "host_copy_ranges": len(procs.get(str(pid), {}).get("host_copy_ranges", [])),
            }
            for pid, s in split.items()
        },
        "worker_memory": m.gpu_state.get("worker"),
    }


@dataclass
class Model:
    """One model's snapshot and what its restores need."""

    name: str
    model_dir: Path
    sizes: Sizes
    snap: Path | None = None
    served: str = ""
    doc: dict[str, Any] = field(default_factory=dict)


def _prepare(m: Model, cold: bool, extra: list[Path]) -> None:
    """Cold: the page cache dropped. Warm: every file of the snapshot (and `extra`) read, without
    dropping first (the read is then a page-cache pass, not seconds of disk)."""
    from fastvllm.prefetch import warm
    from fastvllm.runtime import manifest, system

    assert m.snap is not None
    if cold:
        system.drop_page_cache()
        return
    warm.warm([m.snap / f.path for f in manifest.load(m.snap).files] + extra)


def _load_figures(gpu: dict[str, Any] | None, phase_s: float | None, h2d: float | None) -> dict[str, Any]:
    """The loader's GB/s (its own clock, the slowest worker), % of the pinned bound, the
    load phase's GB/s (with the RPC), which staging pool it used, where it waited (the
    longest of the workers): its copies for reads, its readers for a free buffer, and its
    fixed costs: to the first copy, and the drain after the last."""
    loads = [x for x in (gpu or {}).get("load", []) or [] if isinstance(x, dict)]
    if not loads:
        return {}
    gbps = min(float(x.get("gbps", 0.0)) for x in loads)
    out: dict[str, Any] = {"load_gbps": round(gbps, 2), "load_pool": loads[0].get("pool")}
    for key in ("wait_reads_s", "wait_buffers_s", "first_copy_s", "drain_s"):
        waits = [float(x[key]) for x in loads if x.get(key) is not None]
        if waits:
            out[f"load_{key}"] = round(max(waits), 4)
    if h2d:
        out["load_pct_of_pinned_bound"] = round(100 * gbps / h2d, 1)
    if phase_s:
        out["load_phase_gbps"] = round(sum(int(x.get("bytes", 0)) for x in loads) / phase_s / 1e9, 2)
    return out


def _restore(m: Model, variant: str, cold: bool, h2d: float | None, keep: bool = False) -> dict[str, Any]:
    """An in-process restore (`restore_snapshot`) in `variant`; the server is stopped after,
    unless `keep` (then it is in the result as `server`)."""
    from fastvllm import api
    from fastvllm.restore import readahead
    from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
    from fastvllm.runtime import cuda_checkpoint, manifest
    from fastvllm.runtime.modes import CriuRestoreMode, Reloader

    assert m.snap is not None
    _prepare(m, cold, sorted(m.model_dir.glob("*.safetensors")) if variant == "b" else [])
    opts = RestoreOptions(m.snap)
    if variant.startswith("mmap"):
        opts.criu_restore = CriuRestoreMode.MMAP
    elif variant in ("b", "copy", "copy-serial"):
        opts.criu_restore = CriuRestoreMode.COPY
    if variant == "b":
        opts.prefetch = opts.verify = False
        opts.reloader = Reloader.VLLM
    undo: list[Callable[[], None]] = []
    for key, value in VARIANT_ENV.get(variant, {}).items():  # read by the restore when it runs
        undo.append(functools.partial(_restore_env, key, os.environ.get(key)))
        os.environ[key] = value
    if variant == "mmap-old":  # no read-ahead of the host copy: what the restore did before
        saved = readahead.gpu_host_copy
        readahead.gpu_host_copy = lambda _root, _m: []  # type: ignore[assignment]  # for this run (undone)
        undo.append(lambda: setattr(readahead, "gpu_host_copy", saved))
    if variant == "noahead":  # no read-ahead beside the restore: what it costs the CUDA restore
        opts.prefetch = False
    if variant == "copy-serial":  # the tree's CUDA restores one after the other, as before
        resume = cuda_checkpoint.resume
        cuda_checkpoint.resume = lambda pids, **kw: resume(pids, **{**kw, "parallel": False})
        undo.append(lambda: setattr(cuda_checkpoint, "resume", resume))
    held_here: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if variant == "c-held":
        held_here = _holding(m.snap / str(manifest.load(m.snap).weights_file))
    try:
        with held_here:
            r = restore_snapshot(opts)
    finally:
        for u in undo:
            u()
    phases = r.timeline.durations()
    out: dict[str, Any] = {
        "ttfc_s": r.time_to_first_completion_s,
        "criu_restore": str(getattr(r.criu_restore, "value", r.criu_restore)),
        "phases": phases,
        "timeline": r.timeline.as_list(),  # with each phase's start: the gaps between them
        "readahead": r.readahead,
        "gpu": r.gpu,
        **_load_figures(r.gpu, phases.get("load_weights"), h2d),
    }
    if variant == "inplace":  # the restored tree put to sleep and checkpointed in place again
        try:
            out["inplace"] = _inplace_cycles(r.server, m.snap)
        except BaseException:
            api.stop(r.server.pid)  # a failed cycle leaves no tree behind
            raise
    if keep:
        out["server"] = r.server
        return out
    api.stop(r.server.pid)
    return out


@contextlib.contextmanager
def _holding(weights: Path) -> Iterator[str]:
    """This process holds `weights` in pinned memory and answers restored workers' requests for
    it on a socket of its own, as `fastvllm agent --hold` does; yields the socket."""
    from fastvllm.weights import held

    t = time.perf_counter()
    h = held.hold(weights)
    _say(f"  holding {weights} ({h.data_bytes / 1e9:.1f} GB) in {time.perf_counter() - t:.2f} s")
    tmp = tempfile.mkdtemp(prefix="fv-held-")  # 0700: the socket has no uid check
    try:
        with held.serving(Path(tmp) / "held.sock") as path:
            yield path
    finally:
        held.release_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _inplace_cycles(server: Any, snap: Path, reps: int = 2) -> list[dict[str, Any]]:
    """Checkpoint and restore a restored tree's CUDA state in place (no CRIU), after `sleep`:
    the driver's restore alone, from a host copy it has just made, beside the one after CRIU."""
    from fastvllm.runtime import cuda_checkpoint, manifest, vllm_server

    pids = manifest.load(snap).cuda_pids
    vllm_server.sleep(server, level=2)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        cuda_checkpoint.suspend(pids)
        t1 = time.perf_counter()
        per_pid = cuda_checkpoint.resume(pids)
        out.append(
            {
                "checkpoint_s": round(t1 - t, 4),
                "restore_s": round(time.perf_counter() - t1, 4),
                "per_pid": per_pid,
            }
        )
    vllm_server.wake_up(server)
    return out


def _restore_cli(
    m: Model, cold: bool, mode: str | None, h2d: float | None, *, agent: bool = False, hold: bool = False
) -> dict[str, Any]:
    """`fastvllm restore` as a user runs it (defaults, or `--criu-restore mode`), through the
    console script's launcher, timed from spawning it to the first 200 a separate client gets
    (fastvllm.benchmark.command_once). With `agent`, a `fastvllm agent` runs for it and the
    command hands the restore over (the resident path); with `hold`, the agent holds the
    snapshot's weights in pinned memory (`--hold`)."""
    from fastvllm import benchmark
    from fastvllm.runtime import manifest, proctree

    assert m.snap is not None
    if not cold:
        _prepare(m, False, [])
    cmd = [sys.executable, "-m", "fastvllm.launcher"]
    extra = ["--criu-restore", mode] if mode else []
    target = benchmark.Target.of(m.snap)
    # an earlier in-process restore's tree may still be this process's zombies: only this process
    # can reap them, and an agent restoring the same PIDs would wait for them
    proctree.wait_gone(manifest.load(m.snap).server.tree_pids, 30.0, reaped=True)
    try:
        extra_agent = ["--hold", str(m.snap)] if hold else []
        with benchmark.agent_running(cmd, extra=extra_agent) if agent else contextlib.nullcontext():
            wait_s, detail = benchmark.command_once(
                target, cold, cmd, agent=agent, extra=extra, keep_result=True, exact_text=False
            )
    finally:
        # The tree's processes outlived the command that restored them: orphans, adopted by this
        # process (a subreaper, proctree.adopt_orphans). Reap them here, or the next `fastvllm
        # restore` waits for PIDs only this process can free.
        proctree.wait_gone(manifest.load(m.snap).server.tree_pids, 30.0, reaped=True)
    doc = detail.pop("result", {}) or {}
    phases = {str(x["name"]): x["duration_s"] for x in doc.get("phases", [])}
    return {
        "user_wait_s": wait_s,
        "command_s": detail.get("command_exited_s"),
        "ttfc_s": doc.get("time_to_first_completion_s"),
        "criu_restore": doc.get("criu_restore"),
        "agent": agent,
        "held": hold,
        "phases": phases,
        "gpu": doc.get("gpu"),
        **_load_figures(doc.get("gpu"), phases.get("load_weights"), h2d),
        **detail,
    }


def _sweep(m: Model, h2d: float | None) -> dict[str, Any]:
    """The loader's threads and chunk size in a restored server (warm): the same weights
    reloaded through the worker extension, SWEEP_REPS times per setting."""
    from fastvllm import api
    from fastvllm.runtime import manifest, worker_rpc

    assert m.snap is not None
    first = _restore(m, "c", False, h2d, keep=True)
    server = first.pop("server")
    weights = str(m.snap / str(manifest.load(m.snap).weights_file))
    rows = []
    try:
        for setting in SWEEP_GRID:
            got, waits = [], []
            holding = _holding(Path(weights)) if setting.get("held") == HELD else contextlib.nullcontext("")
            with holding as sock:
                args = worker_rpc.ReloadArgs(weights, **{**setting, **({"held": sock} if sock else {})})
                for _ in range(SWEEP_REPS):
                    replies = worker_rpc.reload(server, args)
                    got.append(min(x.gbps for x in replies))
                    waits.append(_load_figures({"load": [x.as_dict() for x in replies]}, None, None))
            row = {"chunk_mib": 8, **setting, "gbps": [round(g, 2) for g in got]}
            if h2d:
                row["best_pct_of_pinned_bound"] = round(100 * max(got) / h2d, 1)
            for key in ("load_wait_reads_s", "load_wait_buffers_s", "load_first_copy_s", "load_drain_s"):
                row[key.removeprefix("load_")] = [w.get(key) for w in waits]
            rows.append(row)
            _say(f"  sweep {m.name} {setting}: {row['gbps']} GB/s")
    finally:
        api.stop(server.pid)
    return {"restore": first, "rows": rows}


def _snapshot(m: Model, work: Path, port: int, extra_args: list[str]) -> None:
    from fastvllm import api
    from fastvllm.runtime import manifest

    kept = work / f"{m.name}-sleep2"
    if (kept / "manifest.json").is_file():  # --snapshots: taken by an earlier run on this machine
        mf = manifest.load(kept)
        m.snap, m.served = kept, mf.server.served_model_name
        m.doc["reused_snapshot"] = str(kept)
        m.doc["cold_start_s"] = mf.timings.get("cold_start_to_first_completion_s")
        m.doc["vllm_args"] = list(mf.server.vllm_args)
        m.doc["breakdown"] = _gpu_breakdown(kept)
        m.sizes.image_gb = mf.image_bytes / 1e9
        _say(f"{m.name}: the snapshot in {kept} (cold start {m.doc['cold_start_s']} s when it was taken)")
        return
    s2 = api.snapshot(
        str(m.model_dir), work / f"{m.name}-sleep2", vllm_args=_vllm_args(m.name, extra_args), port=port
    )
    m.snap = s2.path
    m.served = s2.manifest.server.served_model_name
    m.doc["cold_start_s"] = s2.cold_start_s
    m.doc["vllm_args"] = _vllm_args(m.name, extra_args)
    m.doc["snapshot_sleep2"] = {"image_bytes": s2.manifest.image_bytes, "phases": s2.timeline.durations()}
    m.doc["breakdown"] = _gpu_breakdown(s2.path)
    m.sizes.image_gb = s2.manifest.image_bytes / 1e9
    _say(
        f"{m.name}: cold start {s2.cold_start_s:.1f} s; sleep-2 image {s2.manifest.image_bytes / 1e9:.2f} GB"
    )
    _say(f"{m.name}: breakdown " + json.dumps(m.doc["breakdown"]))


def _run_step(step: Step, m: Model, doc: dict[str, Any], work: Path, a: argparse.Namespace) -> None:
    from fastvllm.runtime import manifest

    h2d = doc.get("bounds", {}).get("pinned_h2d_gbps")
    if step.kind is StepKind.SNAPSHOT:
        _snapshot(m, work, a.port, a.extra_args)
        return
    if m.snap is None:
        raise RuntimeError(f"no snapshot of {m.name}")
    if step.kind is StepKind.BOUNDS:
        doc["bounds"] = _bounds(m.snap / str(manifest.load(m.snap).weights_file))
        _say(f"bounds {doc['bounds']}")
        return
    runs = m.doc.setdefault("runs", {})
    if step.kind is StepKind.SWEEP:
        m.doc["loader_sweep"] = _sweep(m, h2d)
        return
    if step.kind is StepKind.PRIME:  # the first restore on a host: learns the hot set the timed ones read
        res = _restore(m, "c", True, h2d)
        runs.setdefault("prime/cold", []).append(res)
        _say(f"{m.name} prime (cold, learns the hot set): {res['ttfc_s']:.2f} s {res['phases']}")
        return
    cold = step.cond == "cold"
    if step.variant.startswith(("cli", "agent")):
        mode = step.variant.split("-", 1)[1] if step.variant.startswith("cli-") else None
        agent = step.variant.startswith("agent")
        res = _restore_cli(m, cold, mode, h2d, agent=agent, hold=step.variant == "agent-held")
        _say(f"{m.name} rep {step.rep} {step.key}: user waits {res['user_wait_s']:.2f} s {res['phases']}")
    else:
        res = _restore(m, step.variant, cold, h2d)
        _say(
            f"{m.name} rep {step.rep} {step.key}: {res['ttfc_s']:.2f} s {res['phases']} gpu={res.get('gpu')}"
        )
    runs.setdefault(step.key, []).append(res)


def _model_dirs(spec: str, names: list[str]) -> dict[str, str]:
    """`--model-dir`: NAME=DIR pairs, comma-separated; a bare DIR is the first model's."""
    out: dict[str, str] = {}
    for part in (p for p in spec.split(",") if p):
        name, sep, d = part.partition("=")
        if sep:
            out[name] = d
        elif names:
            out[names[0]] = part
    return out


def _sizes(name: str, model_dir: Path) -> Sizes:
    from fastvllm.runtime import tiny_model

    if name in tiny_model.SIZES:
        return Sizes(tiny_model.weight_bytes(tiny_model.config(name)) / 1e9)
    return Sizes(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9)


def _models(a: argparse.Namespace, work: Path, errors: list[dict[str, Any]]) -> list[Model]:
    """The models to run, made where they are built-in sizes; one that cannot be made is an
    error in the results, not the end of the run."""
    from fastvllm.runtime import tiny_model

    names = [n for n in a.model.split(",") if n]
    given = _model_dirs(a.model_dir, names)
    out = []
    for n in names:
        if n in tiny_model.SIZES:  # made there earlier (then a no-op) or now
            t = time.perf_counter()
            try:
                d = Path(tiny_model.make_tiny(Path(given.get(n) or work / f"model-{n}"), size=n))
            except Exception as e:
                errors.append({"step": f"{n} make", "error": repr(e), "tb": traceback.format_exc()})
                continue
            _say(f"{n} model in {d} ({time.perf_counter() - t:.1f} s)")
        else:
            d = Path(given.get(n, n))
        out.append(Model(n, d, _sizes(n, d)))
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from fastvllm.runtime import criu, cuda_checkpoint, vllm_server

    t_start = time.monotonic()
    if a.snapshots is not None:  # kept for a later run on the same machine (and reused from one)
        work = a.snapshots
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="fastvllm-gpu-restore-", dir="/var/tmp"))
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "gpu-restore",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": (g.as_dict() if (g := cuda_checkpoint.gpu_identity()) else None),
        "vllm": vllm_server.vllm_version(),
        "criu": str(criu.find_criu().path),
        "reps": a.reps,
        "budget_s": a.budget_s,
        "models": {},
        "errors": [],
        "skipped": [],
    }

    def save() -> None:
        doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
        (out / "gpu_restore.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    models = {m.name: m for m in _models(a, work, doc["errors"])}
    if not models:
        save()
        return doc
    for m in models.values():
        doc["models"][m.name] = m.doc
        m.doc["model_dir"] = str(m.model_dir)
        m.doc["weights_gb"] = round(m.sizes.weights_gb, 2)
    variants = set(a.variants.split(",")) if a.variants else None
    steps = plan(list(models), reps=a.reps, variants=variants, conditions=set(a.conditions.split(",")))
    doc["plan"] = [f"{s.model} {s.key} rep {s.rep}" for s in steps]
    deadline = t_start + a.budget_s
    for step in steps:
        m = models[step.model]
        label = f"{step.model} {step.key} rep {step.rep}"
        est = estimate_s(step, m.sizes, doc.get("bounds", {}).get("disk_cold_read_gbps") or 1.8)
        why = skip_reason(step, m.snap is not None, est, deadline - time.monotonic())
        if why:
            doc["skipped"].append({"step": label, "why": why})
            continue
        try:
            _run_step(step, m, doc, work, a)
        except Exception as e:  # one failed step must not lose the others' figures
            doc["errors"].append({"step": label, "error": repr(e), "tb": traceback.format_exc()})
            _say(f"{label}: FAILED {e!r}")
        summarise(doc)
        save()
    summarise(doc)
    save()
    chart(doc, out / "gpu_restore.png")
    return doc


def _median(runs: list[dict[str, Any]], field_name: str) -> float | None:
    vals = [float(r[field_name]) for r in runs if r.get(field_name) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(doc: dict[str, Any]) -> None:
    """Per model: medians per variant and phase, the cold disk bound, and the figures issue 22's
    acceptance names (as a user waits, against (b), the cold start and the disk bound)."""
    b = doc.get("bounds", {})
    for md in doc.get("models", {}).values():
        med: dict[str, float | None] = {}
        phases: dict[str, dict[str, float]] = {}
        for k, v in md.get("runs", {}).items():
            as_user_waits = k.startswith(("cli", "agent"))  # the rest are in-process restores
            med[k] = _median(v, "user_wait_s" if as_user_waits else "ttfc_s")
            names = {p for r in v for p in r.get("phases", {})}
            phases[k] = {
                p: round(statistics.median(r["phases"].get(p, 0.0) for r in v), 3) for p in sorted(names)
            }
        md["median_s"] = med
        md["median_phases_s"] = phases
        # as a user waits: the command's start-up, the restore, the client's own answer
        md["user_wait_split_s"] = {
            k: {f: _median(v, f) for f in ("command_start_s", "ttfc_s", "after_gate_s")}
            for k, v in md.get("runs", {}).items()
            if k.startswith(("cli", "agent"))
        }
        bd = md.get("breakdown", {})
        if b.get("disk_cold_read_gbps") and bd:
            # a cold restore must read at least the image and the weights once
            need = (bd.get("image_bytes", 0) + bd.get("weights_bytes", 0)) / 1e9
            md["cold_disk_bound_s"] = round(need / b["disk_cold_read_gbps"], 3)
        md["acceptance"] = _acceptance(md)


def _acceptance(md: dict[str, Any]) -> dict[str, Any]:
    med = md.get("median_s", {})
    warm, cold = med.get("cli/warm"), med.get("cli/cold")
    c, bw = med.get("c/warm"), med.get("b/warm")
    out: dict[str, Any] = {"user_wait_warm_s": warm, "user_wait_cold_s": cold}
    if med.get("agent/warm"):  # the same command with `fastvllm agent` running
        out["user_wait_warm_through_agent_s"] = med["agent/warm"]
    if med.get("agent-held/warm"):  # and holding the weights in pinned memory (`--hold`)
        out["user_wait_warm_through_agent_holding_s"] = med["agent-held/warm"]
    if cold and md.get("cold_disk_bound_s"):
        out["cold_x_disk_bound"] = round(cold / md["cold_disk_bound_s"], 2)
    if c and bw:
        out["b_over_c_warm_in_process"] = round(bw / c, 2)
    if warm and bw:
        out["b_in_process_over_c_as_user_waits"] = round(bw / warm, 2)
    if warm and md.get("cold_start_s"):
        out["cold_start_over_user_wait_warm"] = round(md["cold_start_s"] / warm, 1)
    pct = [
        r.get("load_pct_of_pinned_bound")
        for k in ("c/warm", "cli/warm")
        for r in md.get("runs", {}).get(k, [])
    ]
    if any(p is not None for p in pct):
        out["load_pct_of_pinned_bound_warm"] = statistics.median(p for p in pct if p is not None)
    held_pct = [
        r.get("load_pct_of_pinned_bound")
        for k in ("c-held/warm", "agent-held/warm")
        for r in md.get("runs", {}).get(k, [])
        if r.get("load_pool") == "held"
    ]
    if any(p is not None for p in held_pct):  # the load out of weights held in pinned memory
        out["load_pct_of_pinned_bound_warm_held"] = statistics.median(p for p in held_pct if p is not None)
    return out


CHART_BARS = [
    ("cold start", "cold_start"),
    ("(b) warm, in-process", "b/warm"),
    ("(c) warm, in-process", "c/warm"),
    ("(c) warm, as a user waits", "cli/warm"),
    ("(c) cold, as a user waits", "cli/cold"),
    ("disk bound (cold)", "disk_bound"),
]


def chart_values(md: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, seconds) of the bars a model has figures for, in CHART_BARS' order."""
    out = []
    for label, key in CHART_BARS:
        if key == "cold_start":
            v = md.get("cold_start_s")
        elif key == "disk_bound":
            v = md.get("cold_disk_bound_s")
        else:
            v = md.get("median_s", {}).get(key)
        if v:
            out.append((label, float(v)))
    return out


def chart(doc: dict[str, Any], path: Path) -> bool:
    """A PNG: per model, the cold start against the restores (log scale). matplotlib is
    imported here, only for this; without it there is no chart (said, not raised)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("no matplotlib: no chart")
        return False
    models = [(n, chart_values(md)) for n, md in doc.get("models", {}).items()]
    models = [(n, v) for n, v in models if v]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, vals) in zip(axes[0], models, strict=True):
        labels, secs = zip(*vals, strict=True)
        bars = ax.bar(
            range(len(secs)), secs, color=["#888", "#c66", "#69c", "#36a", "#7a5", "#bbb"][: len(secs)]
        )
        ax.set_yscale("log")
        ax.set_xticks(range(len(secs)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds to first completion")
        ax.set_title(f"{name}: {(doc.get('gpu') or {}).get('model', '')} {doc.get('date', '')}")
        for bar, s in zip(bars, secs, strict=True):
            ax.annotate(
                f"{s:.2f}", (bar.get_x() + bar.get_width() / 2, s), ha="center", va="bottom", fontsize=8
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _run_and_clean(a: argparse.Namespace) -> dict[str, Any]:
    """The work directory holds the snapshots (tens of GB): it goes, whatever happens, and so do
    the weight store's links to their weight files once nothing else uses them."""
    from fastvllm.weights import store

    before = set(Path("/var/tmp").glob("fastvllm-gpu-restore-*"))
    stored = set(store.store_dir().glob(f"*{store.SUFFIX}")) if store.store_dir().is_dir() else set()
    try:
        return run(a)
    finally:
        for d in set(Path("/var/tmp").glob("fastvllm-gpu-restore-*")) - before:
            shutil.rmtree(d, ignore_errors=True)
        if store.store_dir().is_dir():
            for f in set(store.store_dir().glob(f"*{store.SUFFIX}")) - stored:
                if f.stat().st_nlink == 1:
                    f.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="3b", help="comma-separated: tiny, small, 3b, 8b (made here) or directories"
    )
    ap.add_argument(
        "--model-dir", default="", help="models made earlier: NAME=DIR,... (a bare DIR: the first)"
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--variants", default=VARIANTS, help="which restores, comma-separated")
    ap.add_argument("--conditions", default="warm,cold")
    ap.add_argument("--budget-s", type=float, default=1e9, help="drop the steps that no longer fit in this")
    ap.add_argument("--out", type=Path, default=Path("results/gpu-restore"))
    ap.add_argument("--vllm-args", default=None, help="vLLM's arguments instead of the GPU ones")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs)")
    ap.add_argument("--chart-from", type=Path, help="only (re)draw the chart of a results JSON, beside it")
    ap.add_argument(
        "--snapshots",
        type=Path,
        help="keep the snapshots in this directory, and restore those an earlier run left there "
        "instead of taking them again (no cold start then: its figure is the earlier one)",
    )
    a = ap.parse_args(argv)
    if a.chart_from:  # e.g. a run cut off by its call's limit before it drew its chart
        doc = json.loads(a.chart_from.read_text())
        summarise(doc)
        chart(doc, a.chart_from.with_suffix(".png"))
        return
    a.extra_args = ["--enforce-eager"] if a.eager else []
    if a.vllm_args is not None:  # e.g. a smoke run of the flow on a CPU host
        BASE_ARGS[:] = shlex.split(a.vllm_args)
        GPU_UTIL.clear()
    doc = _run_and_clean(a)
    print(json.dumps({n: md.get("acceptance") for n, md in doc.get("models", {}).items()}, indent=2))


if __name__ == "__main__":
    main()
