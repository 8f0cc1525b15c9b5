"""What the CUDA driver's process restore costs, and what it scales with (issue 22, item 1).

The engine's CUDA restore is the largest phase of a warm GPU restore. This probe checkpoints and
restores processes in place (no CRIU: the driver's cost alone) and times
`cuCheckpointProcessRestore` against what the process holds: device memory, pinned host memory,
CUDA graphs, loaded kernels. Then the same on a real sleeping vLLM server, with and without the
loader's kept pinned pool, with CUDA graphs on and off. JSON to --out; run it on the GPU host
(`bash scripts/gpu/session.sh probe`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# One synthetic process: it allocates what its arguments say, prints "ready", then on each
# "check" line replays its graphs and prints the checksum (proves the restore kept it all).
CHILD = r"""
import sys, json, torch
cfg = json.loads(sys.argv[1])
torch.cuda.init()
keep = []
x = torch.ones(1 << 20, device="cuda")
if cfg.get("gb"):
    keep.append(torch.ones(int(cfg["gb"] * (1 << 30)) // 4, device="cuda"))
if cfg.get("pinned_mb"):
    keep += [torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(cfg["pinned_mb"] // 8)]
if cfg.get("blas"):
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16); (a @ a).sum().item()
graphs = []
if cfg.get("graphs"):
    a = torch.randn(64, 64, device="cuda")
    s = torch.cuda.Stream()
    pool = torch.cuda.graph_pool_handle()
    for i in range(cfg["graphs"]):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            b = a
            for _ in range(cfg.get("kernels", 10)):
                b = b * 1.0001 + 0.5
        graphs.append((g, b))
torch.cuda.synchronize()
print("ready", torch.cuda.memory_reserved(), flush=True)
for line in sys.stdin:
    for g, _ in graphs:
        g.replay()
    torch.cuda.synchronize()
    print("ok", float(x.sum()), len(graphs), flush=True)
"""

SYNTHETIC = [
    ("context only", {}),
    ("1.7 GB device memory", {"gb": 1.7}),
    ("4 GB device memory", {"gb": 4.0}),
    ("context + 117 MB pinned host", {"pinned_mb": 112}),
    ("context + cuBLAS", {"blas": True}),
    ("500 graphs x 20 kernels", {"graphs": 500, "kernels": 20}),
    ("2000 graphs x 20 kernels", {"graphs": 2000, "kernels": 20}),
    ("2000 graphs x 5 kernels", {"graphs": 2000, "kernels": 5}),
]


def _cycles(pids: list[int], reps: int) -> list[dict[str, Any]]:
    from fastvllm.runtime import cuda_checkpoint

    out = []
    for _ in range(reps):
        t = time.perf_counter()
        moved = cuda_checkpoint.suspend(pids)
        t1 = time.perf_counter()
        back = cuda_checkpoint.resume(pids)
        t2 = time.perf_counter()
        out.append(
            {
                "checkpoint_s": round(t1 - t, 4),
                "restore_unlock_s": round(t2 - t1, 4),
                "per_pid": back,
                "moved": {
                    p: {k: v for k, v in d.items() if k != "host_copy_ranges"} for p, d in moved.items()
                },
            }
        )
    return out


def synthetic(reps: int) -> list[dict[str, Any]]:
    rows = []
    for name, cfg in SYNTHETIC:
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        row: dict[str, Any] = {"name": name, "cfg": cfg}
        try:
            assert p.stdout is not None and p.stdin is not None
            t = time.perf_counter()
            row["ready"] = p.stdout.readline().strip()
            row["setup_s"] = round(time.perf_counter() - t, 2)
            row["cycles"] = _cycles([p.pid], reps)
            p.stdin.write("check\n")
            p.stdin.flush()
            row["check"] = p.stdout.readline().strip()
        except Exception as e:  # one failed configuration must not lose the others
            row["error"] = repr(e)[:500]
        finally:
            p.kill()
            p.wait()
        rs = sorted(c["restore_unlock_s"] for c in row.get("cycles", []))
        print(f"{name:32s} restore {rs}  {row.get('check', row.get('error'))}", flush=True)
        rows.append(row)
    return rows


def vllm_server(model: str, extra: list[str], reps: int, port: int, work: Path) -> dict[str, Any]:
    """A sleeping vLLM server checkpointed and restored in place: without the kept pool (after
    sleep only), then with it (after `fastvllm_gpu_release`, as a snapshot does)."""
    from fastvllm.runtime import cuda_checkpoint, proctree, vllm_server, worker_rpc

    spec = vllm_server.LaunchSpec(model=model, port=port, extra_args=extra, worker_extension=True)
    doc: dict[str, Any] = {"args": extra}
    t = time.perf_counter()
    srv = vllm_server.launch(spec, work / f"vllm-{port}.log")
    try:
        vllm_server.wait_healthy(srv, 600, lambda: srv.proc is not None and srv.proc.poll() is None)
        doc["launch_s"] = round(time.perf_counter() - t, 1)
        name = vllm_server.served_model_name(srv)
        vllm_server.complete(srv, name, "Hello, my name is", 8)
        vllm_server.sleep(srv, level=2)
        pids = cuda_checkpoint.gpu_pids(proctree.tree_pids(srv.pid))
        doc["gpu_pids"] = pids
        doc["sleep_only"] = _cycles(pids, reps)
        doc["gpu_release"] = [r.as_dict() for r in worker_rpc.gpu_release(srv)]
        doc["pool_kept"] = _cycles(pids, reps)
        vllm_server.wake_up(srv)
        doc["after"] = vllm_server.complete(srv, name, "Hello, my name is", 8).text
        log = (work / f"vllm-{port}.log").read_text(errors="replace").splitlines()
        doc["graph_log"] = [ln[-300:] for ln in log if "graph" in ln.lower()][-12:]
    except Exception as e:
        doc["error"] = repr(e)[:800]
        with contextlib.suppress(OSError):
            doc["log_tail"] = (work / f"vllm-{port}.log").read_text()[-3000:]
    finally:
        proctree.stop_session(srv.pid, grace=5)
    for k in ("sleep_only", "pool_kept"):
        rs = sorted(c["restore_unlock_s"] for c in doc.get(k, []))
        print(f"vllm {extra} {k}: restore+unlock {rs}", flush=True)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--vllm-variants", default="default,eager", help="of: default, eager, decode-only, few-sizes"
    )
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "probe": "cuda_restore",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = a.out / "cuda-restore-probe.json"
    doc["synthetic"] = synthetic(a.reps)
    path.write_text(json.dumps(doc, indent=1))
    base = [
        "--enable-sleep-mode",
        "--attention-backend",
        "FLASH_ATTN",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.2",
    ]
    variants = {
        "default": [],
        "eager": ["--enforce-eager"],
        "decode-only": ["-O", '{"cudagraph_mode": "FULL_DECODE_ONLY"}'],
        "few-sizes": ["--max-num-seqs", "16"],
    }
    doc["vllm"] = {}
    for i, v in enumerate(a.vllm_variants.split(",")):
        doc["vllm"][v] = vllm_server(a.model, base + variants[v], a.reps, 18950 + i, a.out)
        path.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
