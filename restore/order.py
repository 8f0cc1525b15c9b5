"""The order in which a restore reads a snapshot's files, so a prefetcher can read the
earliest-needed bytes first.

A restore reads, in this order: the /dev/shm copies (put back before CRIU starts), CRIU's
small metadata images (inventory, process tree, per-process core/mm/pagemap/fds), the page
images (each restorer reads its process's pages-N.img from start to end, in address order),
and, once the server is healthy, the weight file. Page images are ordered by their process's
place in the tree (root first, as CRIU forks them): pagemap-PID.img names the pages-N.img of
each PID. CRIU's image format is read just far enough for that (two magic words, then
length-prefixed protobuf entries; the first entry of a pagemap image is its head, whose
field 1 is the pages id).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from fastvllm.runtime import manifest
from fastvllm.runtime.criu_images import varint as _varint

# Images whose first word is one of these carry a second, per-type magic word after it.
_COMMON_MAGICS = {0x54564319, 0x55105940}  # IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC
_PAGES = re.compile(r"pages-(\d+)\.img$")
_PAGEMAP = re.compile(r"pagemap-(\d+)\.img$")


def pages_id(pagemap: Path) -> int | None:
    """The N of the pages-N.img that `pagemap` (a CRIU pagemap-PID.img) points to; None if the
    image cannot be read (the plan then falls back to file names)."""
    try:
        raw = pagemap.read_bytes()[:64]
        (first,) = struct.unpack_from("<I", raw, 0)
        pos = 8 if first in _COMMON_MAGICS else 4
        (size,) = struct.unpack_from("<I", raw, pos)
        head = raw[pos + 4 : pos + 4 + size]
        i = 0
        while i < len(head):
            key, i = _varint(head, i)
            if key >> 3 == 1 and key & 7 == 0:
                return _varint(head, i)[0]
            if key & 7 != 0:  # the head has only varint fields; anything else is not a head
                return None
            _, i = _varint(head, i)
    except (OSError, ValueError, struct.error):
        return None
    return None


def restore_order(snapshot: Path, m: manifest.Manifest) -> list[manifest.FileEntry]:
    """The manifest's files in the order a restore reads them (see the module docstring).
    Files the plan does not know come last, in name order, so none is ever left out."""
    rank = {pid: i for i, pid in enumerate(m.server.tree_pids)}
    pages_rank: dict[int, int] = {}
    for e in m.files:
        hit = _PAGEMAP.search(e.path)
        if hit and e.path.startswith("criu/"):
            pid = int(hit.group(1))
            pid_rank = rank.get(pid, len(rank) + pid)
            n = pages_id(snapshot / e.path)
            if n is not None:
                pages_rank[n] = min(pages_rank.get(n, pid_rank), pid_rank)
    weight_files = m.all_weight_files()

    def key(e: manifest.FileEntry) -> tuple[int, int, str]:
        if e.path.startswith("shm/"):
            return (0, 0, e.path)
        if e.path.startswith("criu/"):
            hit = _PAGES.search(e.path)
            if not hit:
                first = 0 if e.path.endswith(("inventory.img", "pstree.img")) else 1
                return (1, first, e.path)
            n = int(hit.group(1))
            return (2, pages_rank.get(n, 1 << 30), e.path)
        if e.path in weight_files:  # every rank's, in rank order
            return (3, weight_files.index(e.path), e.path)
        return (4, 0, e.path)

    return sorted(m.files, key=key)


def is_page_image(rel: str) -> bool:
    """Whether `rel` (a manifest path) is one of CRIU's pages-N.img."""
    return rel.startswith("criu/") and _PAGES.search(rel) is not None


def is_small_image(rel: str) -> bool:
    """Whether `rel` (a manifest path) is one of CRIU's images other than the page images."""
    return rel.startswith("criu/") and _PAGES.search(rel) is None


def before_pages(ordered: list[manifest.FileEntry]) -> set[str]:
    """The files a restore reads before any page image: the /dev/shm copies and CRIU's small
    images (what each process is: credentials, files, registers, memory layout)."""
    return {e.path for e in ordered if e.path.startswith("shm/") or is_small_image(e.path)}
