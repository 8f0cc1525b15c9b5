"""Cold start against restore: time from launching vLLM to its first completion, against time
from `fastvllm restore` to the first completion, same model, same run, page cache dropped
before each repetition (when root). Medians and the ratio go to JSON and a PNG chart.

    python -m fastvllm.scripts.bench_coldstart --model tiny --reps 3
    fastvllm bench --reps 3                      # the same
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastvllm.runtime import instances, proctree, system, vllm_server
from fastvllm.runtime.tiny_model import resolve_model

from fastvllm import api


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def cold_start_once(model: str, port: int, log: Path) -> float:
    """Launch → healthy → first completion, as a user of plain vLLM waits for it."""
    system.ensure_io_uring_disabled()  # same launch conditions as a snapshotted server
    proctree.adopt_orphans()
    spec = vllm_server.LaunchSpec(model, port)
    t0 = time.perf_counter()
    server = vllm_server.launch(spec, log)
    try:
        vllm_server.wait_healthy(server, 900.0, alive=lambda: proctree.alive(server.pid))
        name = vllm_server.served_model_name(server)
        vllm_server.complete(server, name, vllm_server.CANARY_PROMPT, 8)
        return time.perf_counter() - t0
    finally:
        tree = proctree.session_pids(server.pid)
        instances.stop(server.pid)
        if server.proc is not None:
            server.proc.wait()
        proctree.wait_gone(tree, 30.0, reaped=True)


def run(model: str, reps: int, out: Path, port: int, quiet: bool = False) -> dict[str, Any]:
    model_path = resolve_model(model)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-bench-"))
    cold: list[float] = []
    restored: list[dict[str, Any]] = []
    dropped = True
    try:
        for i in range(reps):
            dropped &= system.drop_page_cache()
            t = cold_start_once(model_path, port, work / f"cold-{i}.log")
            cold.append(t)
            _say(quiet, f"cold start {i + 1}/{reps}: {t:.2f} s")
        _say(quiet, "taking the snapshot ...")
        snap = api.snapshot(model_path, work / "snapshot", port=port)
        for i in range(reps):
            dropped &= system.drop_page_cache()
            r = api.restore(snap.path)
            api.stop(r.server.pid)
            # (the first restore of a snapshot on a host learns its hot set: restore.hotset)
            ra = getattr(r, "readahead", None) or {}
            restored.append(
                {
                    "time_to_first_completion_s": r.time_to_first_completion_s,
                    **r.timeline.durations(),
                    "hot_set_read_bytes": ra.get("hot_bytes", 0),
                    "files_hashed": ra.get("hashed_files", 0),
                }
            )
            _say(quiet, f"restore {i + 1}/{reps}: {r.time_to_first_completion_s:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cold_med = statistics.median(cold)
    rest_med = statistics.median(r["time_to_first_completion_s"] for r in restored)
    phases = sorted({k for r in restored for k in r} - {"time_to_first_completion_s"})
    result: dict[str, Any] = {
        "benchmark": "coldstart",
        "date": time.strftime("%Y-%m-%d"),
        "host": {
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
            "kernel": system.kernel_release(),
            "vllm": vllm_server.vllm_version(),
        },
        "model": model_path,
        "reps": reps,
        "page_cache_dropped": dropped,
        "image_bytes": snap.manifest.image_bytes,
        "cold_start_s": cold,
        "restore": restored,
        "median_cold_start_s": round(cold_med, 3),
        "median_restore_s": round(rest_med, 3),
        # a phase some restores skip (the first one's learn_hot_set) is the median of those that ran it
        "median_restore_phases_s": {
            p: round(statistics.median(r[p] for r in restored if p in r), 3) for p in phases
        },
        "restore_over_cold": round(rest_med / cold_med, 4),
        "speedup": round(cold_med / rest_med, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "coldstart.json").write_text(json.dumps(result, indent=2) + "\n")
    _chart(result, out / "coldstart.png")
    _say(
        quiet,
        f"median cold start {cold_med:.2f} s, median restore {rest_med:.2f} s: "
        f"{result['speedup']}x ({out / 'coldstart.json'})",
    )
    return result


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = ["vLLM cold start", "fastvllm restore"]
    meds = [result["median_cold_start_s"], result["median_restore_s"]]
    bars = ax.barh(labels, meds, color=["#999999", "#2a7ab9"])
    runs = [result["cold_start_s"], [r["time_to_first_completion_s"] for r in result["restore"]]]
    for y, vals in enumerate(runs):
        ax.plot(vals, [y] * len(vals), "k.", alpha=0.6)
    for b, v, vals in zip(bars, meds, runs, strict=True):
        ax.text(max(v, *vals), b.get_y() + b.get_height() / 2, f"  {v:.2f} s", va="center")
    ax.set_xlabel("seconds to first completion (median; dots: each run)")
    ax.set_title(f"{Path(result['model']).name}: {result['speedup']}x faster, {result['date']}")
    ax.set_xlim(0, max(meds) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/coldstart"))
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()
    run(a.model, a.reps, a.out, a.port)


if __name__ == "__main__":
    main()
