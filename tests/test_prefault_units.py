"""runtime.prefault: another process's private file mapping faulted in from outside, as the
restore does for the CUDA checkpoint's host copy (no GPU needed: the mechanism is the kernel's)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastvllm.prefetch import warm
from fastvllm.runtime import prefault

_CHILD = r"""
import mmap, os, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, len(m), flush=True)
sys.stdin.readline()
"""


def _resident_pages(pid: int, lo: int, hi: int) -> int:
    """Pages of [lo, hi) mapped in `pid`'s page tables (pagemap's present bit)."""
    n = 0
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // prefault.PAGE * 8)
        raw = f.read((hi - lo) // prefault.PAGE * 8)
    for i in range(0, len(raw), 8):
        if int.from_bytes(raw[i : i + 8], "little") >> 63:
            n += 1
    return n


@pytest.fixture
def mapped_child(tmp_path: Path):
    data = tmp_path / "pages.img"
    data.write_bytes(bytes(range(256)) * (64 << 12))  # 16 MiB
    # Held in the page cache (locked by this process, so not mapped in the child): fault-around
    # maps only pages that are cached, and a busy host's reclaim could take some.
    held = warm.lock([data])
    p = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        addr, size = (int(x) for x in p.stdout.readline().split())
        yield p.pid, addr, size
    finally:
        p.kill()
        p.wait()
        held.close()


def test_populate_maps_every_page_of_the_range(mapped_child) -> None:
    pid, addr, size = mapped_child
    assert _resident_pages(pid, addr, addr + size) == 0
    st = prefault.populate(pid, [(addr, addr + size)], threads=3, chunk_bytes=1 << 20)
    assert st.reads == size // prefault.STRIDE and st.failed == 0 and not st.stopped
    # one read per 64 KiB, the kernel's fault-around mapped the rest of each window
    assert _resident_pages(pid, addr, addr + size) == size // prefault.PAGE


def test_every_page_can_be_read_where_fault_around_does_not_help(mapped_child) -> None:
    pid, addr, _size = mapped_child
    done, failed = prefault.touch(pid, addr, addr + (1 << 20), stride=prefault.PAGE)
    assert (done, failed) == ((1 << 20) // prefault.PAGE, 0)
    assert _resident_pages(pid, addr, addr + (1 << 20)) == (1 << 20) // prefault.PAGE


def test_unreadable_pages_are_counted_and_skipped(mapped_child) -> None:
    pid, addr, size = mapped_child
    hole = 1 << 30  # far beyond the mapping: nothing there (an address range that is not mapped)
    page = prefault.PAGE
    done, failed = prefault.touch(pid, addr + size - 2 * page, addr + size + 2 * page, stride=page)
    assert (done, failed) == (2, 2)
    done, failed = prefault.touch(pid, hole, hole + 3 * page, stride=page)
    assert done == 0 and failed == 3


def test_a_gone_process_ends_the_populate_at_once() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    st = prefault.populate(p.pid, [(1 << 30, (1 << 30) + (64 << 20))], threads=2)
    assert st.reads == 0


def test_the_block_stops_what_is_left(mapped_child) -> None:
    pid, addr, size = mapped_child
    stop_now = threading.Event()
    stop_now.set()
    st = prefault.populate(pid, [(addr, addr + size)], threads=2, stop=stop_now)
    assert st.reads == 0 and st.stopped
    with prefault.Populating({pid: [(addr, addr + size)]}, threads=2) as p:
        pass
    assert p.as_dict()[str(pid)]["failed"] == 0


def test_a_restore_prefaults_only_a_mapped_host_copy(monkeypatch) -> None:
    """restore.pipeline._prefaulting: threads only where the plan maps the host copy (a GPU
    snapshot in mmap mode), the setting allows them, and the snapshot recorded ranges."""
    import contextlib
    from types import SimpleNamespace
    from typing import Any

    from fastvllm.restore import pipeline

    state = {"processes": {"7": {"host_copy_ranges": [[4096, 8192]]}, "8": {"host_copy_ranges": []}}}

    def restore(prefault_host_copy: bool, gpu_state: object = state) -> Any:
        plan = SimpleNamespace(prefault_host_copy=prefault_host_copy)
        return SimpleNamespace(plan=plan, m=SimpleNamespace(gpu_state=gpu_state, cuda_pids=[7, 8]))

    got = pipeline._prefaulting(restore(True))
    assert isinstance(got, prefault.Populating) and [r.name for r in got._runners] == ["prefault-7"]
    assert isinstance(pipeline._prefaulting(restore(False)), contextlib.nullcontext)
    assert isinstance(pipeline._prefaulting(restore(True, {})), contextlib.nullcontext)
    monkeypatch.setenv("FASTVLLM_GPU_PREFAULT_THREADS", "0")
    assert isinstance(pipeline._prefaulting(restore(True)), contextlib.nullcontext)
