"""The parts of a GPU restore that run without a GPU: where the CUDA checkpoint's host copy of
device memory lies in a process (its mappings grow when the driver copies device memory into
them) and in the CRIU page images (the pagemap), the read-ahead that brings that copy in
before the CUDA restore reads it, and the restore of a tree's processes side by side. The
driver itself is faked where it is called; the GPU machine runs the real thing
(scripts/gpu/session.sh issue22)."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fastvllm.restore import hotset, readahead
from fastvllm.runtime import criu, criu_images, cuda_checkpoint, manifest
from fastvllm.runtime.errors import CudaCheckpointError

from .conftest import needs_criu

PAGE = criu_images.PAGE


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _msg(fields: dict[int, int]) -> bytes:
    body = b"".join(_varint(k << 3) + _varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body


def _pagemap(pages_id: int, runs: list[tuple[int, int, int]]) -> bytes:
    """A pagemap image: magics, head, then (vaddr, pages, flags) entries."""
    out = struct.pack("<II", 0x54564319, 0x56084025) + _msg({1: pages_id})
    for vaddr, n, flags in runs:
        out += _msg({1: vaddr, 2: n, 4: flags})
    return out


def test_pagemap_runs_and_their_offsets_in_the_pages_image() -> None:
    present = criu_images.PE_PRESENT
    raw = _pagemap(
        7,
        [(0x10000, 4, present), (0x20000, 2, criu_images.PE_PARENT), (0x40000, 3, present | 2)],
    )
    pm = criu_images.parse_pagemap(raw, pid=42)
    assert (pm.pid, pm.pages_id, pm.pages_file) == (42, 7, "pages-7.img")
    assert [(r.vaddr, r.pages, r.offset) for r in pm.runs] == [
        (0x10000, 4, 0),
        (0x20000, 2, None),  # in a parent image: takes no room in this one
        (0x40000, 3, 4 * PAGE),
    ]
    assert pm.bytes == 7 * PAGE
    # an address range over both present runs and the hole between them: its pages, in file order
    got = criu_images.file_ranges(pm, [(0x10000 + PAGE, 0x40000 + 2 * PAGE)])
    assert got == [(PAGE, 5 * PAGE)]  # adjacent in the file: one range
    assert criu_images.file_ranges(pm, [(0x20000, 0x30000)]) == []
    with pytest.raises(ValueError):
        criu_images.parse_pagemap(b"\x01\x02")


def test_image_split_tells_the_host_copy_from_the_cpu_heap(tmp_path: Path) -> None:
    present = criu_images.PE_PRESENT
    (tmp_path / "pagemap-5.img").write_bytes(_pagemap(1, [(0x1000, 10, present), (0x100000, 30, present)]))
    (tmp_path / "pagemap-9.img").write_bytes(_pagemap(2, [(0x2000, 4, present)]))
    got = criu_images.split(tmp_path, {5: [(0x100000, 0x100000 + 30 * PAGE)]})
    assert got[5] == {
        "pages_file": "pages-1.img",
        "image_bytes": 40 * PAGE,
        "gpu_host_copy_bytes": 30 * PAGE,
        "cpu_bytes": 10 * PAGE,
    }
    assert got[9]["gpu_host_copy_bytes"] == 0 and got[9]["cpu_bytes"] == 4 * PAGE


def test_host_copy_counts_new_and_grown_mappings_only() -> None:
    mb = 1 << 20
    before = [(0x1000, 0x9000, 0), (0x100000, 0x900000, 2 * mb), (0xA00000, 0xB00000, mb)]
    after = [
        (0x1000, 0x9000, 4096),  # noise
        (0x100000, 0x900000, 7 * mb),  # grew by 5 MiB
        (0xA00000, 0xB00000, mb),  # unchanged
        (0xC00000, 0x1C00000, 16 * mb),  # new
    ]
    got = cuda_checkpoint.host_copy(before, after)
    assert got.ranges == [(0x100000, 0x900000), (0xC00000, 0x1C00000)]
    assert got.bytes == 21 * mb


def test_anon_vmas_sees_memory_a_process_fills() -> None:
    """What the driver does at checkpoint time, done by hand: a new anonymous mapping filled
    with data shows up as a host copy of its size."""
    pid = os.getpid()
    before = cuda_checkpoint.anon_vmas(pid)
    size = 32 << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for off in range(0, size, PAGE):
            buf[off] = 1
        after = cuda_checkpoint.anon_vmas(pid)
        got = cuda_checkpoint.host_copy(before, after)
        assert size <= got.bytes < size + (8 << 20)  # the test process's own allocations beside
        assert any(lo <= _addr(buf) < hi for lo, hi in got.ranges)
    finally:
        buf.close()


def _addr(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _manifest(cuda_pids: list[int], gpu_state: dict[str, Any]) -> manifest.Manifest:
    """The two fields of a manifest the read-ahead of the host copy looks at."""
    return cast(manifest.Manifest, SimpleNamespace(cuda_pids=cuda_pids, gpu_state=gpu_state))


def test_gpu_host_copy_reads_the_recorded_ranges_or_the_whole_image(tmp_path: Path) -> None:
    present = criu_images.PE_PRESENT
    images = tmp_path / "criu"
    images.mkdir()
    (images / "pagemap-5.img").write_bytes(_pagemap(1, [(0x1000, 10, present), (0x100000, 30, present)]))
    (images / "pages-1.img").write_bytes(b"\0" * 40 * PAGE)
    (images / "pagemap-9.img").write_bytes(_pagemap(2, [(0x2000, 4, present)]))
    (images / "pages-2.img").write_bytes(b"\0" * 4 * PAGE)
    state = {"processes": {"5": {"host_copy_ranges": [[0x100000, 0x100000 + 30 * PAGE]]}}}
    got = readahead.gpu_host_copy(tmp_path, _manifest([5, 9], state))
    assert [(f.path, f.ranges) for f in got] == [
        ("criu/pages-1.img", [(10 * PAGE, 30 * PAGE)]),
        ("criu/pages-2.img", [(0, 4 * PAGE)]),  # nothing recorded: the whole image
    ]


def test_the_hot_reader_reads_the_host_copy_between_criu_and_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def read(_root: Path, hot: hotset.HotSet, order: Any, **_kw: Any) -> int:
        seen.extend(f.path for f in sorted(hot.files, key=order))  # as hotset.read goes
        return len(hot.files)

    monkeypatch.setattr(hotset, "read", read)
    gpu = [hotset.HotFile("criu/pages-1.img", 1, 0, [(0, 1)], hotset.STAGE_CRIU)]
    monkeypatch.setattr(readahead, "gpu_host_copy", lambda _root, _m: gpu)
    hot = hotset.HotSet(
        [
            hotset.HotFile("tree", 1, 0, [(0, 1)], hotset.STAGE_TREE),
            hotset.HotFile("criu-run", 1, 0, [(0, 1)], hotset.STAGE_CRIU),
            hotset.HotFile("/lib/copied", 1, 0, [(0, 1)], hotset.STAGE_COPIED),
        ]
    )
    r = readahead.HotReader(tmp_path, hot, [], gpu_of=_manifest([5], {}))
    r.start()
    assert r.wait_gpu(60)
    r.stop()
    assert seen == ["/lib/copied", "criu-run", "criu/pages-1.img", "tree"]
    assert r.gpu_bytes == 1 and r.bytes == 4
    # without a GPU snapshot in mmap mode there is nothing to wait for
    assert readahead.HotReader(tmp_path, hot, []).wait_gpu(0)


class _FakeDriver:
    """cuCheckpointProcessRestore/Unlock that take a while, and may fail for one PID. With
    `meet` > 1, each restore waits inside the driver until `meet` of them are there: side by
    side is then proven by their meeting, not by two sleeps that overlap on a busy host."""

    def __init__(self, fail: int | None = None, meet: int = 0) -> None:
        self.fail = fail
        self._meet = threading.Barrier(meet, timeout=60) if meet > 1 else None
        self.calls: list[tuple[str, int]] = []
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def _call(self, what: str, pid: int) -> tuple[int]:
        with self._lock:
            self.calls.append((what, pid))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        if self._meet is not None and what == "restore":
            self._meet.wait()
            time.sleep(0.01)  # each call takes a measurable while (its timing is rounded)
        else:
            time.sleep(0.2)
        with self._lock:
            self.inside -= 1
        return (1 if pid == self.fail and what == "restore" else 0,)

    def cuCheckpointProcessRestore(self, pid: int, _args: object) -> tuple[int]:
        return self._call("restore", pid)

    def cuCheckpointProcessUnlock(self, pid: int, _args: object) -> tuple[int]:
        return self._call("unlock", pid)

    def cuGetErrorName(self, err: int) -> tuple[int, bytes]:
        return (0, b"CUDA_ERROR_FAKE")


def test_resume_restores_the_processes_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = _FakeDriver(meet=2)
    monkeypatch.setattr(cuda_checkpoint, "_driver", lambda: drv)
    monkeypatch.setattr(cuda_checkpoint, "state", lambda _pid: "checkpointed")
    times = cuda_checkpoint.resume([11, 22])
    assert set(times) == {"11", "22"} and all(
        t["restore_s"] > 0 and t["unlock_s"] > 0 for t in times.values()
    )
    assert drv.most_inside == 2  # both in the driver at once
    for pid in (11, 22):  # each process: restored before it is unlocked
        assert drv.calls.index(("restore", pid)) < drv.calls.index(("unlock", pid))
    drv = _FakeDriver()
    monkeypatch.setattr(cuda_checkpoint, "_driver", lambda: drv)
    cuda_checkpoint.resume([11, 22], parallel=False)
    assert drv.most_inside == 1


def test_resume_reports_a_failed_process(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = _FakeDriver(fail=22)
    monkeypatch.setattr(cuda_checkpoint, "_driver", lambda: drv)
    monkeypatch.setattr(cuda_checkpoint, "state", lambda _pid: "checkpointed")
    with pytest.raises(CudaCheckpointError, match="restore of PID 22"):
        cuda_checkpoint.resume([11, 22])
    assert ("unlock", 11) in drv.calls and ("unlock", 22) not in drv.calls


_FILLER = r"""
import mmap, os, sys, time, ctypes
size = 8 << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, 4096):
    buf[off:off + 8] = (off // 4096).to_bytes(8, "little")
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{addr} {size}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


@pytest.mark.slow
@needs_criu
def test_pagemap_ranges_point_at_the_bytes_of_a_real_dump(tmp_path: Path) -> None:
    """A real CRIU dump of a process with a known buffer: the page-image ranges `file_ranges`
    gives for the buffer's addresses hold exactly its bytes, and the present runs add up to the
    page image's size."""
    ready = tmp_path / "ready"
    with open(tmp_path / "filler.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FILLER, str(ready)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the filler did not start"
            time.sleep(0.02)
        addr, size = (int(x) for x in ready.read_text().split())
        images = tmp_path / "criu"
        criu.dump(criu.find_criu(), proc.pid, images, tmp_path / "dump.log")
        proc.wait(timeout=60)
        pm = criu_images.load_pagemaps(images)[proc.pid]
        pages = images / pm.pages_file
        assert pm.bytes == pages.stat().st_size
        ranges = criu_images.file_ranges(pm, [(addr, addr + size)])
        assert sum(n for _, n in ranges) == size
        data = bytearray()
        with open(pages, "rb") as f:
            for off, n in ranges:
                f.seek(off)
                data += f.read(n)
        for i in range(0, size // PAGE, 97):
            assert data[i * PAGE : i * PAGE + 8] == i.to_bytes(8, "little")
        split = criu_images.split(images, {proc.pid: [(addr, addr + size)]})[proc.pid]
        assert split["gpu_host_copy_bytes"] == size and split["cpu_bytes"] == pm.bytes - size
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_hot_set_learned_from_a_copied_tree_is_not_used_in_mmap_mode(tmp_path: Path) -> None:
    """A tree CRIU copied its memory into maps none of its page images: the set it teaches has
    none of their ranges, and a restore in mmap mode that trusted it would fault them all in
    page by page (what a restore after a change of mode would meet)."""
    snap = tmp_path / "snap"
    (snap / "criu").mkdir(parents=True)
    image = snap / "criu" / "pages-1.img"
    image.write_bytes(os.urandom(16 * PAGE))
    sizes = {"criu/pages-1.img": 16 * PAGE}
    copied = hotset.learn([os.getpid()], snap)
    assert copied.mode == "copy"
    assert hotset.save(snap, copied)
    assert hotset.load(snap, sizes, mode="mmap") is None
    assert hotset.load(snap, sizes, mode="copy") is not None and hotset.load(snap, sizes) is not None
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[PAGE] is not None  # in memory, as a restored tree faults it in
        learned = hotset.learn([os.getpid()], snap)
    assert learned.mode == "mmap"
    assert hotset.save(snap, learned)
    got = hotset.load(snap, sizes, mode="mmap")
    assert got is not None and got.mode == "mmap" and "criu/pages-1.img" in [f.path for f in got.files]


# --- issue 22, items 4, 5, 7, 8: the loader's kept pinned pool, the 8b model, the bench's order ---


def _bench() -> Any:
    from fastvllm import benchmark_gpu as bench_gpu_restore

    return bench_gpu_restore


def test_the_bench_runs_the_most_important_figures_first() -> None:
    """The first model's cold start and default restores as a user waits (warm, cold) and (c)
    against (b) come before anything of the second model; the second model's cold start, warm
    default, (b) and (c) before any repetition, sweep or comparison variant."""
    b = _bench()
    steps = b.plan(["3b", "8b"], reps=2)
    head = [(s.model, s.key, s.rep) for s in steps[:17]]
    assert head == [
        ("3b", "snapshot", 1),
        ("3b", "bounds", 1),
        ("3b", "prime", 1),
        ("3b", "cli/warm", 1),
        ("3b", "cli/cold", 1),
        ("3b", "c/warm", 1),
        ("3b", "b/warm", 1),
        ("3b", "agent/warm", 1),
        ("3b", "agent-held/warm", 1),
        ("8b", "snapshot", 1),
        ("8b", "prime", 1),
        ("8b", "cli/warm", 1),
        ("8b", "agent/warm", 1),
        ("8b", "agent-held/warm", 1),
        ("8b", "c/warm", 1),
        ("8b", "b/warm", 1),
        ("8b", "cli/cold", 1),
    ]
    first_rep2 = next(i for i, s in enumerate(steps) if s.rep == 2)
    early = [s for s in steps[:first_rep2] if s.kind is b.StepKind.RESTORE]
    # after every model's headline figures: (c) with one setting changed, each model's in turn
    ab = [(s.model, s.variant) for s in early[12:]]
    default = b.VARIANTS.split(",")  # the readers' counts are asked for by name (--variants)
    assert ab == [(m, v) for m in ("3b", "8b") for v in b.VARIANT_ENV if v in default]
    assert all(s.variant in ("cli", "agent", "agent-held", "c", "b") for s in early[:12])
    # the second warm waits as a user waits come before the cold comparisons
    rep2 = [(s.model, s.key) for s in steps[first_rep2 : first_rep2 + 6]]
    assert rep2 == [(m, f"{v}/warm") for m in ("3b", "8b") for v in ("cli", "agent", "agent-held")]
    assert [s.model for s in steps if s.kind is b.StepKind.BOUNDS] == ["3b"]  # once per machine
    for m in ("3b", "8b"):  # every restore of a model comes after its snapshot and its prime
        idx = [i for i, s in enumerate(steps) if s.model == m]
        kinds = [steps[i].kind for i in idx]
        assert kinds.index(b.StepKind.SNAPSHOT) == 0
        assert kinds.index(b.StepKind.PRIME) < kinds.index(b.StepKind.RESTORE)
    keys = [(s.model, s.key, s.rep) for s in steps]
    assert len(keys) == len(set(keys))  # nothing twice


def test_the_bench_plan_filters_variants_and_conditions() -> None:
    b = _bench()
    steps = b.plan(["3b"], reps=1, variants={"cli"}, conditions={"warm"})
    assert [(s.key, s.rep) for s in steps] == [("snapshot", 1), ("bounds", 1), ("cli/warm", 1)]
    primed = b.plan(["3b"], reps=1, variants={"prime", "cli"}, conditions={"warm"})
    assert [s.key for s in primed] == ["snapshot", "bounds", "prime", "cli/warm"]
    assert not any(s.kind is b.StepKind.SWEEP for s in b.plan(["3b"], variants={"cli", "c"}))
    assert [s.model for s in b.plan(["3b", "8b"], reps=1) if s.kind is b.StepKind.SWEEP] == ["3b", "8b"]
    three = b.plan(["3b"], reps=3)
    assert {s.rep for s in three if s.key == "cli/warm"} == {1, 2, 3}


def test_the_bench_budget_drops_what_does_not_fit() -> None:
    """Each step runs only if its estimate fits what is left; a model whose snapshot did not
    run has none of its restores run. Simulated with each step taking its estimate: with the
    budget a GPU call leaves, the headline figures of both models fit."""
    from fastvllm.runtime import tiny_model

    b = _bench()
    sizes = {m: b.Sizes(tiny_model.weight_bytes(tiny_model.config(m)) / 1e9) for m in ("3b", "8b")}
    snap = b.Step("8b", b.StepKind.SNAPSHOT)
    restore = b.Step("8b", b.StepKind.RESTORE, "cli", "warm")
    assert b.skip_reason(restore, False, 1.0, 100.0) == "no snapshot of this model"
    assert b.skip_reason(snap, False, 50.0, 100.0) is None
    assert "out of time budget" in (b.skip_reason(snap, False, 150.0, 100.0) or "")
    # bigger models and cold page caches are estimated longer
    assert b.estimate_s(snap, sizes["8b"]) > b.estimate_s(b.Step("3b", b.StepKind.SNAPSHOT), sizes["3b"])
    cold = b.Step("3b", b.StepKind.RESTORE, "cli", "cold")
    assert b.estimate_s(cold, sizes["3b"]) > b.estimate_s(
        b.Step("3b", b.StepKind.RESTORE, "cli", "warm"), sizes["3b"]
    )

    def simulate(budget: float) -> list[tuple[str, str]]:
        left, ran, snapped = budget, [], set()
        for s in b.plan(["3b", "8b"], reps=2):
            est = b.estimate_s(s, sizes[s.model])
            if b.skip_reason(s, s.model in snapped, est, left) is None:
                left -= est
                ran.append((s.model, s.key))
                if s.kind is b.StepKind.SNAPSHOT:
                    snapped.add(s.model)
        return ran

    ran = simulate(530.0)
    for want in [
        ("3b", "cli/warm"),
        ("3b", "cli/cold"),
        ("3b", "b/warm"),
        ("8b", "snapshot"),
        ("8b", "cli/warm"),
    ]:
        assert want in ran
    assert ("3b", "mmap-old/cold") not in ran  # the comparisons are what goes
    short = simulate(200.0)  # no room for the 8b's snapshot: none of its restores either
    assert ("8b", "snapshot") not in short and not any(m == "8b" for m, _ in short)
    assert ("3b", "cli/warm") in short


def test_the_bench_reports_where_the_load_waited() -> None:
    """The loader's waits, the longest of the ranks': its copies for reads, its readers for a
    buffer (why the load misses the pinned bound), its start and drain; a loader that does not
    report them, none."""
    b = _bench()
    waits = {"wait_reads_s": 0.05, "wait_buffers_s": 0.01, "first_copy_s": 0.004, "drain_s": 0.001}
    loads = [
        {"bytes": 4 << 30, "gbps": 30.0, "pool": "kept", **waits},
        {"bytes": 4 << 30, "gbps": 32.0, "pool": "kept", "wait_reads_s": 0.02, "wait_buffers_s": 0.03},
    ]
    got = b._load_figures({"load": loads}, 0.3, 50.0)
    assert got["load_gbps"] == 30.0 and got["load_pct_of_pinned_bound"] == 60.0
    assert got["load_wait_reads_s"] == 0.05 and got["load_wait_buffers_s"] == 0.03
    assert got["load_first_copy_s"] == 0.004 and got["load_drain_s"] == 0.001
    old = b._load_figures({"load": [{"bytes": 1, "gbps": 30.0}]}, None, None)
    assert "load_wait_reads_s" not in old and "load_wait_buffers_s" not in old


def test_every_sweep_setting_is_one_the_worker_takes_and_the_wrong_weights_come_last() -> None:
    """The sweep's settings cross to the worker as ReloadArgs; the copies-only row leaves the
    weights wrong, so nothing may reload after it in that server."""
    import inspect

    from fastvllm.runtime import config, worker_rpc
    from fastvllm.weights import loader
    from fastvllm.weights.extension import WorkerExtension

    b = _bench()
    takes = set(inspect.signature(WorkerExtension.fastvllm_reload).parameters)
    for setting in b.SWEEP_GRID:
        args = worker_rpc.ReloadArgs("/s/w.fvw", **setting)
        assert set(args.as_kwargs()) <= takes
        config.CopyWait(args.copy_wait)
        config.LoaderReads(args.reads)
        assert not args.only or loader.PipelineHalf(args.only)
    halves = [s.get("only") for s in b.SWEEP_GRID]
    assert halves[-1] == "copies" and halves.count("copies") == 1


def test_the_bench_summary_and_chart(tmp_path: Path) -> None:
    b = _bench()
    md: dict[str, Any] = {
        "cold_start_s": 85.0,
        "breakdown": {"image_bytes": 4_000_000_000, "weights_bytes": 5_000_000_000},
        "runs": {
            "cli/warm": [
                {"user_wait_s": 1.1, "phases": {"load_weights": 0.2}, "load_pct_of_pinned_bound": 60.0}
            ],
            "cli/cold": [{"user_wait_s": 6.0, "phases": {}}, {"user_wait_s": 7.0, "phases": {}}],
            "c/warm": [{"ttfc_s": 0.9, "phases": {"load_weights": 0.15}, "load_pct_of_pinned_bound": 70.0}],
            "b/warm": [{"ttfc_s": 4.5, "phases": {}}],
        },
    }
    doc: dict[str, Any] = {"bounds": {"disk_cold_read_gbps": 1.8}, "models": {"3b": md}, "gpu": None}
    b.summarise(doc)
    assert md["median_s"]["cli/cold"] == 6.5 and md["cold_disk_bound_s"] == 5.0
    acc = md["acceptance"]
    assert acc["user_wait_warm_s"] == 1.1 and acc["cold_x_disk_bound"] == 1.3
    assert acc["b_over_c_warm_in_process"] == 5.0 and acc["cold_start_over_user_wait_warm"] == 77.3
    assert acc["load_pct_of_pinned_bound_warm"] == 65.0
    labels = [label for label, _ in b.chart_values(md)]
    assert labels[0] == "cold start" and labels[-1] == "disk bound (cold)" and len(labels) == 6
    pytest.importorskip("matplotlib")
    assert b.chart(doc, tmp_path / "c.png") and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_the_bench_model_dirs() -> None:
    b = _bench()
    assert b._model_dirs("3b=/a,8b=/b", ["3b", "8b"]) == {"3b": "/a", "8b": "/b"}
    assert b._model_dirs("/m", ["3b", "8b"]) == {"3b": "/m"}
    assert b._model_dirs("", ["3b"]) == {}
    assert b._vllm_args("8b", [])[-1] == "0.3" and b._vllm_args("3b", ["--enforce-eager"])[-2:] == [
        "0.2",
        "--enforce-eager",
    ]


def test_the_8b_model_has_llama_3_1_8b_shapes() -> None:
    """Llama-3.1-8B's layer shapes (32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads of
    128) with the tiny vocabulary: 7.0 B parameters, 14.0 GB of bf16."""
    from fastvllm.runtime import tiny_model

    c = tiny_model.config("8b")
    shapes = {n: s for n, s, _ in tiny_model.shapes(c)}
    assert shapes["model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (14336, 4096)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert "model.layers.32.mlp.up_proj.weight" not in shapes
    assert tiny_model.weight_bytes(c) == 13_992_730_624
    assert "8b" in tiny_model.FAST_SIZES and "3b" not in tiny_model.FAST_SIZES  # 3b: as before
    # the same names, order and shapes as the generator the other sizes use
    tiny = tiny_model.config("tiny")
    w = tiny_model._weights(tiny)
    assert [(n, s) for n, s, _ in tiny_model.shapes(tiny)] == [(n, tuple(t.shape)) for n, t in w.items()]  # type: ignore[attr-defined]


def test_the_fast_writer_makes_a_safetensors_file_vllm_reads(tmp_path: Path) -> None:
    """`_write_fast` (the 8b's): a valid safetensors file (read back by the safetensors library),
    every shape and dtype as configured, norms exactly one, random weights finite, bounded and
    varied, and the same bytes whatever the thread count."""
    import torch
    from fastvllm.runtime import tiny_model
    from safetensors.torch import load_file

    c = tiny_model.config("small")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_model._write_fast(a, c, threads=4)
    tiny_model._write_fast(b, c, threads=1)
    assert a.read_bytes() == b.read_bytes()
    got = load_file(str(a))
    for name, shape, rand in tiny_model.shapes(c):
        t = got[name]
        assert tuple(t.shape) == shape and t.dtype == torch.bfloat16
        if rand:
            x = t.float().abs()
            assert torch.isfinite(x).all() and x.min() >= 1 / 32 and x.max() < 0.5 and x.std() > 0.05
        else:
            assert bool((t == 1).all())
    assert a.stat().st_size == 8 + int.from_bytes(a.read_bytes()[:8], "little") + tiny_model.weight_bytes(c)


def test_the_loader_pool_size() -> None:
    from fastvllm.weights import loader

    assert loader.pool_size(10) == 10 + loader.EXTRA_BUFFERS
    assert loader.pool_size(1) == 1 + loader.EXTRA_BUFFERS
    assert loader.pool_size(0) == 1 + loader.EXTRA_BUFFERS
    assert loader.pool_size(8, buffers=3) == 3
    assert loader.pool_size(8, buffers=1) == 2  # double buffering at least


@pytest.fixture
def kept_pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in for the pool `keep_pool` pins (the GPU machine runs the real one)."""
    from fastvllm.weights import loader

    pool = SimpleNamespace(chunk=8 << 20, buffers=[object()] * 14)
    monkeypatch.setattr(loader, "_kept", pool)
    monkeypatch.setattr(loader, "_kept_busy", False)
    monkeypatch.setattr(loader, "_probe", lambda _pool, _device: None)
    return pool


def test_a_load_uses_the_kept_pool_once_at_a_time(kept_pool: Any) -> None:
    from fastvllm.weights import loader

    got, how = loader._acquire_pool(8 << 20, 14, "cuda")
    assert got is kept_pool and how == "kept"
    other, how2 = loader._acquire_pool(8 << 20, 14, "cuda")  # a second load meanwhile
    assert other is not kept_pool and how2 == "fresh: the kept buffers are in use"
    assert other.buffers == []  # nothing pinned yet: the load pins as it goes
    loader._release_kept()
    assert loader._acquire_pool(8 << 20, 10, "cuda") == (kept_pool, "kept")  # fewer needed: fine
    loader._release_kept()
    # more asked for (more readers): the kept ones still beat pinning new ones at load time
    assert loader._acquire_pool(8 << 20, 20, "cuda") == (kept_pool, "kept")
    loader._release_kept()


def test_a_load_pins_its_own_where_the_kept_pool_does_not_fit_or_fails_the_probe(
    kept_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastvllm.weights import loader

    assert loader._acquire_pool(16 << 20, 14, "cuda")[1] == "fresh: the kept buffers are 14 x 8 MiB"
    monkeypatch.setattr(loader, "_probe", lambda _p, _d: "the kept buffers are no longer pinned")
    assert loader._acquire_pool(8 << 20, 14, "cuda")[1] == "fresh: the kept buffers are no longer pinned"

    def broken(_p: Any, _d: Any) -> str:
        raise RuntimeError("CUDA error: invalid argument")

    monkeypatch.setattr(loader, "_probe", broken)
    pool, how = loader._acquire_pool(8 << 20, 14, "cuda")
    assert pool is not kept_pool and how.startswith("fresh: the probe failed (RuntimeError(")
    assert loader._kept_busy is False  # a failed probe leaves the pool free for the next load
    monkeypatch.setattr(loader, "_kept", None)
    assert loader._acquire_pool(8 << 20, 14, "cuda")[1] == "fresh: no kept buffers"


def test_keep_pool_without_cuda_keeps_nothing() -> None:
    import torch
    from fastvllm.weights import loader

    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert loader.keep_pool() == {"kept": False, "reason": "no CUDA device"}


def test_the_kept_pool_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU machine: buffers pinned ahead are used by the next load (no pinning in it),
    pass the probe, and load every byte right; a chunk size they do not fit pins its own."""
    import torch
    from fastvllm.weights import fileformat, loader

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    monkeypatch.setattr(loader, "_kept", None)  # this test's pool goes with it
    g = torch.Generator().manual_seed(7)
    src = {f"w{i}": torch.randn(1024, 1536 + i, generator=g).to(torch.bfloat16) for i in range(24)}
    path = tmp_path / "w.fvw"
    fileformat.write(path, src)
    kept = loader.keep_pool(threads=4, chunk=1 << 20)
    assert kept["kept"] and kept["buffers"] == loader.pool_size(4)
    dst = {k: torch.zeros_like(v, device="cuda") for k, v in src.items()}
    st = loader.load_into(path, dst, threads=4, chunk=1 << 20)
    assert st.pool == "kept" and st.pin_s == 0.0
    assert all(torch.equal(dst[k].cpu(), v) for k, v in src.items())
    st2 = loader.load_into(path, dst, threads=4, chunk=2 << 20)
    assert st2.pool.startswith("fresh: the kept buffers are")
    assert all(torch.equal(dst[k].cpu(), v) for k, v in src.items())


def test_a_gpu_snapshots_host_queries_run_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation of a GPU snapshot asks nvidia-smi twice (identity, GPU list): both are
    asked at once, in the background, and the checks get their answers. Each fake waits for the
    other to have started: asked one after the other, the first would wait out its guard."""
    from fastvllm.restore import pipeline
    from fastvllm.runtime import devices

    started = {"identity": threading.Event(), "gpus": threading.Event()}
    ident = cuda_checkpoint.GpuIdentity("NVIDIA H100 80GB HBM3", "580.159.04", 1)
    gpu = devices.Gpu(0, "GPU-1", "NVIDIA H100 80GB HBM3", "580.159.04")

    def identity() -> Any:
        started["identity"].set()
        return ident if started["gpus"].wait(60) else None

    def gpus() -> list[Any]:
        started["gpus"].set()
        return [gpu] if started["identity"].wait(60) else []

    monkeypatch.setattr(cuda_checkpoint, "gpu_identity", identity)
    monkeypatch.setattr(devices, "list_gpus", gpus)
    monkeypatch.setattr(devices, "driver_gpus", lambda: None)  # the driver's files cannot say
    assert pipeline._GpuQueries.start(cast(Any, SimpleNamespace(cuda_pids=[], gpu=None))) is None  # CPU
    q = pipeline._GpuQueries.start(cast(Any, SimpleNamespace(cuda_pids=[7], gpu={"model": "x"})))
    assert q is not None
    assert q.identity() == ident and q.gpus() == [gpu]


def _driver_files(
    root: Path, gpus: dict[str, tuple[str, str]], version: str = "580.159.04"
) -> tuple[Path, Path]:
    """A fake /proc/driver/nvidia and /sys/module/nvidia/version: bus id -> (model, UUID)."""
    for bus, (model, uuid) in gpus.items():
        d = root / "proc" / "gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\n"
        )
    (root / "version").write_text(version + "\n")
    return root / "proc", root / "version"


def test_the_driver_files_list_the_gpus_in_bus_order(tmp_path: Path) -> None:
    from fastvllm.runtime import devices

    proc, ver = _driver_files(
        tmp_path,
        {
            "0000:b3:00.0": ("NVIDIA H100 80GB HBM3", "GPU-bbbb-1"),
            "0000:19:00.0": ("NVIDIA H100 80GB HBM3", "GPU-aaaa-0"),
        },
    )
    got = devices.driver_gpus(proc, ver)
    assert got == [
        devices.Gpu(0, "GPU-aaaa-0", "NVIDIA H100 80GB HBM3", "580.159.04"),
        devices.Gpu(1, "GPU-bbbb-1", "NVIDIA H100 80GB HBM3", "580.159.04"),
    ]


@pytest.mark.parametrize("case", ["unknown uuid", "no files", "no model", "no version"])
def test_the_driver_files_say_nothing_unless_they_say_everything(tmp_path: Path, case: str) -> None:
    from fastvllm.runtime import devices

    uuid = "GPU-????????-????-????-????-????????????" if case == "unknown uuid" else "GPU-aaaa"
    model = "" if case == "no model" else "NVIDIA H100 80GB HBM3"
    proc, ver = _driver_files(tmp_path, {} if case == "no files" else {"0000:19:00.0": (model, uuid)})
    if case == "no version":
        ver.unlink()
    assert devices.driver_gpus(proc, ver) is None


def test_a_restore_refused_on_the_driver_files_asks_nvidia_smi_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's files answer the checks at once; where their answer would refuse the
    restore (a name spelled otherwise than nvidia-smi's, which the snapshot recorded),
    nvidia-smi decides."""
    from fastvllm.restore import pipeline
    from fastvllm.runtime import devices

    smi = devices.Gpu(0, "GPU-a", "NVIDIA H100 80GB HBM3", "580.159.04")
    asked: list[str] = []
    monkeypatch.setattr(devices, "list_gpus", lambda: asked.append("gpus") or [smi])
    monkeypatch.setattr(
        cuda_checkpoint,
        "gpu_identity",
        lambda: asked.append("identity") or cuda_checkpoint.GpuIdentity(smi.model, smi.driver, 1),
    )
    snap = devices.Devices(devices.DeviceKind.CUDA, smi.model, smi.driver, 1, [smi.uuid], 1)
    m = cast(
        Any,
        SimpleNamespace(
            cuda_pids=[7],
            gpu={"model": smi.model, "driver": smi.driver, "memory_used_mib": 1},
            devices=snap.as_dict(),
        ),
    )

    monkeypatch.setattr(devices, "driver_gpus", lambda: [smi])  # the same answer: nvidia-smi is not run
    q = pipeline._GpuQueries.start(m)
    assert q is not None and q.identity() == cuda_checkpoint.GpuIdentity(smi.model, smi.driver, 0)
    assert pipeline._check_devices(m, None, q) == [] and asked == []

    other = devices.Gpu(0, "GPU-a", "H100 80GB HBM3", "580.159.04")  # spelled otherwise
    monkeypatch.setattr(devices, "driver_gpus", lambda: [other])
    q = pipeline._GpuQueries.start(m)
    assert q is not None
    assert pipeline._check_devices(m, None, q) == [] and asked == ["gpus"]
    assert pipeline._gpu_differences(m.gpu, q.identity()) != []
    assert pipeline._gpu_differences(m.gpu, q.identity(exact=True)) == [] and asked == ["gpus", "identity"]


def test_the_recorded_host_copy_tells_none_from_not_recorded() -> None:
    state = {"processes": {"7": {"host_copy_ranges": [[4096, 8192]]}, "8": {"host_copy_ranges": []}, "9": {}}}
    assert cuda_checkpoint.recorded_host_copy(state, [7, 8, 9, 10]) == {7: [(4096, 8192)], 8: []}
    assert cuda_checkpoint.recorded_host_copy(None, [7]) == {}
