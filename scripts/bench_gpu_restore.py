"""GPU restore of a real vLLM server, against its cold start, on one model in one run:

- cold start: launch -> first completion (vLLM as a user runs it);
- (a) full image: sleep level 0, weights and KV cache inside the CUDA checkpoint and the CRIU
  image; restored with fastvllm's defaults;
- (b) sleep level 2 + vLLM's own `reload_weights` from the model directory (what vLLM's
  built-in snapshot does), no read-ahead and no checksums;
- (c) sleep level 2 + fastvllm's loader from the weight file, read-ahead overlapped, CRIU
  restore in fastvllm's default mode (mmap with the patched CRIU: patches/criu);
- (c-copy) the same as (c) with CRIU's copy restore, to show what the mapping adds.

(a) and (b) restore with CRIU's copy mode, as stock CRIU (and vLLM's own snapshot) does.

Each restore is timed to its first completion (the canary, which must match), page cache warm
(files read just before) and cold (dropped; in a VM only the guest's cache). One launch serves
both snapshots (sleep 2 with --leave-running, then sleep 0 of the same server).

    python -m fastvllm.scripts.bench_gpu_restore --model 3b --reps 2 --out results/gpu-restore
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from fastvllm.prefetch import warm
from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
from fastvllm.runtime import criu, cuda_checkpoint, manifest, system, vllm_server
from fastvllm.runtime.tiny_model import make_tiny

from fastvllm import api

# A fifth of the GPU: the sleep-0 image holds the KV cache too, and the disk there is 64 GB.
# CUDA graphs on, as vLLM serves by default (the H200 figures of 2026-11-21 were taken with
# --enforce-eager: its 24-token canary then took 0.6-0.9 s of the restore; `--eager` repeats that).
GPU_ARGS = ["--attention-backend", "FLASH_ATTN", "--max-model-len", "1024"]
GPU_ARGS += ["--gpu-memory-utilization", "0.2"]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _restore(snap: Path, variant: str, cold: bool, model_dir: Path) -> dict[str, Any]:
    files = [snap / f.path for f in manifest.load(snap).files]
    system.drop_page_cache()
    if not cold:
        warm.warm(files + (sorted(model_dir.glob("*.safetensors")) if variant == "b" else []))
    opts = RestoreOptions(snap)
    opts.criu_restore = "auto" if variant == "c" else "copy"
    if variant == "b":
        opts.prefetch = opts.verify = False
        opts.reloader = "vllm"
    r = restore_snapshot(opts)
    try:
        return {
            "ttfc_s": r.time_to_first_completion_s,
            "criu_restore": r.criu_restore,
            "phases": r.timeline.durations(),
        }
    finally:
        api.stop(r.server.pid)


def run(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fastvllm-gpu-restore-", dir="/var/tmp"))
    model_dir = (
        Path(make_tiny(work / "model", size=a.model)) if a.model in ("tiny", "small", "3b") else Path(a.model)
    )
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

    def save() -> None:
        (out / "gpu_restore.json").write_text(json.dumps(doc, indent=2) + "\n")

    _say(f"model {model_dir}; launching vLLM and taking the sleep-2 snapshot (leave running)")
    s2 = api.snapshot(str(model_dir), work / "sleep2", vllm_args=GPU_ARGS, leave_running=True, port=a.port)
    doc["cold_start_s"] = s2.cold_start_s
    doc["snapshot_sleep2"] = {"image_bytes": s2.manifest.image_bytes, "phases": s2.timeline.durations()}
    _say(f"cold start {s2.cold_start_s:.1f} s; sleep-2 image {s2.manifest.image_bytes / 1e9:.2f} GB")
    assert s2.server is not None
    s0 = api.snapshot(out=work / "sleep0", pid=s2.server.pid, sleep_level=0)
    doc["snapshot_sleep0"] = {"image_bytes": s0.manifest.image_bytes, "phases": s0.timeline.durations()}
    _say(f"sleep-0 image {s0.manifest.image_bytes / 1e9:.2f} GB")
    save()
    snaps = {"a": s0.path, "b": s2.path, "c": s2.path, "c-copy": s2.path}
    for rep in range(1, a.reps + 1):
        for cond in ("warm", "cold"):
            for v in a.variants.split(","):
                key = f"{v}/{cond}"
                try:
                    res = _restore(snaps[v], v, cond == "cold", model_dir)
                    doc["runs"].setdefault(key, []).append(res)
                    _say(f"rep {rep} {key}: {res['ttfc_s']:.2f} s {res['phases']}")
                except Exception as e:  # one failed variant must not lose the others' figures
                    doc["errors"].append(
                        {"key": key, "rep": rep, "error": repr(e), "tb": traceback.format_exc()}
                    )
                    _say(f"rep {rep} {key}: FAILED {e!r}")
                save()
    doc["median_ttfc_s"] = {
        k: round(statistics.median(r["ttfc_s"] for r in v), 3) for k, v in doc["runs"].items()
    }
    doc["median_phases_s"] = {
        k: {p: round(statistics.median(r["phases"].get(p, 0.0) for r in v), 3) for p in v[0]["phases"]}
        for k, v in doc["runs"].items()
    }
    save()
    return doc


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
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--variants", default="a,b,c,c-copy", help="which restores, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("results/gpu-restore"))
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs), as before")
    a = ap.parse_args(argv)
    if a.eager:
        GPU_ARGS.append("--enforce-eager")
    doc = _run_and_clean(a)
    print(json.dumps(doc.get("median_ttfc_s"), indent=2))


if __name__ == "__main__":
    main()
