"""The pure parts of restore/trace_io.py: reading perf's lines, mapping a disk byte to a
file and offset, and naming the kind of bytes a request reads. The trace itself needs perf and
a restore; it is a measurement tool, run by hand (README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastvllm.restore import trace_io as tr

LINE = (
    "  kworker/1:1H-kb     123 [001] 80123.456789:    block:block_rq_issue: 254,0 RA 65536 () "
    "472023040 + 128 0x2,0,4 [kworker/1:1H]"
)


def test_parse_line_reads_perfs_block_request() -> None:
    r = tr.parse_line(LINE, t0=80123.0)
    assert r is not None
    assert r.comm == "kworker/1:1H-kb"
    assert r.dev == "254,0"
    assert r.rwbs == "RA"
    assert r.sector == 472023040
    assert r.nbytes == 128 * 512
    assert abs(r.t - 0.456789) < 1e-9
    assert tr.parse_line("python 1 [000] 1.0: sched:sched_switch: prev=x", 0.0) is None


def test_disk_map_finds_file_and_offset_with_a_partition_offset() -> None:
    m = tr.DiskMap(offset=1 << 20)
    m.add("criu/pages-1.img", [(4096, 0, 8192), (65536, 8192, 4096)])
    m.add("weights/model.fvw", [(16384, 0, 4096)])
    base = 1 << 20
    assert m.find(base + 4096) == ("criu/pages-1.img", 0)
    assert m.find(base + 4096 + 5000) == ("criu/pages-1.img", 5000)
    assert m.find(base + 65536 + 10) == ("criu/pages-1.img", 8192 + 10)
    assert m.find(base + 16384) == ("weights/model.fvw", 0)
    assert m.find(base + 12288) is None  # between extents
    assert m.find(4096) is None  # before the file system


def test_kind_of_names_hot_stages_misses_and_files() -> None:
    hot = {"criu/pages-1.img": [(0, 4096, 1), (8192, 8192, 3)], "/usr/lib/libc.so.6": [(0, 4096, 0)]}
    kinds = {"criu/pages-1.img": "miss", "weights/model.fvw": "weights", "/usr/lib/libc.so.6": "library"}
    assert tr.kind_of(("criu/pages-1.img", 100), hot, kinds) == "stage 1"
    assert tr.kind_of(("criu/pages-1.img", 12288), hot, kinds) == "stage 3"
    assert tr.kind_of(("criu/pages-1.img", 4096), hot, kinds) == "miss"
    assert tr.kind_of(("weights/model.fvw", 0), hot, kinds) == "weights"
    assert tr.kind_of(("/usr/lib/libc.so.6", 8192), hot, kinds) == "library"
    assert tr.kind_of(None, hot, kinds) == "other"
    # a tree range merged across a gap spans one of CRIU's runs: the earlier stage names it
    overlapping = {"criu/pages-1.img": [(4096, 4096, 1), (0, 65536, 3)]}
    assert tr.kind_of(("criu/pages-1.img", 5000), overlapping, kinds) == "stage 1"
    assert tr.kind_of(("criu/pages-1.img", 100), overlapping, kinds) == "stage 3"


def test_physical_extents_cover_the_data_runs_of_a_sparse_file(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as out:
        out.write(os.urandom(64 << 10))
        out.seek(4 << 20)
        out.write(os.urandom(32 << 10))
        out.flush()
        os.fsync(out.fileno())
    try:
        ext = tr.physical_extents(f)
    except OSError as e:
        pytest.skip(f"no FIEMAP on the file system of {tmp_path}: {e}")
    assert sum(n for _, _, n in ext) == (64 + 32) << 10
    assert min(lo for _, lo, _ in ext) == 0
    assert max(lo + n for _, lo, n in ext) == (4 << 20) + (32 << 10)
