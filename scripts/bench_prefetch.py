"""Prefetch and the overlapped restore, on one snapshot's files, in one run.

1. Warm throughput on cold files (page cache dropped before every run): `vmtouch -t` against
   `fastvllm prefetch warm` at several thread counts, and the parallel-read bound (N threads
   preadv-ing the same files into reused buffers, best N).
2. Restored time to first completion on the same snapshot, after one uncounted restore that
   learns the tree's hot set (as a snapshot's first restore on a host does): from a cold page
   cache with the read-ahead overlapped (the default: files this host checked before are
   trusted, the hot set read first), the same with every file hashed again (`reverify`, what
   every restore did before), serial with every file hashed (`prefetch=False`), with neither
   read-ahead nor checksums (what the restored tree's own page faults cost), from a warm
   cache (the snapshot's files warmed first; libraries cold) and fully warm (the libraries
   too: no drop after the previous restore). The share of the prefetch time the overlap hides
   is 1 - (overlapped cold - fully warm) / (time to warm the files alone, the default warm from
   part 1). Hashing every file before serving means reading every file, so then
   (alone - fully warm) / alone is a floor; the JSON records it.
3. What the restored tree touches: after the no-read-ahead cold restore, the resident set of
   its page-image and other file mappings (/proc/PID/smaps), and how much of the page images
   the page cache then holds (the kernel's read-around on each fault reads far more).

    python -m fastvllm.scripts.bench_prefetch --reps 3            # takes a tiny snapshot first
    python -m fastvllm.scripts.bench_prefetch --snapshot DIR      # or uses yours
    bash scripts/gpu/session.sh prefetch                          # on the GPU machine

Medians to JSON and a PNG chart (results/prefetch/ by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastvllm.prefetch import warm
from fastvllm.restore import hotset
from fastvllm.runtime import manifest, mapped, system, vllm_server

from fastvllm import api

READ_CHUNK = 8 << 20


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _files(snap: Path) -> list[Path]:
    return [snap / f.path for f in manifest.load(snap).files]


def parallel_read(paths: list[Path], threads: int) -> float:
    """The bound: `threads` threads take chunks of the files in order and preadv them into
    reused buffers. Returns seconds."""
    work = [(p, off) for p in paths for off in range(0, p.stat().st_size, READ_CHUNK)]
    lock = threading.Lock()
    cursor = [0]

    def run() -> None:
        buf = memoryview(bytearray(READ_CHUNK))
        fds: dict[Path, int] = {}
        try:
            while True:
                with lock:
                    if cursor[0] >= len(work):
                        return
                    p, off = work[cursor[0]]
                    cursor[0] += 1
                fd = fds.get(p)
                if fd is None:
                    fd = fds[p] = os.open(p, os.O_RDONLY)
                os.preadv(fd, [buf], off)
        finally:
            for fd in fds.values():
                os.close(fd)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def vmtouch(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["vmtouch", "-t", "-q", *map(str, paths)], check=True)
    return time.perf_counter() - t0


def ours(paths: list[Path], threads: int) -> float:
    return warm.warm(paths, threads=threads).seconds


def _touched(snap: Path, root: int, files: list[Path]) -> dict[str, int]:
    """What the restored tree (rooted at `root`) has mapped in, and what the page cache holds of
    the page images: the restore's working set against what its page faults read."""
    import psutil
    from fastvllm.prefetch import residency

    total = {"page_image_rss": 0, "file_rss": 0, "anon_rss": 0}
    for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            got = mapped.smaps_rss(Path(f"/proc/{p.pid}/smaps").read_text())
        except OSError:
            continue
        for k, v in got.items():
            total[k] += v
    pages = [f for f in files if f.name.startswith("pages-")]
    cached = sum(residency.resident_pages(f)[0] for f in pages) * os.sysconf("SC_PAGE_SIZE")
    return {**total, "page_image_cached": cached, "page_image_bytes": sum(f.stat().st_size for f in pages)}


def _mapped_files(root: int) -> set[Path]:
    """The files the tree rooted at `root` maps (libraries, Python's files), without its page
    images and /dev/shm queues."""
    import psutil

    out: set[Path] = set()
    for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            for m in p.memory_maps(grouped=True):
                if m.path.startswith("/") and "/pages-" not in m.path and not m.path.startswith("/dev/"):
                    out.add(Path(m.path))
        except psutil.Error:
            continue
    return out


