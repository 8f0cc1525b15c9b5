"""GPU restore of a real vLLM server, against its cold start, on one model in one run, with the
breakdown issue 22 asks for: where a GPU restore's time goes, process by process and phase by
phase.

What it measures:

- bounds of the machine: pinned host-to-device copy (GB/s, one 1 GiB copy in a fresh CUDA
  process) and the disk's parallel cold read (the snapshot's weight file after a cache drop);
- cold start: launch -> first completion (vLLM as a user runs it), then a sleep-2 snapshot of the
  same server: its phases, and per checkpointed process what the CUDA checkpoint moved (device
  memory, the host copy's bytes and address ranges), the worker's device memory by kind before
  and after its allocator cache was released, and the CRIU image split per process into CPU
  memory and the CUDA checkpoint's host copy of device memory;
- restores of that snapshot, page cache warm (files read just before) and cold (dropped; in a
  VM only the guest's cache), in these variants:
  - `b`: sleep 2 + vLLM's own `reload_weights` from the model directory (what vLLM's built-in
    snapshot does), CRIU in copy mode (as stock CRIU), no read-ahead, no checksums;
  - `copy`, `mmap`: fastvllm's restore with CRIU in that mode;
  - `mmap-old`: mmap mode without the read-ahead of the CUDA checkpoint's host copy (the restore
    before issue 22: the CUDA restore faults that copy in page by page);
  - `copy-serial`: copy mode with the tree's CUDA restores one after the other (before issue 22);
  - `a`: sleep level 0 (weights and KV cache in the image; a second, 30 GB snapshot);
  - `cli`: `fastvllm restore` with its defaults, spawned as a user runs it, timed from the spawn
    to the first completion answered to a separate client (the headline), beside its own
    in-process figure; `cli-copy`, `cli-mmap`: the same with `--criu-restore copy|mmap`.
  Before the timed runs, one cold mmap restore learns the snapshot's hot set (`prime`), as a
  host's first restore does; it is reported as the first restore on a host.
  Each in-process restore records its phases, the CUDA restore and unlock of each process, the
  weight load (GB/s and % of the pinned bound) and the read-ahead's figures.

    python -m fastvllm.scripts.bench_gpu_restore --model 3b --reps 2 --out results/gpu-restore
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastvllm.prefetch import warm
from fastvllm.restore import readahead
from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
from fastvllm.runtime import criu, criu_images, cuda_checkpoint, manifest, proctree, system, vllm_server
from fastvllm.runtime.tiny_model import make_tiny

from fastvllm import api

# A fifth of the GPU: the sleep-0 image holds the KV cache too, and the disk there is 64 GB.
# CUDA graphs on, as vLLM serves by default (the H200 figures of 2026-11-21 were taken with
# --enforce-eager: its 24-token canary then took 0.6-0.9 s of the restore; `--eager` repeats that).
GPU_ARGS = ["--attention-backend", "FLASH_ATTN", "--max-model-len", "1024"]
GPU_ARGS += ["--gpu-memory-utilization", "0.2"]
VARIANTS = "mmap,copy,b,mmap-old,copy-serial,cli-copy,cli-mmap"
PROMPT = "A separate client asks the restored server:"

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


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _bounds(weights: Path) -> dict[str, Any]:
    """The machine's bounds for a restore: pinned host-to-device bandwidth (a fresh process, as
    the restored worker is) and the disk's parallel cold read of the weight file."""
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
    return out


def _gpu_breakdown(snap: Path) -> dict[str, Any]:
    """The snapshot's image split per process (CPU memory / the CUDA checkpoint's host copy),
    and what the checkpoint moved, as the snapshot recorded it."""
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


def _prepare(snap: Path, cold: bool, extra: list[Path]) -> None:
    files = [snap / f.path for f in manifest.load(snap).files]
    system.drop_page_cache()
    if not cold:
        warm.warm(files + extra)


