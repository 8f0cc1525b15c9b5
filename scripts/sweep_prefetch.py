"""Sweep of `prefetch.warm`'s method and thread count on cold files, to choose its defaults
from measurements on the machine at hand.

Only the test file is made cold (posix_fadvise DONTNEED on it before every run), never the
whole page cache, so the sweep can run next to other work. Each configuration runs `--reps`
times; the median GB/s goes to JSON. The file it creates is removed afterwards unless given.

    python -m fastvllm.scripts.sweep_prefetch --size-mib 1024
    python -m fastvllm.scripts.sweep_prefetch --file /srv/snap/weights/model.fvw --threads 1,4,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

from fastvllm.prefetch import residency, warm


def _make_file(directory: Path, size: int) -> Path:
    """Incompressible data, written and flushed so eviction can drop every page."""
    fd, name = tempfile.mkstemp(prefix="sweep-prefetch-", dir=directory)
    block = os.urandom(64 << 20)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, help="an existing file to warm (default: create one)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to create the test file")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(warm.METHODS))
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--chunks-mib", default="8")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/prefetch/sweep.json"))
    a = ap.parse_args(argv)

    path = a.file or _make_file(a.dir, a.size_mib << 20)
    rows = []
    try:
        size = path.stat().st_size
        print(f"{path}: {size / 1e9:.2f} GB, {os.cpu_count()} CPUs", flush=True)
        grid = itertools.product(
            a.methods.split(","), [int(t) for t in a.threads.split(",")], a.chunks_mib.split(",")
        )
        for method, threads, chunk_mib in grid:
            speeds, resident, cpu = [], [], []
            for _ in range(a.reps):
                warm.evict([path])
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                st = warm.warm([path], method=method, threads=threads, chunk=int(chunk_mib) << 20)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                speeds.append(st.gbps)
                # CPU seconds (all threads, user + system) per GB: what warming takes from a
                # restore running beside it, the tie-breaker when the disk is the limit.
                used = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                cpu.append(used / (st.bytes / 1e9))
                resident.append(residency.resident_fraction(path))
            rows.append(
                {
                    "method": method,
                    "threads": threads,
                    "chunk_mib": int(chunk_mib),
                    "gbps_median": statistics.median(speeds),
                    "gbps": speeds,
                    "cpu_s_per_gb_median": statistics.median(cpu),
                    "resident_after": min(resident),
                }
            )
            runs = ", ".join(f"{s:.2f}" for s in speeds)
            print(
                f"{method:9s} threads {threads:2d} chunk {chunk_mib:>3s} MiB: "
                f"{rows[-1]['gbps_median']:6.2f} GB/s, {rows[-1]['cpu_s_per_gb_median']:.2f} CPU s/GB "
                f"(runs {runs}; resident after {min(resident):.0%})",
                flush=True,
            )
    finally:
        if a.file is None:
            warm.evict([path])
            path.unlink()
    best = max(rows, key=lambda r: r["gbps_median"])
    print(
        f"best: {best['method']} x {best['threads']} threads, {best['chunk_mib']} MiB: "
        f"{best['gbps_median']:.2f} GB/s"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"file_bytes": size, "cpus": os.cpu_count(), "rows": rows, "best": best}
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
