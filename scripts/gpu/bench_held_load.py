"""The load out of weights held in pinned memory (weights/held.py) against the staged loader, in
one fresh process on a GPU host: a synthetic weight file held as `fastvllm agent --hold` holds
it, served on a socket, loaded into CUDA tensors. Not a restore (the bench's `c-held` and
`agent-held` variants time that); this checks the path and its rate on a bare GPU machine in
seconds. Run there: python3 scripts/gpu/bench_held_load.py OUT.json [--gb 4]."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> int:
    import torch
    from fastvllm.weights import fileformat, held

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gb", type=float, default=4.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fv-held-bench-", dir="/var/tmp"))
    try:  # the synthetic file (several GB) goes with the folder, whatever happens
        n = max(1, int(a.gb * (1 << 30)) // (256 << 20))
        # the small tensor first: the large ones after it straddle the held memory's pieces
        src = {"small": torch.arange(12345, dtype=torch.float32)}
        src.update({f"w{i}": torch.full((128 << 20,), float(i + 1), dtype=torch.bfloat16) for i in range(n)})
        path = tmp / "w.fvw"
        fileformat.write(path, src)
        doc: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "bytes": path.stat().st_size}
        t = time.perf_counter()
        h = held.hold(path)
        doc["hold_s"] = round(time.perf_counter() - t, 3)
        doc["held_data_bytes"] = h.data_bytes
        with held.serving(tmp / "held.sock") as sock:
            measure(doc, sock, path, src, n)
    finally:
        held.release_all()
        shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


def measure(doc: dict[str, Any], sock: str, path: Path, src: dict[str, Any], n: int) -> None:
    """The held load (bit for bit), the staged loader, and the pinned bound, three times each."""
    import torch
    from fastvllm.weights import fileformat, held, loader

    idx = fileformat.read_index(path)
    dst = {k: torch.empty_like(v, device="cuda") for k, v in src.items()}
    runs, parts = [], []
    for _ in range(3):
        got = held.load_into(sock, path, dst, idx)
        torch.cuda.synchronize()
        runs.append(round(got.bytes / got.seconds / 1e9, 2))
        parts.append(
            {k: round(getattr(got, k), 4) for k in ("seconds", "first_copy_s", "map_s", "unmap_s", "drain_s")}
        )
    doc["held_gbps"] = runs
    doc["held_parts"] = parts
    doc["held_bit_exact"] = all(torch.equal(dst[k].cpu(), src[k]) for k in ("w0", f"w{n - 1}", "small"))
    staged = []
    for _ in range(3):
        st = loader.load_into(path, dst)
        staged.append(round(st.gbps, 2))
    doc["staged_gbps"] = staged
    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    bound = []
    for _ in range(3):
        t = time.perf_counter()
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        bound.append(round((1 << 30) / (time.perf_counter() - t) / 1e9, 2))
    doc["pinned_bound_gbps"] = bound


if __name__ == "__main__":
    raise SystemExit(main())
