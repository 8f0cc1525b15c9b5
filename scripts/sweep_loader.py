"""Sweep of the loader's tunables (threads, chunk size, pinned buffers) on a warm page cache,
to choose the defaults from measurements. One process, each configuration loaded `--reps`
times into fresh tensors; the median GB/s per configuration goes to JSON.

    python -m fastvllm.scripts.sweep_loader FILE --device cuda
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
from pathlib import Path

from fastvllm.runtime import system
from fastvllm.weights import loader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="")
    ap.add_argument("--chunks-mib", default="4,16,64")
    ap.add_argument("--buffers", default="2,0", help="0 means 2 x threads")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every load")
    ap.add_argument("--direct", default="off", help="comma list of on/off/auto")
    ap.add_argument("--out", type=Path, default=Path("results/weights/sweep.json"))
    a = ap.parse_args(argv)
    import torch

    n = os.cpu_count() or 2
    threads = (
        [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, max(1, n // 4), n // 2, n} - {0})
    )
    chunks = [int(c) << 20 for c in a.chunks_mib.split(",")]
    bufs = [int(b) for b in a.buffers.split(",")] if a.device.startswith("cuda") else [0]
    loader.load(a.path, a.device)  # warm the page cache and the CUDA context
    rows = []
    modes = {"on": True, "off": False, "auto": None}
    for t, c, b, d in itertools.product(threads, chunks, bufs, a.direct.split(",")):
        nb = b or 2 * t
        speeds, pins = [], []
        for _ in range(a.reps):
            if a.cold:
                system.drop_page_cache()
            out, st = loader.load(a.path, a.device, threads=t, chunk=c, buffers=nb, direct=modes[d])
            speeds.append(st.gbps)
            pins.append(st.pin_s)
            del out
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
        rows.append(
            {
                "threads": t,
                "chunk_mib": c >> 20,
                "buffers": nb,
                "direct": d,
                "gbps_median": statistics.median(speeds),
                "pin_s_median": statistics.median(pins),
            }
        )
        print(
            f"threads {t:3d} chunk {c >> 20:4d} MiB buffers {nb:3d} direct {d:4s}: "
            f"{rows[-1]['gbps_median']:6.2f} GB/s"
            f" (pinning {rows[-1]['pin_s_median']:.3f} s)",
            flush=True,
        )
    best = max(rows, key=lambda r: r["gbps_median"])
    print(f"best: {best}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"cold": a.cold, "device": a.device, "path": str(a.path), "cpus": n, "rows": rows, "best": best}
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