def _gpu_name() -> str | None:
    """The GPU the snapshot's server ran on (None on a CPU host): the same benchmark runs on both."""
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fastvllm-bench-prefetch-"))
    try:
        snap = args.snapshot
        if snap is None:
            _say("taking a snapshot of the tiny model (once)")
            extra = shlex.split(args.vllm_args)
            snap = api.snapshot("tiny", work / "snap", port=args.port, vllm_args=extra).path
        files = _files(snap)
        total = sum(p.stat().st_size for p in files)
        _say(f"{len(files)} files, {total / 1e9:.3f} GB in {snap}")
        if not system.drop_page_cache():
            raise SystemExit("cannot drop the page cache (needs root): cold runs would not be cold")
        has_vmtouch = shutil.which("vmtouch") is not None
        contenders: dict[str, Any] = {}
        if has_vmtouch:
            contenders["vmtouch -t"] = lambda: vmtouch(files)
        for n in args.threads:
            contenders[f"fastvllm warm, {n} thread{'s' * (n > 1)}"] = lambda n=n: ours(files, n)
        for n in args.bound_threads:
            contenders[f"bound: preadv, {n} threads"] = lambda n=n: parallel_read(files, n)
        warm_runs: dict[str, list[float]] = {k: [] for k in contenders}
        for rep in range(1, args.reps + 1):
            for name, fn in contenders.items():
                system.drop_page_cache()
                s = fn()
                warm_runs[name].append(s)
                _say(f"rep {rep}/{args.reps} {name:32s} {total / s / 1e9:6.2f} GB/s ({s:.2f} s)")
        gbps = {k: round(total / statistics.median(v) / 1e9, 3) for k, v in warm_runs.items()}
        bound = max(v for k, v in gbps.items() if k.startswith("bound"))
        default = f"fastvllm warm, {warm.DEFAULT_THREADS} thread{'s' * (warm.DEFAULT_THREADS > 1)}"
        best_ours = max((v, k) for k, v in gbps.items() if k.startswith("fastvllm"))

        # The restore that learns the tree's hot set (restore.hotset), as the first restore of a
        # snapshot on a host does; not counted.
        _say("one restore to learn the hot set (not counted)")
        system.drop_page_cache()  # learned only from page images faulted in from the disk
        first = api.restore(snap)
        api.stop(first.server.pid)
        hot = hotset.load(snap, {f.path: f.size for f in manifest.load(snap).files})
        restore_runs: dict[str, list[dict[str, Any]]] = {
            "cold, overlapped": [],  # the default: files checked before are trusted, hot set first
            "cold, overlapped, every file hashed": [],  # --reverify
            "cold, serial, every file hashed": [],  # --no-prefetch --reverify
            "cold, no read-ahead or checksums": [],
            "warm": [],  # the snapshot's files warm, libraries cold
            "fully warm": [],  # right after "warm": the libraries that restore read stay cached
        }
        touched: list[dict[str, int]] = []
        libraries: set[Path] = set()  # every file the restored tree maps, except its page images
        load_restores = [os.getloadavg()[0]]
        for rep in range(1, args.reps + 1):
            for cond in restore_runs:
                if cond != "fully warm":
                    system.drop_page_cache()
                if cond in ("warm", "fully warm"):
                    warm.warm(files)
                bare = cond == "cold, no read-ahead or checksums"
                r = api.restore(
                    snap,
                    prefetch="serial" not in cond and not bare,
                    verify=not bare,
                    reverify="every file hashed" in cond,
                )
                try:
                    run_doc: dict[str, Any] = {
                        "ttfc_s": r.time_to_first_completion_s,
                        "criu_restore": r.criu_restore,
                        "readahead": r.readahead,
                        "phases": r.timeline.as_list(),
                    }
                    if bare:
                        touched.append(_touched(snap, r.server.pid, files))
                        libraries |= _mapped_files(r.server.pid)
                finally:
                    api.stop(r.server.pid)
                restore_runs[cond].append(run_doc)
                took = run_doc["ttfc_s"]
                _say(f"rep {rep}/{args.reps} restore {cond:32s} {took:.2f} s to first completion")
        load_restores.append(os.getloadavg()[0])
        ttfc = {k: _med([d["ttfc_s"] for d in v]) for k, v in restore_runs.items()}
        files_alone = statistics.median(warm_runs[default]) if default in warm_runs else None
        # The formula: (overlapped - fully warm) / the files warmed alone.
        unhidden = (ttfc["cold, overlapped"] - ttfc["fully warm"]) / files_alone if files_alone else None
        unhidden_hashed = (
            (ttfc["cold, overlapped, every file hashed"] - ttfc["fully warm"]) / files_alone
            if files_alone
            else None
        )
        # Hashing every file before serving means reading every file: overlapped >= alone.
        floor = max(0.0, (files_alone - ttfc["fully warm"]) / files_alone) if files_alone else None
        doc: dict[str, Any] = {
            "benchmark": "prefetch",
            "date": time.strftime("%Y-%m-%d"),
            "host": {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "kernel": system.kernel_release(),
                "vllm": vllm_server.vllm_version(),
                "gpu": _gpu_name(),
            },
            "snapshot": str(snap) if args.snapshot else "tiny (taken by the benchmark)",
            "files": len(files),
            "bytes": total,
            "reps": args.reps,
            "method": (
                "page cache dropped before every run; warm: wall time of each contender over all of "
                "the snapshot's files; bound: best of the preadv thread counts; restore: fastvllm "
                "restore to its first completion (canary), checksums on; warm restore: the files "
                "warmed first (the model and Python's libraries too are cold in every condition)"
            ),
            "warm_seconds": warm_runs,
            "warm_gbps": gbps,
            "bound_gbps": bound,
            "default_warm": default,
            "best_ours": {"name": best_ours[1], "gbps": best_ours[0]},
            "ours_over_vmtouch": round(best_ours[0] / gbps["vmtouch -t"], 2) if has_vmtouch else None,
            "ours_share_of_bound": round(best_ours[0] / bound, 3),
            "vmtouch": "ran" if has_vmtouch else "not installed (bash scripts/setup.sh installs it)",
            "restore": restore_runs,
            "median_ttfc_s": ttfc,
            "files_alone_s": round(files_alone, 4) if files_alone else None,
            "unhidden_share": round(unhidden, 3) if unhidden is not None else None,
            "hidden_share": round(1 - unhidden, 3) if unhidden is not None else None,
            "unhidden_share_every_file_hashed": round(unhidden_hashed, 3)
            if unhidden_hashed is not None
            else None,
            "unhidden_floor_with_every_file_hashed": round(floor, 3) if floor is not None else None,
            "hot_set_bytes": hot.bytes if hot else 0,
            "hot_set_files": len(hot.files) if hot else 0,
            "mapped_library_files": len(libraries),
            "mapped_library_bytes": sum(p.stat().st_size for p in libraries if p.is_file()),
            "touched_by_restored_tree": touched,
            "load_1min_restores_start_end": [round(x, 2) for x in load_restores],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefetch.json").write_text(json.dumps(doc, indent=2) + "\n")
    _chart(doc, args.out / "prefetch.png")
    _say(f"wrote {args.out / 'prefetch.json'} and prefetch.png")
    for k, v in gbps.items():
        print(f"  {k:34s} {v:6.2f} GB/s")
    print(
        f"best of ours {doc['best_ours']['gbps']:.2f} GB/s = {doc['ours_over_vmtouch']}x vmtouch -t, "
        f"{100 * doc['ours_share_of_bound']:.0f}% of the bound"
    )
    for k, v in ttfc.items():
        print(f"  restore {k:17s} {v:.2f} s")
    for t in touched:
        print(
            f"  restored tree maps {t['page_image_rss'] / 1e6:.0f} MB of its page images and "
            f"{t['file_rss'] / 1e6:.0f} MB of other files; the page cache holds "
            f"{t['page_image_cached'] / 1e6:.0f} MB of the page images"
        )
    if unhidden_hashed is not None and floor is not None:
        print(
            f"every file hashed: (overlapped - fully warm) / alone = {unhidden_hashed:.2f} "
            f"(its floor: {floor:.2f})"
        )
    if unhidden is not None:
        print(
            f"overlap hides {100 * (1 - unhidden):.0f}% of the {files_alone:.2f} s the files take to "
            f"warm alone ((overlapped - fully warm) / alone = {unhidden:.2f}; hot set "
            f"{doc['hot_set_bytes'] / 1e6:.0f} MB in {doc['hot_set_files']} files)"
        )
    return doc


def _chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = list(doc["warm_gbps"])
    vals = [doc["warm_gbps"][n] for n in names]
    colors = [
        "#999999" if n.startswith("vmtouch") else "#cccccc" if n.startswith("bound") else "#2a7ab9"
        for n in names
    ]
    a.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        a.text(v, y, f" {v:.2f}", va="center")
    a.invert_yaxis()
    a.set_xlabel("GB/s into the page cache, cold files (median)")
    a.set_title(f"warming {doc['bytes'] / 1e9:.2f} GB in {doc['files']} files")
    a.set_xlim(0, max(vals) * 1.25)
    conds = list(doc["median_ttfc_s"])
    tv = [doc["median_ttfc_s"][c] for c in conds]
    b.barh(conds, tv, color=["#2a7ab9", "#999999", "#999999", "#cccccc", "#7fb27f", "#7fb27f"][: len(conds)])
    for y, v in enumerate(tv):
        b.text(v, y, f" {v:.2f} s", va="center")
    b.invert_yaxis()
    b.set_xlabel("restore → first completion, s (median)")
    hidden = doc.get("hidden_share")
    b.set_title(
        "overlap hides " + (f"{100 * hidden:.0f}%" if hidden is not None else "?") + " of the prefetch"
    )
    b.set_xlim(0, max(tv) * 1.3)
    fig.suptitle(f"prefetch and overlapped restore, {doc['date']}, {doc['host']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, default=None, help="a snapshot directory (default: take one)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--bound-threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--vllm-args",
        default="",
        help="extra vLLM flags for the snapshot it takes (e.g. the GPU machine's attention backend)",
    )
    ap.add_argument("--out", type=Path, default=Path("results/prefetch"))
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
