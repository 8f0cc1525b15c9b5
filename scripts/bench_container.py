"""Container start to first completion, cold against restored, with the same image in the
same run: a container of Dockerfile.criu's CPU image on an empty volume (vLLM cold start)
against one that restores the snapshot a first container left on the volume (`fastvllm
restore --container`: the host reads the snapshot ahead while the container starts), and the
same restore without the host's read-ahead. The page cache is dropped before every run (as
root); the clock runs from the call that creates the container to the first completion the
host receives. The cold containers get the compile caches the first one left (as a host that
has run vLLM before keeps its own). Medians and ratios go to JSON and a PNG chart.

    python -m fastvllm.scripts.bench_container --reps 3 --out results/container
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastvllm.runtime import manifest, system

from fastvllm import container as ctr
from fastvllm import docker_image

PORT = 8000


def _say(msg: str) -> None:
    print(f"bench_container: {msg}", flush=True)


def first_completion(url: str, model: str, deadline_s: float = 900.0) -> None:
    """Poll until the server answers a completion (what a client of the container waits for)."""
    body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0.0}
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=30.0) as client:
        while True:
            try:
                if client.post(f"{url}/v1/completions", json=body).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no completion from {url} within {deadline_s:.0f} s")
            time.sleep(0.1)


def _name() -> str:
    return f"fastvllm-test-bench-{uuid.uuid4().hex[:8]}"


def cold_once(dc: Any, image: str, volume: Path, model: str, caches: list[Path]) -> float:
    """A volume with no snapshot: the entrypoint cold-starts vLLM (and would snapshot it
    afterwards). It gets the compile caches the first container left, as a host that has run
    vLLM before keeps its own: the cold side is not charged for compiling kernels."""
    volume.mkdir(parents=True, exist_ok=True, mode=0o700)
    for cache in caches:
        shutil.copytree(cache, volume / cache.name, symlinks=True)
    system.drop_page_cache()
    t0 = time.perf_counter()
    c = ctr.start(dc, image, volume, ctr.entrypoint_command("tiny", port=PORT), name=_name())
    try:
        url = ""
        while not url:  # the address exists once the container runs
            try:
                url = ctr.address(c, PORT)
            except Exception:
                time.sleep(0.05)
        first_completion(url, model)
        return time.perf_counter() - t0
    finally:
        c.remove(force=True)


def restored_once(
    dc: Any, image: str, snap: Path, model: str, prefetch: bool
) -> tuple[float, dict[str, Any]]:
    system.drop_page_cache()
    t0 = time.perf_counter()
    res = ctr.restore(image, snap, name=_name(), prefetch=prefetch, dc=dc)
    try:
        if res.how != "restored":
            raise RuntimeError(f"the container did not restore: {res.set_aside}")
        first_completion(res.url, model)
        return time.perf_counter() - t0, res.as_dict()
    finally:
        dc.containers.get(res.container_id).remove(force=True)


def chart(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["cold container", "restored,\nhost read-ahead", "restored,\nno read-ahead"]
    keys = ["cold", "restored", "restored_no_prefetch"]
    med = [doc["median_s"][k] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, med, color=["#999999", "#2a7ab0", "#7fb3d5"])
    for b, k in zip(bars, keys, strict=True):
        for v in doc["runs_s"][k]:
            ax.plot(b.get_x() + b.get_width() / 2, v, "k.", alpha=0.6)
        ax.annotate(f"{doc['median_s'][k]:.2f} s", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom")  # fmt: skip
    ax.set_ylabel("container start → first completion (s)")
    ax.set_title(f"Dockerfile.criu CPU image, tiny model: {doc['ratio_cold_over_restored']:.1f}x")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/container"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-bench-container-"))
    runs: dict[str, list[float]] = {"cold": [], "restored": [], "restored_no_prefetch": []}
    details: list[dict[str, Any]] = []
    try:
        with docker_image.ready_image() as (dc, build):
            image = docker_image.CPU_IMAGE
            _say(f"image ready ({build}); taking the snapshot with a first container")
            volume = work / "volume"
            c = ctr.start(dc, image, volume, ctr.entrypoint_command("tiny", port=PORT), name=_name())
            try:
                doc = ctr.wait_serving(c)
            finally:
                c.stop(timeout=60)
                c.remove(force=True)
            snap = volume / Path(str(doc["snapshot"])).relative_to(ctr.SNAPSHOTS_MOUNT)
            model = manifest.load(snap).server.served_model_name
            caches = sorted(volume.glob(".cache-*"))
            for rep in range(a.reps):
                empty = work / f"empty-{rep}"
                runs["cold"].append(cold_once(dc, image, empty, model, caches))
                shutil.rmtree(empty, ignore_errors=True)
                t, d = restored_once(dc, image, snap, model, prefetch=True)
                runs["restored"].append(t)
                details.append(d)
                t, d = restored_once(dc, image, snap, model, prefetch=False)
                runs["restored_no_prefetch"].append(t)
                details.append(d)
                _say(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    doc = {
        "what": "container start to first completion, Dockerfile.criu CPU image, tiny model",
        "date": time.strftime("%Y-%m-%d"),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "load": os.getloadavg()},
        "build": build,
        "runs_s": runs,
        "median_s": med,
        "ratio_cold_over_restored": med["cold"] / med["restored"],
        "restored_over_cold": med["restored"] / med["cold"],
        "restore_details": details,
    }
    (a.out / "container.json").write_text(json.dumps(doc, indent=2) + "\n")
    chart(doc, a.out / "container.png")
    _say(json.dumps({"median_s": med, "ratio": round(doc["ratio_cold_over_restored"], 2)}))


if __name__ == "__main__":
    main()
