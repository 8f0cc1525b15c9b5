"""What a CRIU image holds where: which bytes of a pages-N.img belong to which addresses of
which process (its pagemap-PID.img), read just far enough for fastvllm's own needs.

Why: a GPU snapshot's page images hold two kinds of memory. Most of a process's pages are its
CPU heap (Python, torch, vLLM), which a restored tree touches here and there. The CUDA
checkpoint's host copy of the device memory (`runtime.cuda_checkpoint` records its address
ranges at snapshot time) is read whole, once, by the CUDA restore right after CRIU. Knowing
where that copy lies in the page images lets the restore read it ahead sequentially instead of
letting the driver fault it in page by page, and lets a benchmark say how much of the image
each kind is.

A pagemap image is a magic word (two for the common kinds), then length-prefixed protobuf
entries: the head (field 1: the pages id N), then one entry per run of pages (field 1: vaddr,
2: page count, 3: in_parent, 4: flags, 5: the page count when it does not fit 32 bits). The
pages of the runs flagged present follow one another in pages-N.img, in entry order.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
_COMMON_MAGICS = {0x54564319, 0x55105940}  # IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC
PE_PARENT = 1 << 0  # the pages are in a parent snapshot's images
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2  # the pages are in this pages-N.img
_PAGEMAP = re.compile(r"pagemap-(\d+)\.img$")


@dataclass(frozen=True)
class Run:
    """A run of pages of one process: `pages` pages from address `vaddr`, held in its pages
    image at `offset` (None: not in this image, e.g. in a parent snapshot's)."""

    vaddr: int
    pages: int
    offset: int | None

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE


@dataclass
class Pagemap:
    pid: int
    pages_id: int
    runs: list[Run] = field(default_factory=list)

    @property
    def pages_file(self) -> str:
        return f"pages-{self.pages_id}.img"

    @property
    def bytes(self) -> int:
        """Bytes of this process's pages in its pages image."""
        return sum(r.pages * PAGE for r in self.runs if r.offset is not None)


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at `pos`: (value, position after it). CRIU's images are protobuf."""
    value = shift = 0
    while pos < len(buf):
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def _fields(msg: bytes) -> dict[int, int]:
    """The varint fields of one protobuf message (a pagemap entry has only those)."""
    out: dict[int, int] = {}
    i = 0
    while i < len(msg):
        key, i = varint(msg, i)
        if key & 7 != 0:
            raise ValueError(f"unexpected wire type {key & 7} in a pagemap entry")
        out[key >> 3], i = varint(msg, i)
    return out


def parse_pagemap(raw: bytes, pid: int = 0) -> Pagemap:
    """The runs of a pagemap-PID.img's bytes (see the module docstring); ValueError if they are
    not one."""
    try:
        (first,) = struct.unpack_from("<I", raw, 0)
        pos = 8 if first in _COMMON_MAGICS else 4
        entries: list[dict[int, int]] = []
        while pos < len(raw):
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + size > len(raw):
                raise ValueError("truncated pagemap entry")
            entries.append(_fields(raw[pos : pos + size]))
            pos += size
    except struct.error as e:
        raise ValueError(f"not a pagemap image: {e}") from None
    if not entries or 1 not in entries[0]:
        raise ValueError("a pagemap image without its head")
    pm = Pagemap(pid, entries[0][1])
    off = 0
    for entry in entries[1:]:
        n = entry.get(5, entry.get(2, 0))
        flags = entry.get(4, PE_PARENT if entry.get(3) else PE_PRESENT)
        present = bool(flags & PE_PRESENT)
        pm.runs.append(Run(entry.get(1, 0), n, off if present else None))
        if present:
            off += n * PAGE
    return pm


def load_pagemaps(images: Path) -> dict[int, Pagemap]:
    """Every process's pagemap in a CRIU image directory, by PID; an unreadable one is left out
    (a hint for read-ahead and figures for a report: nothing depends on it for correctness)."""
    out: dict[int, Pagemap] = {}
    for p in sorted(images.glob("pagemap-*.img")):
        m = _PAGEMAP.search(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            out[pid] = parse_pagemap(p.read_bytes(), pid)
        except (OSError, ValueError):
            continue
    return out


def file_ranges(pm: Pagemap, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (offset, length) ranges of `pm`'s pages image that hold the address ranges `ranges`
    ([start, end) pairs), in file order, adjacent ones merged."""
    want = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
    out: list[tuple[int, int]] = []
    if not want:
        return out
    for r in pm.runs:
        if r.offset is None:
            continue
        for lo, hi in want:
            if hi <= r.vaddr:
                continue
            if lo >= r.end:
                continue
            a, b = max(lo, r.vaddr), min(hi, r.end)
            off = r.offset + (a - r.vaddr)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + (b - a))
            else:
                out.append((off, b - a))
    out.sort()
    merged: list[tuple[int, int]] = []
    for off, n in out:
        if merged and merged[-1][0] + merged[-1][1] >= off:
            start, length = merged[-1]
            merged[-1] = (start, max(length, off + n - start))
        else:
            merged.append((off, n))
    return merged


def split(images: Path, host_copy: dict[int, list[tuple[int, int]]]) -> dict[int, dict[str, int | str]]:
    """Per process of the image: its page bytes, of them the CUDA checkpoint's host copy of
    device memory (the address ranges `host_copy` recorded at snapshot time) and the rest (its
    CPU memory: heaps, stacks, libraries' written pages)."""
    out: dict[int, dict[str, int | str]] = {}
    for pid, pm in load_pagemaps(images).items():
        gpu = sum(n for _, n in file_ranges(pm, host_copy.get(pid, [])))
        out[pid] = {
            "pages_file": pm.pages_file,
            "image_bytes": pm.bytes,
            "gpu_host_copy_bytes": gpu,
            "cpu_bytes": pm.bytes - gpu,
        }
    return out
