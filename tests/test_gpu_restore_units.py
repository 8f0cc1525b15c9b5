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
    """cuCheckpointProcessRestore/Unlock that take a while, and may fail for one PID."""

    def __init__(self, fail: int | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, int]] = []
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def _call(self, what: str, pid: int) -> tuple[int]:
        with self._lock:
            self.calls.append((what, pid))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
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
    drv = _FakeDriver()
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
