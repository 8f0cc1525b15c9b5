"""Refilling a sleeping vLLM server's weights on GPU: vLLM's own `reload_weights` against
fastvllm's loader (`fastvllm_reload`: pinned double buffers, side stream), same server, same
run, cold and warm page cache. Every cycle is sleep(level=2) -> wake_up(weights) -> reload ->
wake_up(kv_cache) -> canary, and the canary's token ids must equal those before the first
sleep (else the run fails). Medians go to JSON and a PNG chart.

    python -m fastvllm.scripts.bench_gpu_reload --model 3b --reps 3

Needs an NVIDIA GPU and a vLLM built for it (0.24 known to work); the server is started with
--enable-sleep-mode and fastvllm's worker extension.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastvllm.runtime import instances, proctree, system, vllm_server, worker_rpc
from fastvllm.runtime.tiny_model import resolve_model

GPU_ARGS = ["--enable-sleep-mode", "--enforce-eager", "--max-model-len", "1024"]


def _read_through(paths: list[Path]) -> None:
    """Pull files into the page cache (the warm condition): a cold O_DIRECT load leaves them out."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(_BUF):
                pass


_BUF = bytearray(64 << 20)


def _cycle(
    server: vllm_server.Server, name: str, method: str, weights: Path, model_dir: Path, cold: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    vllm_server.sleep(server, 2)
    t_sleep = time.perf_counter() - t0
    if cold:
        system.drop_page_cache()
    else:
        _read_through([weights, *sorted(model_dir.glob("*.safetensors"))])
    t1 = time.perf_counter()
    vllm_server.wake_up(server, "weights")
    t2 = time.perf_counter()
    detail: dict[str, Any] | None = None
    if method == "fastvllm":
        detail = worker_rpc.reload(server, worker_rpc.ReloadArgs(str(weights)))[0].as_dict()
    else:
        worker_rpc.vllm_reload_weights(server)
    t3 = time.perf_counter()
    vllm_server.wake_up(server, "kv_cache")
    t4 = time.perf_counter()
    c = vllm_server.complete(server, name, vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS)
    t5 = time.perf_counter()
    return {
        "sleep_s": t_sleep,
        "wake_weights_s": t2 - t1,
        "reload_s": t3 - t2,
        "wake_kv_s": t4 - t3,
        "first_completion_s": t5 - t4,
        "wake_to_completion_s": t5 - t1,
        "tokens": c.token_ids,
        "detail": detail,
    }


def run(model: str, reps: int, port: int, out: Path, extra: list[str]) -> dict[str, Any]:
    import torch

    model_dir = resolve_model(model)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-gpu-reload-", dir="/var/tmp"))
    weights = work / "model.fvw"
    spec = vllm_server.LaunchSpec(model_dir, port, extra_args=[*GPU_ARGS, *extra], worker_extension=True)
    system.ensure_io_uring_disabled()
    proctree.adopt_orphans()
    t0 = time.perf_counter()
    server = vllm_server.launch(spec, work / "server.log")
    doc: dict[str, Any] = {"model": model_dir, "reps": reps, "vllm_args": spec.extra_args}
    try:
        vllm_server.wait_healthy(server, 900.0, alive=lambda: proctree.alive(server.pid))
        name = vllm_server.served_model_name(server)
        doc["launch_to_healthy_s"] = time.perf_counter() - t0
        want = vllm_server.complete(server, name, vllm_server.CANARY_PROMPT, vllm_server.CANARY_MAX_TOKENS)
        t = time.perf_counter()
        dump = worker_rpc.dump_weights(server, weights)
        doc["dump"] = {**dump[0].as_dict(), "wall_s": time.perf_counter() - t}
        print(f"[gpu-reload] healthy in {doc['launch_to_healthy_s']:.1f} s; dumped {dump[0]}", flush=True)
        rows: dict[str, list[dict[str, Any]]] = {}
        for rep in range(reps):
            for cold in (True, False):
                for method in ("vllm_reload_weights", "fastvllm"):
                    key = f"{method}/{'cold' if cold else 'warm'}"
                    r = _cycle(server, name, method, weights, Path(model_dir), cold)
                    if r["tokens"] != want.token_ids:
                        raise RuntimeError(f"{key}: canary tokens differ after reload (rep {rep})")
                    r.pop("tokens")
                    rows.setdefault(key, []).append(r)
                    print(f"[gpu-reload] rep {rep} {key}: reload {r['reload_s']:.3f} s, "
                          f"wake->completion {r['wake_to_completion_s']:.3f} s", flush=True)  # fmt: skip
        size = dump[0].bytes
        doc["weight_file_bytes"] = size
        doc["results"] = {
            k: {
                "reload_s_median": statistics.median(x["reload_s"] for x in v),
                "wake_to_completion_s_median": statistics.median(x["wake_to_completion_s"] for x in v),
                "reload_gbps_median": size / statistics.median(x["reload_s"] for x in v) / 1e9,
                "runs": v,
            }
            for k, v in rows.items()
        }
        doc["canary_identical"] = True
    finally:
        instances.stop(server.pid)
    doc["machine"] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kernel": platform.release(),
        "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_reload.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _chart(doc, out / "gpu_reload.png")
    return doc


def _chart(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["results"])
    vals = [doc["results"][k]["reload_s_median"] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(keys, vals, color=["#999" if k.startswith("vllm") else "#2a7" for k in keys])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f} s", va="center")
    ax.set_xlabel("weight reload after sleep(level=2), median seconds")
    ax.set_title(
        f"{Path(doc['model']).name}: {doc['weight_file_bytes'] / 1e9:.1f} GB, {doc['machine']['gpu']}"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3b", help="model directory, or tiny / small / 3b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=18751)
    ap.add_argument("--out", type=Path, default=Path("results/gpu-reload"))
    a, extra = ap.parse_known_args(argv)
    doc = run(a.model, a.reps, a.port, a.out, extra)
    for k, v in doc["results"].items():
        print(f"{k:28s} reload {v['reload_s_median']:.3f} s ({v['reload_gbps_median']:.1f} GB/s), "
              f"wake->completion {v['wake_to_completion_s_median']:.3f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