def _client_completion(url: str, model: str) -> float:
    """One completion from a client of its own (not the restore's process); returns when it is
    answered."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
    with httpx.Client(timeout=120.0) as c:
        r = c.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter()


def _restore(snap: Path, variant: str, cold: bool, model_dir: Path, h2d: float | None) -> dict[str, Any]:
    _prepare(snap, cold, sorted(model_dir.glob("*.safetensors")) if variant == "b" else [])
    opts = RestoreOptions(snap)
    opts.criu_restore = "mmap" if variant.startswith("mmap") else "copy"
    if variant == "b":
        opts.prefetch = opts.verify = False
        opts.reloader = "vllm"
    undo: list[Callable[[], None]] = []
    if variant == "mmap-old":  # no read-ahead of the host copy: what the restore did before
        saved = readahead.gpu_host_copy
        readahead.gpu_host_copy = lambda _root, _m: []  # type: ignore[assignment]
        undo.append(lambda: setattr(readahead, "gpu_host_copy", saved))
    if variant == "copy-serial":  # the tree's CUDA restores one after the other, as before
        resume = cuda_checkpoint.resume
        cuda_checkpoint.resume = lambda pids, **_kw: resume(pids, parallel=False)  # type: ignore[assignment]
        undo.append(lambda: setattr(cuda_checkpoint, "resume", resume))
    try:
        r = restore_snapshot(opts)
    finally:
        for u in undo:
            u()
    try:
        out: dict[str, Any] = {
            "ttfc_s": r.time_to_first_completion_s,
            "criu_restore": r.criu_restore,
            "phases": r.timeline.durations(),
            "readahead": r.readahead,
            "gpu": r.gpu,
        }
        loads = [x for x in (r.gpu or {}).get("load", []) or [] if isinstance(x, dict)]
        if loads:
            gbps = min(float(x.get("gbps", 0.0)) for x in loads)
            out["load_gbps"] = round(gbps, 2)
            if h2d:
                out["load_pct_of_pinned_bound"] = round(100 * gbps / h2d, 1)
            phase = r.timeline.durations().get("load_weights")
            nbytes = sum(int(x.get("bytes", 0)) for x in loads)
            if phase:
                out["load_phase_gbps"] = round(nbytes / phase / 1e9, 2)
        return out
    finally:
        api.stop(r.server.pid)


def _restore_cli(snap: Path, cold: bool, model: str, mode: str | None) -> dict[str, Any]:
    """`fastvllm restore` as a user runs it (defaults, or `--criu-restore mode`), timed to a
    separate client's answer."""
    _prepare(snap, cold, [])
    cmd = [sys.executable, "-m", "fastvllm.cli", "restore", str(snap), "--json"]
    if mode:
        cmd += ["--criu-restore", mode]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    t_cmd = time.perf_counter()
    if p.returncode != 0:
        raise RuntimeError(f"fastvllm restore exited {p.returncode}: {(p.stderr or p.stdout)[-800:]}")
    doc = json.loads(p.stdout[p.stdout.index("{") :])
    try:
        t1 = _client_completion(str(doc["url"]), model)
        return {
            "user_wait_s": t1 - t0,
            "command_s": t_cmd - t0,
            "ttfc_s": doc.get("time_to_first_completion_s"),
            "criu_restore": doc.get("criu_restore"),
            "phases": {str(x["name"]): x["duration_s"] for x in doc.get("phases", [])},
            "gpu": doc.get("gpu"),
        }
    finally:
        api.stop(int(doc["pid"]))
        # The tree's processes outlived the command that restored them: orphans, adopted by this
        # process (a subreaper, proctree.adopt_orphans). Reap them here, or the next `fastvllm
        # restore` waits for PIDs only this process can free (one rep failed so, 2026-12-06).
        proctree.wait_gone(manifest.load(snap).server.tree_pids, 30.0, reaped=True)


