"""Who maps a snapshot's CRIU page images: a tree restored in mmap mode keeps them mapped
copy-on-write, so the snapshot must stay in place and unchanged while any such process runs
(`inspect` shows them; deleting refuses), and a new dump must copy those pages instead of
referring to the files."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# CRIU names its page images pages-<id>.img; a deleted one shows as "... (deleted)".
_PAGES = re.compile(r"/pages-\d+\.img( \(deleted\))?$")


@dataclass
class Mapper:
    pid: int
    name: str
    files: set[str] = field(default_factory=set)
    mapped_bytes: int = 0  # address space backed by those files (not what is resident)

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "files": sorted(self.files), "bytes": self.mapped_bytes}


def _maps(pid: int) -> list[tuple[int, str]]:
    """(length, path) of each page-image mapping of `pid`; [] if it is gone or unreadable."""
    out = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and _PAGES.search(parts[5].rstrip("\n")):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((hi - lo, parts[5].rstrip("\n")))
    return out


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def pages_image_mappers(pids: list[int]) -> list[int]:
    """Those of `pids` that map any CRIU page image."""
    return [p for p in pids if _maps(p)]


def snapshot_mappers(snapshot: Path) -> list[Mapper]:
    """Every process on this host that maps one of `snapshot`'s page images."""
    images = str((snapshot / "criu").resolve()) + "/"
    found: dict[int, Mapper] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        for length, path in _maps(pid):
            if path.startswith(images):
                m = found.setdefault(pid, Mapper(pid, _comm(pid)))
                m.files.add(path.removeprefix(images).removesuffix(" (deleted)"))
                m.mapped_bytes += length
    return sorted(found.values(), key=lambda m: m.pid)


def smaps_rss(text: str) -> dict[str, int]:
    """Resident bytes of a /proc/PID/smaps text by kind of mapping: CRIU page images (a tree
    restored in mmap mode maps them), other files (libraries, Python's files), anonymous."""
    out = {"page_image_rss": 0, "file_rss": 0, "anon_rss": 0}
    kind = ""
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:  # a mapping's header line
            name = parts[5] if len(parts) >= 6 else ""
            kind = (
                "page_image_rss" if "/pages-" in name else "file_rss" if name.startswith("/") else "anon_rss"
            )
        elif parts[0] == "Rss:" and kind:
            out[kind] += int(parts[1]) * 1024
    return out
