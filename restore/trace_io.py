"""What a restore reads from the disk, and when: restores a snapshot (from a cold page cache by
default) under `perf record -e block:block_rq_issue`, maps every read request to the file and
offset it reads (the files' physical extents, FIEMAP), and prints the megabytes per time bucket
by kind: each stage of the hot set, page-image pages outside it (misses), the weight file,
the snapshot's other files, the hot set's libraries, CRIU's executable, and the rest (file
system metadata, files outside all of these), beside the restore's phases.

Why: it tells a restore that waits on the wrong bytes (misses, reads queued behind others)
from one that waits on the right ones. It showed that a cold restore of the tiny snapshot reads
its hot set and nothing else worth counting (README, "Prefetch and the overlapped restore").
A request re-issued after the device queue was full counts once. Needs root and `perf`.

    python -m fastvllm.restore.trace_io SNAPSHOT [--warm] [--bucket-ms 25] [--json OUT]
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastvllm.restore import hotset, order
from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot
from fastvllm.runtime import criu, instances, manifest, system

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 1
_FIEMAP_EXTENT_LAST = 1
_EXTENTS_PER_CALL = 256
# `perf script`'s default line for block:block_rq_issue:
#   comm PID [CPU] TIME: block:block_rq_issue: MAJ,MIN RWBS BYTES () SECTOR + NSECTORS ...
_LINE = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+\[\d+\]\s+(?P<ts>[\d.]+):\s+block:block_rq_issue:\s+"
    r"(?P<dev>\d+,\d+)\s+(?P<rwbs>\S+)\s+\d+\s+\(.*?\)\s+(?P<sector>\d+)\s+\+\s+(?P<nsec>\d+)"
)


@dataclass(frozen=True)
class Request:
    t: float  # seconds since the restore started
    comm: str
    dev: str  # "major,minor" of the whole disk
    rwbs: str  # R read, A read-ahead, M metadata, W write, ...
    sector: int  # 512-byte sectors from the start of the disk
    nbytes: int


def parse_line(line: str, t0: float) -> Request | None:
    m = _LINE.match(line)
    if m is None:
        return None
    return Request(
        float(m["ts"]) - t0, m["comm"], m["dev"], m["rwbs"], int(m["sector"]), int(m["nsec"]) * 512
    )


def physical_extents(path: Path) -> list[tuple[int, int, int]]:
    """(physical byte, logical byte, length) of each extent of `path`, from FIEMAP."""
    out: list[tuple[int, int, int]] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            head = struct.pack("=QQLLLL", start, (1 << 64) - 1, _FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0)
            buf = array.array("B", head + bytes(56 * _EXTENTS_PER_CALL))
            fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from("=L", buf, 20)[0]
            last = False
            for i in range(mapped):
                logical, physical, length, _, _, flags = struct.unpack_from("=QQQQQL", buf, 32 + 56 * i)
                out.append((physical, logical, length))
                start = logical + length
                last = bool(flags & _FIEMAP_EXTENT_LAST)
            if mapped == 0 or last:
                return out


class DiskMap:
    """Which file, and where in it, a disk sector belongs to (for the files it was given)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset  # the file system's first byte on the disk (a partition's start)
        self._starts: list[int] = []
        self._extents: list[tuple[int, int, int, str]] = []  # (disk start, disk end, logical, file)

    def add(self, name: str, extents: list[tuple[int, int, int]]) -> None:
        for physical, logical, length in extents:
            start = self.offset + physical
            i = bisect.bisect(self._starts, start)
            self._starts.insert(i, start)
            self._extents.insert(i, (start, start + length, logical, name))

    def find(self, byte: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self._starts, byte) - 1
        if i >= 0:
            start, end, logical, name = self._extents[i]
            if byte < end:
                return name, logical + byte - start
        return None


def kind_of(
    where: tuple[str, int] | None, hot_ranges: dict[str, list[tuple[int, int, int]]], kinds: dict[str, str]
) -> str:
    """The kind of bytes a request starting at `where` (file, offset) reads: 'stage N' of the
    hot set, 'miss' (a page image outside it), or the file's kind from `kinds`. A plain scan:
    a set's stages overlap (a tree range merged across a gap can span one of CRIU's runs), and
    the first listed wins, as the reader reads them first."""
    if where is None:
        return "other"
    name, off = where
    for start, length, stage in hot_ranges.get(name, ()):
        if start <= off < start + length:
            return f"stage {stage}"
    return kinds.get(name, "other")