def run(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fastvllm-gpu-restore-", dir="/var/tmp"))
    if a.model_dir:
        model_dir = Path(a.model_dir)
    elif a.model in ("tiny", "small", "3b"):
        model_dir = Path(make_tiny(work / "model", size=a.model))
    else:
        model_dir = Path(a.model)
    doc: dict[str, Any] = {
        "benchmark": "gpu-restore",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": (g.as_dict() if (g := cuda_checkpoint.gpu_identity()) else None),
        "vllm": vllm_server.vllm_version(),
        "model": a.model,
        "vllm_args": GPU_ARGS,
        "criu": str(criu.find_criu().path),
        "reps": a.reps,
        "runs": {},
        "errors": [],
    }
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget_s

    def save() -> None:
        (out / "gpu_restore.json").write_text(json.dumps(doc, indent=2) + "\n")

    _say(f"model {model_dir}; launching vLLM and taking the sleep-2 snapshot")
    variants = [v for v in a.variants.split(",") if v]
    s2 = api.snapshot(
        str(model_dir), work / "sleep2", vllm_args=GPU_ARGS, leave_running="a" in variants, port=a.port
    )
    doc["cold_start_s"] = s2.cold_start_s
    doc["snapshot_sleep2"] = {"image_bytes": s2.manifest.image_bytes, "phases": s2.timeline.durations()}
    doc["breakdown"] = _gpu_breakdown(s2.path)
    _say(f"cold start {s2.cold_start_s:.1f} s; sleep-2 image {s2.manifest.image_bytes / 1e9:.2f} GB")
    _say("breakdown " + json.dumps(doc["breakdown"]))
    save()
    snaps = {v: s2.path for v in variants}
    if "a" in variants:
        assert s2.server is not None
        s0 = api.snapshot(out=work / "sleep0", pid=s2.server.pid, sleep_level=0)
        doc["snapshot_sleep0"] = {"image_bytes": s0.manifest.image_bytes, "phases": s0.timeline.durations()}
        snaps["a"] = s0.path
        _say(f"sleep-0 image {s0.manifest.image_bytes / 1e9:.2f} GB")
    doc["bounds"] = _bounds(s2.path / manifest.load(s2.path).weights_file)  # type: ignore[operator]
    _say(f"bounds {doc['bounds']}")
    save()
    h2d = doc["bounds"].get("pinned_h2d_gbps")
    model = s2.manifest.server.served_model_name
    try:  # the first restore on a host: learns the hot set the timed ones read
        res = _restore(s2.path, "mmap", True, model_dir, h2d)
        doc["runs"]["prime/cold-mmap"] = [res]
        _say(f"prime (cold mmap, learns the hot set): {res['ttfc_s']:.2f} s {res['phases']}")
    except Exception as e:
        doc["errors"].append({"key": "prime", "error": repr(e), "tb": traceback.format_exc()})
        _say(f"prime: FAILED {e!r}")
    save()
    for rep in range(1, a.reps + 1):
        for cond in a.conditions.split(","):
            for v in variants:
                key = f"{v}/{cond}"
                if time.monotonic() > deadline:
                    doc["errors"].append({"key": key, "rep": rep, "error": "skipped: out of time budget"})
                    continue
                if v == "mmap-old" and cond == "warm" and not a.all_warm:
                    continue  # the host copy's read-ahead changes nothing from a warm cache
                if v == "copy-serial" and cond == "cold" and not a.all_warm:
                    continue  # the driver's own time: the warm run says it
                try:
                    if v.startswith("cli"):
                        mode = v.split("-", 1)[1] if "-" in v else None
                        res = _restore_cli(snaps[v], cond == "cold", model, mode)
                        _say(f"rep {rep} {key}: user waits {res['user_wait_s']:.2f} s {res['phases']}")
                    else:
                        res = _restore(snaps[v], v, cond == "cold", model_dir, h2d)
                        _say(f"rep {rep} {key}: {res['ttfc_s']:.2f} s {res['phases']} gpu={res.get('gpu')}")
                    doc["runs"].setdefault(key, []).append(res)
                except Exception as e:  # one failed variant must not lose the others' figures
                    doc["errors"].append(
                        {"key": key, "rep": rep, "error": repr(e), "tb": traceback.format_exc()}
                    )
                    _say(f"rep {rep} {key}: FAILED {e!r}")
                save()
    _summarise(doc)
    save()
    return doc


def _summarise(doc: dict[str, Any]) -> None:
    med: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    for k, v in doc["runs"].items():
        field = "user_wait_s" if k.startswith("cli") else "ttfc_s"
        med[k] = round(statistics.median(float(r[field]) for r in v), 3)
        names = {p for r in v for p in r["phases"]}
        phases[k] = {
            p: round(statistics.median(r["phases"].get(p, 0.0) for r in v), 3) for p in sorted(names)
        }
    doc["median_s"] = med
    doc["median_phases_s"] = phases
    b = doc.get("bounds", {})
    bd = doc.get("breakdown", {})
    if b.get("disk_cold_read_gbps"):
        # a cold restore must read at least the image and the weights once (copy mode reads all)
        need = (bd.get("image_bytes", 0) + bd.get("weights_bytes", 0)) / 1e9
        doc["cold_disk_bound_s"] = round(need / b["disk_cold_read_gbps"], 3)


def _run_and_clean(a: argparse.Namespace) -> dict[str, Any]:
    """The work directory holds a 30 GB image: it goes, whatever happens."""
    before = set(Path("/var/tmp").glob("fastvllm-gpu-restore-*"))
    try:
        return run(a)
    finally:
        for d in set(Path("/var/tmp").glob("fastvllm-gpu-restore-*")) - before:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3b", help="tiny, small, 3b (made here) or a model directory")
    ap.add_argument("--model-dir", default="", help="a model directory made earlier (skips --model)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--variants", default=VARIANTS, help="which restores, comma-separated (and 'a')")
    ap.add_argument("--conditions", default="warm,cold")
    ap.add_argument("--all-warm", action="store_true", help="also mmap-old warm and copy-serial cold")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the restores left after this")
    ap.add_argument("--out", type=Path, default=Path("results/gpu-restore"))
    ap.add_argument("--vllm-args", default=None, help="vLLM's arguments instead of the GPU ones")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs), as before")
    a = ap.parse_args(argv)
    if a.vllm_args is not None:  # e.g. a smoke run of the flow on a CPU host
        GPU_ARGS[:] = shlex.split(a.vllm_args)
    if a.eager:
        GPU_ARGS.append("--enforce-eager")
    doc = _run_and_clean(a)
    print(json.dumps(doc.get("median_s"), indent=2))


if __name__ == "__main__":
    main()
