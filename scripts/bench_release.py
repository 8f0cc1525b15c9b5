"""What sleeping removes from the CRIU image: an awake snapshot (`--no-sleep`) against a
sleeping one, per model size, with the weight and KV-cache bytes the server held.

The acceptance line: awake image minus sleeping image >= 0.95 x (weight + KV-cache bytes).
Two launches per size (one per mode), so each image is of a server as its mode leaves it.

    python -m fastvllm.scripts.bench_release --sizes tiny,small
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastvllm import api


def measure(size: str, port: int, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"model": size}
    for mode, sleep in (("awake", False), ("sleeping", True)):
        out = work / f"{size}-{mode}"
        r = api.snapshot(size, out, port=port, sleep=sleep)
        res[f"{mode}_image_bytes"] = r.manifest.image_bytes
        if sleep:
            res["released"] = dict(r.manifest.released_bytes)
        shutil.rmtree(out, ignore_errors=True)
    rel = res["released"]
    held = int(rel.get("weight_bytes", 0)) + int(rel.get("kv_bytes", 0))
    removed = res["awake_image_bytes"] - res["sleeping_image_bytes"]
    res.update(
        weight_plus_kv_bytes=held, removed_bytes=removed, removed_share=removed / held if held else 0.0
    )
    res["passes_95_percent"] = removed >= 0.95 * held
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help="comma list of tiny, small, 3b")
    ap.add_argument("--port", type=int, default=18741)
    ap.add_argument("--out", type=Path, default=Path("results/release"))
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-release-", dir="/var/tmp"))
    rows = []
    try:
        for size in a.sizes.split(","):
            print(f"[release] {size}: awake and sleeping snapshots ...", flush=True)
            rows.append(measure(size, a.port, work))
            r = rows[-1]
            print(
                f"[release] {size}: awake {r['awake_image_bytes'] / 1e9:.3f} GB, sleeping "
                f"{r['sleeping_image_bytes'] / 1e9:.3f} GB, removed {r['removed_bytes'] / 1e9:.3f} GB = "
                f"{100 * r['removed_share']:.1f}% of weights + KV cache "
                f"({r['weight_plus_kv_bytes'] / 1e9:.3f} GB)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": {"node": platform.node(), "kernel": platform.release(), "cpu": platform.processor()},
        "rows": rows,
    }
    (a.out / "release.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(r["passes_95_percent"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