def _disk_of(path: Path) -> tuple[str, int]:
    """("major,minor" of the whole disk, byte offset of the file system on it) for `path`."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    start = sys_dev / "start"
    if start.exists():  # a partition: requests name the whole disk, sectors from its start
        disk = Path(os.path.realpath(sys_dev)).parent / "dev"
        return disk.read_text().strip().replace(":", ","), int(start.read_text()) * 512
    return f"{os.major(dev)},{os.minor(dev)}", 0


def _kinds_on_disk(snap: Path) -> tuple[str, DiskMap, dict[str, list[tuple[int, int, int]]], dict[str, str]]:
    """The snapshot's disk ("major,minor"), where each file it restores from lies on it, the hot
    set's ranges by file (with their stage) and each file's kind."""
    m = manifest.load(snap)
    hot = hotset.load(snap, {f.path: f.size for f in m.files})
    hot_files = hot.files if hot is not None else []
    disk, offset = _disk_of(snap)
    dmap = DiskMap(offset)
    kinds: dict[str, str] = {}
    for f in m.files:
        if order.is_page_image(f.path):
            kinds[f.path] = "miss"
        elif f.path == m.weights_file:
            kinds[f.path] = "weights"
        else:
            kinds[f.path] = "snapshot, other"
    for hf in hot_files:
        if hf.path.startswith("/"):
            kinds.setdefault(hf.path, "library")
    found = criu.find_criu()
    kinds[found.path] = "criu"
    for name in kinds:
        path = Path(name) if name.startswith("/") else snap / name
        try:
            dmap.add(name, physical_extents(path))
        except OSError:
            continue  # another file system, or gone: its reads count as "other"
    hot_ranges: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)
    for hf in sorted(hot_files, key=lambda f: f.stage):  # the order the reader reads them in
        hot_ranges[hf.path] += [(o, n, hf.stage) for o, n in hf.ranges]
    return disk, dmap, hot_ranges, kinds


def trace_one(snap: Path, cold: bool, bucket_s: float) -> dict[str, Any]:
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf not found: install linux-perf (Debian) to trace block requests")
    if os.geteuid() != 0:
        raise SystemExit("tracing block requests needs root")
    disk, dmap, hot_ranges, kinds = _kinds_on_disk(snap)
    with tempfile.TemporaryDirectory(prefix="fastvllm-trace-") as tmp:
        data = Path(tmp) / "perf.data"
        # CLOCK_MONOTONIC: the same clock as t0 below, so the events line up with the phases
        cmd = [perf, "record", "-q", "-k", "CLOCK_MONOTONIC", "-e", "block:block_rq_issue", "-a"]
        rec = subprocess.Popen(
            [*cmd, "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)  # perf has opened its events by then
            if rec.poll() is not None:
                said = rec.stderr.read() if rec.stderr else b""
                raise SystemExit(f"perf record failed: {said.decode(errors='replace')[-300:]}")
            if cold and not system.drop_page_cache():
                raise SystemExit("cannot drop the page cache (needs root)")
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            r = restore_snapshot(RestoreOptions(snap))
        finally:
            rec.send_signal(signal.SIGINT)
            rec.wait(30)
        try:
            phases = [
                (str(p["name"]), float(p["start_s"]), float(p["duration_s"])) for p in r.timeline.as_list()
            ]
        finally:
            instances.stop(r.server.pid)
        script = subprocess.run(
            [perf, "script", "-i", str(data)], capture_output=True, text=True, check=False
        ).stdout

    ttfc = r.time_to_first_completion_s
    seen: set[tuple[int, int]] = set()
    buckets: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    by_comm: collections.Counter[str] = collections.Counter()
    for line in script.splitlines():
        req = parse_line(line, t0)
        if req is None or req.dev != disk or not 0 <= req.t <= ttfc or "R" not in req.rwbs:
            continue
        if (req.sector, req.nbytes) in seen:  # re-issued after a full device queue
            continue
        seen.add((req.sector, req.nbytes))
        kind = kind_of(dmap.find(req.sector * 512), hot_ranges, kinds)
        buckets[int(req.t / bucket_s)][kind] += req.nbytes
        totals[kind] += req.nbytes
        by_comm[req.comm] += req.nbytes
    return {
        "ttfc_s": round(ttfc, 4),
        "cold": cold,
        "phases": [{"name": n, "start_s": round(s, 4), "duration_s": round(d, 4)} for n, s, d in phases],
        "bucket_s": bucket_s,
        "bytes_by_kind": dict(totals),
        "bytes_by_command": dict(by_comm.most_common(12)),
        "buckets": {f"{b * bucket_s:.3f}": dict(c) for b, c in sorted(buckets.items())},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it first)")
    ap.add_argument("--bucket-ms", type=float, default=25.0)
    ap.add_argument("--json", type=Path, help="also write the trace's summary here")
    args = ap.parse_args(argv)
    got = trace_one(args.snapshot.expanduser().absolute(), not args.warm, args.bucket_ms / 1000)
    print(f"first completion {got['ttfc_s']} s; phases:")
    for p in got["phases"]:
        print(f"  {p['name']:18s} {p['start_s']:6.3f} s  +{p['duration_s']:.3f} s")
    print("MB read, by kind:", {k: round(v / 1e6, 1) for k, v in sorted(got["bytes_by_kind"].items())})
    print("MB read, by command:", {k: round(v / 1e6, 1) for k, v in got["bytes_by_command"].items()})
    for start, kinds in got["buckets"].items():
        row = "  ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(kinds.items()))
        print(f"  {float(start) * 1000:5.0f} ms  {row}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"snapshot": str(args.snapshot), **got}, indent=1))


if __name__ == "__main__":
    main()
