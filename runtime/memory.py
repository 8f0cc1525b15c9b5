"""madvise over the aligned interior of a memory range: the one place fastvllm talks to the
kernel about tensor memory (releasing pages before a dump, asking for huge pages before a
load). ctypes because Python's own `mmap.madvise` works only on mappings Python made."""

from __future__ import annotations

import ctypes
import mmap

MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux 5.14: fault a range in (page tables filled) without writing it
MADV_POPULATE_WRITE = 23  # the same, as if written: private pages allocated (and zeroed) up front
HUGE_PAGE = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def advise_interior(ptr: int, nbytes: int, advice: int, align: int = mmap.PAGESIZE) -> int:
    """madvise(`advice`) over the `align`-aligned part of [ptr, ptr + nbytes); the partial
    pages at both ends belong to neighbours and are left alone. Returns the bytes advised."""
    start = (ptr + align - 1) // align * align
    end = (ptr + nbytes) // align * align
    if end <= start:
        return 0
    if _libc.madvise(start, end - start, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed")
    return end - start


def advise(addr: int, nbytes: int, advice: int) -> None:
    """madvise(`advice`) over an already page-aligned range. ctypes drops the GIL for the call,
    so threads can populate different parts of one mapping at once."""
    if _libc.madvise(addr, nbytes, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed")
