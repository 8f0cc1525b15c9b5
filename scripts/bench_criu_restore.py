"""CRIU restore modes side by side on the same snapshot of a sleeping vLLM server: `copy` (stock
CRIU reads every page), `mmap` (fastvllm's patched CRIU maps the page images copy-on-write) and
`lazy` (CRIU's userfaultfd restore with a `criu lazy-pages` daemon).

Each restore goes through fastvllm's restore pipeline (checksums read ahead beside CRIU, weight
reload, canary) and is timed twice: CRIU's restore alone, and restore start to the first
completion (the canary, which must match). Page cache warm (the snapshot's files read just
before, the libraries cached by the previous restores) and cold (all dropped; in a VM only the
guest's cache). Modes alternate within each repetition so that a drift of the machine's load
hits all of them alike.

    python -m fastvllm.scripts.bench_criu_restore --reps 5 --out results/criu-restore
    # GPU machine (sleeping server, sleep level 2; FASTVLLM_CRIU pointing at the patched CRIU):
    python -m fastvllm.scripts.bench_criu_restore --model 3b --gpu --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from fastvllm.prefetch import warm
from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
from fastvllm.runtime import criu, cuda_checkpoint, manifest, proctree, system, vllm_server
from fastvllm.runtime.tiny_model import make_tiny

from fastvllm import api

# As scripts/bench_gpu_restore.py runs vLLM on the GPU machine (DESIGN.md)
# CUDA graphs on, as vLLM serves by default (the H200 figures of 2026-11-21 were taken with
# --enforce-eager: its 24-token canary then took 0.6-0.9 s of the restore; `--eager` repeats that).
GPU_ARGS = ["--attention-backend", "FLASH_ATTN", "--max-model-len", "1024"]
GPU_ARGS += ["--gpu-memory-utilization", "0.2"]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _restore(snap: Path, mode: str, cold: bool) -> dict[str, Any]:
    files = [snap / f.path for f in manifest.load(snap).files]
    if cold:  # a cold host: the snapshot, Python, torch and vLLM's libraries all from disk
        system.drop_page_cache()
    else:  # a host that has run this server before: its libraries and the snapshot cached
        warm.warm(files)
    res = restore_snapshot(RestoreOptions(snap, criu_restore=mode))
    try:
        phases = res.timeline.durations()
        out = {"ttfc_s": res.time_to_first_completion_s, "criu_s": phases["criu_restore"], "phases": phases}
        if mode == "lazy":  # the daemon still pushes the remaining pages in the background
            logs = sorted((snap / "logs").glob("criu-restore-*.log"), key=lambda p: p.stat().st_mtime)
            t0 = time.monotonic()
            done = criu.wait_lazy_done(logs[-1], 120.0)
            out["lazy_rest_s"] = round(time.monotonic() - t0, 3) if done else None
        return out
    finally:
        tree = proctree.session_pids(res.server.pid)
        api.stop(res.server.pid)
        proctree.wait_gone(tree, 30.0, reaped=True)


def _chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = doc["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in (
        (axes[0], "criu_s", "CRIU restore"),
        (axes[1], "ttfc_s", "restore start to first completion"),
    ):
        width = 0.38
        for i, cache in enumerate(("warm", "cold")):
            vals = [doc["median"].get(f"{m}/{cache}", {}).get(metric, 0.0) for m in modes]
            xs = [j + (i - 0.5) * width for j in range(len(modes))]
            bars = ax.bar(xs, vals, width, label=f"{cache} page cache")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel("seconds (median)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"CRIU restore modes, {doc['model']} {'sleeping' if doc['sleeping'] else 'awake'} vLLM server, image "
        f"{doc['image_bytes'] / 1e9:.2f} GB ({doc['host']}, {doc['date']}, {doc['reps']} reps)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(a: argparse.Namespace) -> dict[str, Any]:
    found = criu.find_criu()
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        criu.resolve_mode(found, m)  # a mode this CRIU cannot run fails now, not after the launch
    work = Path(tempfile.mkdtemp(prefix="fastvllm-criu-restore-", dir="/var/tmp"))
    doc: dict[str, Any] = {
        "benchmark": "criu-restore-modes",
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{platform.node()}, {os.cpu_count()} cores",
        "criu": f"{found.version} at {found.path}",
        "gpu": (g.as_dict() if (g := cuda_checkpoint.gpu_identity()) else None),
        "vllm": vllm_server.vllm_version(),
        "model": a.model,
        "sleeping": not a.awake,
        "modes": modes,
        "reps": a.reps,
        "load_before": os.getloadavg(),
        "runs": {},
        "errors": [],
    }
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (a.out / "criu_restore.json").write_text(json.dumps(doc, indent=2) + "\n")

    if a.snapshot:
        snap = a.snapshot
    else:
        model = (
            Path(make_tiny(work / "model", size=a.model))
            if a.model in ("tiny", "small", "3b")
            else Path(a.model)
        )
        _say(f"launching vLLM on {model} and taking a {'awake' if a.awake else 'sleeping'} snapshot")
        s = api.snapshot(
            str(model), work / "snap", port=a.port, vllm_args=GPU_ARGS if a.gpu else [], sleep=not a.awake
        )
        doc["cold_start_s"] = s.cold_start_s
        snap = s.path
    m = manifest.load(snap)
    doc["image_bytes"] = m.image_bytes
    doc["snapshot_criu"] = m.identity.criu
    _say(f"snapshot {snap}: image {m.image_bytes / 1e9:.2f} GB; modes {modes}")
    caches = [c for c in ("warm", "cold") if c in a.cache.split(",")]
    for rep in range(1, a.reps + 1):
        for cache in caches:
            for mode in modes:
                key = f"{mode}/{cache}"
                try:
                    r = _restore(snap, mode, cache == "cold")
                    doc["runs"].setdefault(key, []).append(r)
                    _say(f"rep {rep} {key}: CRIU {r['criu_s']:.3f} s, first completion {r['ttfc_s']:.3f} s")
                except Exception as e:  # one failed mode must not lose the others' figures
                    doc["errors"].append(
                        {"key": key, "rep": rep, "error": repr(e), "tb": traceback.format_exc()}
                    )
                    _say(f"rep {rep} {key}: FAILED {e!r}")
                save()
    doc["load_after"] = os.getloadavg()
    doc["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    doc["median"] = {
        k: {
            "criu_s": round(statistics.median(r["criu_s"] for r in v), 3),
            "ttfc_s": round(statistics.median(r["ttfc_s"] for r in v), 3),
            "runs_criu_s": [round(r["criu_s"], 3) for r in v],
            "runs_ttfc_s": [round(r["ttfc_s"], 3) for r in v],
        }
        for k, v in doc["runs"].items()
    }
    ratios: dict[str, float] = {}
    for cache in caches:
        copy, mm = doc["median"].get(f"copy/{cache}"), doc["median"].get(f"mmap/{cache}")
        if copy and mm:
            ratios[f"criu copy/mmap {cache}"] = round(copy["criu_s"] / mm["criu_s"], 2)
            ratios[f"ttfc copy/mmap {cache}"] = round(copy["ttfc_s"] / mm["ttfc_s"], 2)
    doc["ratios"] = ratios
    save()
    _chart(doc, a.out / "criu_restore.png")
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, small, 3b (made here) or a model directory")
    ap.add_argument("--snapshot", type=Path, help="an existing snapshot to restore instead of taking one")
    ap.add_argument("--gpu", action="store_true", help="launch vLLM with the GPU machine's arguments")
    ap.add_argument(
        "--awake", action="store_true", help="snapshot without sleeping (weights and KV cache in the image)"
    )
    ap.add_argument("--modes", default="copy,mmap,lazy")
    ap.add_argument("--cache", default="warm,cold")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=Path("results/criu-restore"))
    ap.add_argument("--eager", action="store_true", help="with --gpu: --enforce-eager (no CUDA graphs)")
    a = ap.parse_args(argv)
    if a.eager:
        GPU_ARGS.append("--enforce-eager")
    before = set(Path("/var/tmp").glob("fastvllm-criu-restore-*"))
    try:
        doc = run(a)
    finally:  # the work directory holds the image (GBs): it goes, whatever happens
        for d in set(Path("/var/tmp").glob("fastvllm-criu-restore-*")) - before:
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"median": doc["median"], "ratios": doc["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
