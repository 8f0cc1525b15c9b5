"""runtime.discard: another process's shared memory pages (memfds, anonymous shared memory)
dropped from outside (what a GPU snapshot does to the loader's kept staging buffers after the
CUDA checkpoint); no GPU needed."""

from __future__ import annotations

import subprocess
import sys

from fastvllm.runtime import discard

_CHILD = r"""
import ctypes, mmap, os, sys
fd = os.memfd_create("cuda-pinned-like")
os.ftruncate(fd, 4 << 20)
shared = mmap.mmap(fd, 4 << 20, flags=mmap.MAP_SHARED)
shared[:] = b"\x5a" * (4 << 20)
private = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
private[:] = b"\x5a" * (1 << 20)
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr(shared), addr(private), fd, flush=True)
sys.stdin.readline()
allocated = os.fstat(fd).st_blocks * 512  # before reading: a read of a hole allocates a page again
print(shared[:1 << 20].count(0), shared[1 << 20 : 3 << 20].count(0), shared[3 << 20 :].count(0),
      private[:].count(0), allocated, flush=True)
"""


def test_the_shared_memfd_pages_of_a_range_are_dropped_and_nothing_else() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        shared, private, _fd = (int(x) for x in p.stdout.readline().split())
        mib = 1 << 20
        # the middle 2 MiB of the memfd, and a private anonymous mapping that must stay as it is
        assert discard.shmem_ranges(p.pid, [(shared + mib, 2 * mib), (private, mib)]) == 2 * mib
        p.stdin.write("\n")
        p.stdin.flush()
        head, middle, tail, priv, allocated = (int(x) for x in p.stdout.readline().split())
        assert (head, middle, tail, priv) == (0, 2 * mib, 0, 0)
        assert allocated == 2 * mib  # the punched pages are gone from the file, not just zeroed
    finally:
        p.kill()
        p.wait()


# What cudaHostAlloc maps in a process the driver started in (scripts/gpu/probe_pinned_maps.py
# on the H100): anonymous shared memory, `/dev/zero (deleted)` in /proc/PID/maps.
_ANON_CHILD = r"""
import ctypes, mmap, sys
shared = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
shared[:] = b"\x5a" * (4 << 20)
print(ctypes.addressof(ctypes.c_char.from_buffer(shared)), flush=True)
sys.stdin.readline()
print(shared[:1 << 20].count(0), shared[1 << 20 : 3 << 20].count(0), shared[3 << 20 :].count(0), flush=True)
"""


def test_the_pages_of_anonymous_shared_memory_are_dropped_too() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", _ANON_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        shared = int(p.stdout.readline())
        mib = 1 << 20
        with open(f"/proc/{p.pid}/maps") as f:
            kinds = [m.path for m in discard.parse_maps(f.read()) if m.start <= shared < m.end]
        assert kinds == ["/dev/zero (deleted)"]
        assert discard.shmem_ranges(p.pid, [(shared + mib, 2 * mib)]) == 2 * mib
        p.stdin.write("\n")
        p.stdin.flush()
        assert tuple(int(x) for x in p.stdout.readline().split()) == (0, 2 * mib, 0)
    finally:
        p.kill()
        p.wait()


def test_nothing_is_punched_in_a_gone_process_or_outside_any_memfd() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert discard.shmem_ranges(p.pid, [(1 << 30, 1 << 20)]) == 0
    assert discard.shmem_ranges(1, [(0, 4096)]) == 0


def test_maps_lines_are_parsed_with_their_offset_and_sharing() -> None:
    text = (
        "7f0000000000-7f0000800000 rw-s 00400000 00:01 1234                       /memfd:cuda (deleted)\n"
        "7f0000800000-7f0000900000 rw-p 00000000 00:00 0 \n"
    )
    a, b = discard.parse_maps(text)
    assert (a.start, a.end, a.offset, a.shared, a.is_memfd) == (
        0x7F0000000000,
        0x7F0000800000,
        0x400000,
        True,
        True,
    )
    assert not b.shared and not b.is_memfd and not b.is_shmem
    (anon,) = discard.parse_maps("7f0000000000-7f0000800000 rw-s 00000000 00:01 99  /dev/zero (deleted)\n")
    assert anon.shared and anon.is_shmem and not anon.is_memfd
