"""The hot set: which byte ranges of which files a restored tree actually had in memory once it
served its canary, learned on one restore and read ahead first on the next.

Why: from a cold page cache a restored tree faults its pages in one at a time, each fault
reading up to the device's read-ahead window around it: the tree touches a small part of its
page images and libraries, but its faults read many times that. Reading exactly those ranges,
in file order, before the tree asks for them turns random faults into a few sequential reads
(the measurements: docs/decisions/hot-set.md).

How: after the canary, every file-backed mapping of every process of the tree is looked up in
/proc/PID/pagemap; a present page (read in, written or not) is a file page the tree needed.
CRIU itself needs other bytes earlier, while it restores: in mmap mode it still reads the
page-image runs it does not map (short runs, file-backed and executable memory, stacks), learned
as the parts of each page image no mapping of the tree covers; and it writes the dumped private
copies of library pages (relocations, .data) into private file mappings, each write reading the
library's page first. Those are the library pages pagemap shows as anonymous (with a CRIU that
maps those copies from the images too, patches/criu 0004, only the short runs it still writes).
Both are read first; what the running tree reads (library code, the page images it faults in)
comes next, staged by the step of the restore that first needed it (serving `/health`, taking
its weights back, the first completion): the restore that learns looks at the tree after each step
(`capture`). The tree then runs each step while the pages of the later ones are still being
read, instead of waiting for all of them (read in file order, the tree's `/health` waited for
the whole set while it needed a fraction of it).
Each range is read without the kernel's read-ahead around it, which would read well beyond
the set.
Page images of the snapshot are keyed by their path in the snapshot; any other file (Python,
torch, vLLM libraries) by its absolute path, size and mtime, so an upgraded library is not read
by its old ranges. The result lives beside the snapshot (`local/hot.json`), outside the
manifest: it is a hint for this host, never trusted for correctness.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastvllm.runtime import atomic, manifest

LOCAL_DIR = manifest.LOCAL_DIR
HOT_FILE = "hot.json"
# 3: learned from a tree that faulted its page images in one page at a time (restore.pipeline
# _Faults); a version 2 set, learned beside whole-file reads, is inflated and learned again.
# 4: the library pages CRIU writes private copies of are a stage of their own, read first.
# 5: the tree's pages are staged by the restore step that first needed them.
# 6: CRIU maps a library's written pages from the images too (patches/criu 0004): they are no
# longer copied over the library's own pages, and the tree faults in those it touches.
# 7: a set says whether its tree mapped its page images (`mode`): one learned from a tree CRIU
# copied has none of their ranges, and a restore in mmap mode would fault them all in alone.
VERSION = 7
PAGE = os.sysconf("SC_PAGE_SIZE")
_PAGES_IMAGE = re.compile(r"/pages-\d+\.img$")
# Gaps up to this size between two hot ranges are read too: one longer read costs less than
# a second request to the disk, up to the point where the gaps' bytes cost more than the
# requests they save (docs/decisions/hot-set.md).
MERGE_GAP = 64 << 10
LOOKUP_THREADS = 16
WILLNEED_CHUNK = 2 << 20  # under any read-ahead maximum (read_ahead_kb, the device's max I/O)
PAGEMAP_CHUNK = 1 << 18  # pages per pagemap read: 2 MiB of entries for 1 GiB of addresses
# A pagemap entry's flags, in its top byte: bit 63 present, bit 61 a page of the file (or
# shared anonymous), not a private copy. Each value of that byte maps to a page class.
_PRESENT = 1 << (63 - 56)
_FILE_PAGE = 1 << (61 - 56)
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_PAGE_CLASS = bytes((b"o"[0] if b & _FILE_PAGE else b"c"[0]) if b & _PRESENT else 0 for b in range(256))
# Spelt with a literal first character (not `o+`), so the regular expression engine skips to
# each run's start with its fast search: 2-3 times faster over absent pages.
_OWN_RUN = re.compile(b"oo*")
_COPY_RUN = re.compile(b"cc*")


# When a range is needed, which is the order it is read in.
STAGE_COPIED = 0  # library pages CRIU writes the tree's private copies over as it restores
STAGE_CRIU = 1  # page-image runs CRIU reads while it restores (the ones it does not map)
STAGE_LIBRARY = 2  # library pages the running tree reads (code, read-only data) to serve /health
STAGE_TREE = 3  # page-image pages the running tree faulted in to serve /health
# Later steps of the restore come after, library pages first: step 0 serves /health, step 1
# takes the weights back, step 2 is the first completion.


def tree_stage(step: int, library: bool) -> int:
    """The stage of the pages the running tree first needed in restore step `step`."""
    return STAGE_LIBRARY + 2 * step + (0 if library else 1)


@dataclass
class HotFile:
    path: str  # relative to the snapshot for its own files, else absolute
    size: int
    mtime_ns: int  # 0 for the snapshot's own files (the manifest's checksums cover those)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), sorted
    stage: int = STAGE_TREE

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass
class HotSet:
    files: list[HotFile] = field(default_factory=list)
    # "mmap": learned from a tree that mapped its page images (their ranges are in the set);
    # "copy": from one CRIU copied them into (the set then has none of their ranges)
    mode: str = "mmap"

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def as_dict(self) -> dict[str, object]:
        return {
            "version": VERSION,
            "mode": self.mode,
            "files": [
                {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "ranges": f.ranges, "stage": f.stage}
                for f in self.files
            ],
        }


def _merge(pages: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        off = p * PAGE
        if out and off - (out[-1][0] + out[-1][1]) <= MERGE_GAP:
            start, _ = out[-1]
            out[-1] = (start, off + PAGE - start)
        else:
            out.append((off, PAGE))
    return out


def _mappings(pid: int, regular: dict[str, bool]) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of each mapping of a regular file. Device files are left
    out: a GPU process maps /dev/nvidia* over address ranges of many GB, and /dev/shm holds the
    shared-memory queues a restore puts back whole from the snapshot's copies. `regular`
    caches the verdict per path."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].startswith("/dev/"):
                continue
            path = parts[5]
            if path not in regular:
                try:
                    regular[path] = stat.S_ISREG(os.stat(path).st_mode)
                except OSError:  # deleted, or gone since
                    regular[path] = False
            if regular[path]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, int(parts[2], 16), path))
    return out


def _present(pm: BinaryIO, lo: int, hi: int, base: int = 0) -> tuple[list[range], list[range]]:
    """Runs of present pages in [lo, hi), as page indexes from `lo` plus `base`: the file's
    own pages, and private copies. Read from an open /proc/PID/pagemap in bounded chunks
    (8 bytes per page: a large mapping must not need a buffer of its own size). The flags
    are in each entry's top byte: that byte of every entry (one slice), mapped to a class
    per page (one translate), then runs of a class found by a regular expression, all in C:
    as fast as numpy over the whole entries, and no numpy to import on the restore path."""
    own: list[range] = []
    copies: list[range] = []
    first, end = lo // PAGE, hi // PAGE
    for start in range(first, end, PAGEMAP_CHUNK):
        n = min(PAGEMAP_CHUNK, end - start)
        pm.seek(start * 8)
        flags = pm.read(n * 8)[_TOP_BYTE::8].translate(_PAGE_CLASS)
        shift = start - first + base
        own += [range(m.start() + shift, m.end() + shift) for m in _OWN_RUN.finditer(flags)]
        copies += [range(m.start() + shift, m.end() + shift) for m in _COPY_RUN.finditer(flags)]
    return own, copies


@dataclass
class Capture:
    """The file pages a tree has in memory at one moment, by path (page indexes in the file)."""

    pages: dict[str, set[int]] = field(default_factory=dict)  # the file's own pages
    copies: dict[str, set[int]] = field(default_factory=dict)  # private copies (written)
    mapped: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # (offset, length)


def capture(pids: Iterable[int]) -> Capture:
    """What the processes `pids` have in memory now (see the module docstring)."""
    cap = Capture()
    regular: dict[str, bool] = {}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
            for lo, hi, offset, path in _mappings(pid, regular):
                cap.mapped.setdefault(path, []).append((offset, hi - lo))
                own, copied = _present(pm, lo, hi, offset // PAGE)
                # every mapped file is kept, even with nothing present: CRIU opens each by path,
                # and from a cold cache each path lookup is a few random reads
                cap.pages.setdefault(path, set()).update(*own)
                cap.copies.setdefault(path, set()).update(*copied)
    return cap


def learn(pids: Iterable[int], snapshot: Path, earlier: Sequence[Capture] = ()) -> HotSet:
    """The file pages the processes `pids` have in memory now. The tree's own are staged by the
    first of the `earlier` captures (one per finished restore step, in order) that had
    them; pages none of them had belong to the step after the last."""
    snapshot = snapshot.absolute()
    now = capture(pids)
    steps = [*earlier, now]
    files = []
    mapped_images = any(Path(p).is_relative_to(snapshot) and _PAGES_IMAGE.search(p) for p in now.mapped)
    for path, got in sorted(now.pages.items()):
        try:
            st = os.stat(path)
        except OSError:
            continue
        p = Path(path)
        if p.is_relative_to(snapshot):
            key = str(p.relative_to(snapshot))
            # the tree's own faults bring a page image's pages in, read or written
            by_step = [c.pages.get(path, set()) | c.copies.get(path, set()) for c in steps]
            files += _staged(key, st.st_size, 0, got | now.copies[path], by_step, library=False)
            copied = _complement(now.mapped[path], st.st_size)
            if copied:
                files.append(HotFile(key, st.st_size, 0, copied, STAGE_CRIU))
        else:
            # a page with a private copy in any process was read when CRIU wrote that copy
            written = _ranges(now.copies[path], st.st_size)
            if written:
                files.append(HotFile(path, st.st_size, st.st_mtime_ns, written, STAGE_COPIED))
            by_step = [c.pages.get(path, set()) for c in steps]
            files += _staged(path, st.st_size, st.st_mtime_ns, got - now.copies[path], by_step, library=True)
    return HotSet(files, "mmap" if mapped_images else "copy")


def _staged(
    key: str, size: int, mtime_ns: int, pages: set[int], by_step: list[set[int]], *, library: bool
) -> list[HotFile]:
    """`pages` of one file, one HotFile per restore step that first had some of them (a page
    inside an earlier step's merged range is read with it). A file with none still gets one:
    `read` looks every path up, since CRIU opens each mapped file by path."""
    out = []
    done: set[int] = set()
    for step, seen in enumerate(by_step):
        new = (pages if step == len(by_step) - 1 else pages & seen) - done
        ranges = _ranges(new, size)
        if ranges:
            out.append(HotFile(key, size, mtime_ns, ranges, tree_stage(step, library)))
            done.update(q for o, n in ranges for q in range(o // PAGE, (o + n + PAGE - 1) // PAGE))
    return out or [HotFile(key, size, mtime_ns, [], tree_stage(0, library))]


def _ranges(pages: set[int], size: int) -> list[tuple[int, int]]:
    """`pages` merged into (offset, length) ranges, cut at the end of a file of `size` bytes."""
    return [(o, min(n, size - o)) for o, n in _merge(pages) if o < size]


def _complement(covered: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of [0, size) that no (offset, length) in `covered` reaches."""
    out = []
    pos = 0
    for off, n in sorted(covered):
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def path_of(snapshot: Path) -> Path:
    return snapshot / LOCAL_DIR / HOT_FILE


def save(snapshot: Path, hot: HotSet) -> bool:
    """Keep `hot` beside the snapshot; False where the snapshot cannot be written (a read-only
    volume): the hint is then simply not kept."""
    try:
        (snapshot / LOCAL_DIR).mkdir(mode=0o700, exist_ok=True)  # private, as the snapshot
        atomic.write_text(path_of(snapshot), json.dumps(hot.as_dict()))
    except OSError:
        return False
    return True


def load(snapshot: Path, sizes: dict[str, int], mode: str | None = None) -> HotSet | None:
    """The hot set learned for this snapshot, keeping only the snapshot's own files that are
    still the size they were (`sizes`: by manifest path). None if there is none or it is
    unreadable: a hint that cannot be read is no hint. Other files (libraries) are checked as
    `read` opens them, in parallel: a stat of each here, one after another, would wait on the
    cold disk once per library.
    A restore in mmap `mode` takes no set learned from a tree CRIU copied (it has none of the
    page images' ranges: the tree would fault them in alone, page by page)."""
    try:
        raw = json.loads(path_of(snapshot).read_text())
        if raw.get("version") != VERSION:
            return None
        if mode == "mmap" and raw.get("mode") != "mmap":
            return None
        files = []
        for f in raw["files"]:
            ranges = [(int(o), int(n)) for o, n in f["ranges"]]
            hf = HotFile(str(f["path"]), int(f["size"]), int(f["mtime_ns"]), ranges, int(f["stage"]))
            if not hf.path.startswith("/") and sizes.get(hf.path) != hf.size:
                continue
            files.append(hf)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return HotSet(files, str(raw.get("mode")))


def read(
    snapshot: Path,
    hot: HotSet,
    order: Callable[[HotFile], tuple[int, str]],
    stop: Callable[[], bool] = lambda: False,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Bring the hot ranges into the page cache, in `order`, each file's ranges in file order;
    returns the bytes read. A file that cannot be read, or a library that changed since the set
    was learned (size or mtime), is skipped (it is only a hint)."""
    files = sorted(hot.files, key=order)
    paths = [Path(f.path) if f.path.startswith("/") else snapshot / f.path for f in files]
    # Path lookups and first pages first, many at once: after a cache drop each costs dentry,
    # inode and header reads, and CRIU opens every mapped file by path and reads its ELF header
    # one after the other: read ahead in parallel, those opens and first pages no longer wait
    # on the disk one by one inside CRIU's step (docs/decisions/hot-set.md).
    first: dict[Path, HotFile] = {}  # each path once, in the order it is first needed
    for f, path in zip(files, paths, strict=True):
        first.setdefault(path, f)
    with ThreadPoolExecutor(LOOKUP_THREADS) as pool:
        same = dict(zip(first, pool.map(_lookup, first, first.values()), strict=True))
    done = 0
    for f, path in zip(files, paths, strict=True):
        if stop():
            break
        if not f.ranges or not same[path]:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            for off, n in f.ranges:
                if stop():
                    break
                # WILLNEED queues the reads and returns (in chunks: the kernel cuts one request
                # at its read-ahead maximum and drops the rest).
                for at in range(off, off + n, WILLNEED_CHUNK):
                    os.posix_fadvise(fd, at, min(WILLNEED_CHUNK, off + n - at), os.POSIX_FADV_WILLNEED)
            # A page WILLNEED did not bring (memory pressure) is then read alone, not with a
            # read-ahead window around it.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for off, n in f.ranges:
                if stop():
                    break
                # Wait for the queued reads in order: one byte of each chunk's last page blocks
                # until that page is in. A mapping populated over the range waits as well, but
                # mapping every page costs CPU that CRIU and the tree need on a small machine
                # (docs/decisions/hot-set.md).
                for at in range(off, off + n, WILLNEED_CHUNK):
                    os.pread(fd, 1, min(at + WILLNEED_CHUNK, off + n) - 1)
                done += n
                if on_bytes is not None:
                    on_bytes(n)
        except OSError:
            pass
        finally:
            os.close(fd)
    return done


def advise(paths: Iterable[str | Path]) -> None:
    """Queue reads of whole files without waiting for them (WILLNEED, in chunks the kernel does
    not cut), many files at once: from a cold cache each open is itself a few random reads. A
    file that cannot be opened is skipped. For what a restore reads before any hot range: the
    snapshot's small images."""
    with ThreadPoolExecutor(LOOKUP_THREADS) as pool:
        list(pool.map(_advise, paths))


def _advise(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        for at in range(0, size, WILLNEED_CHUNK):
            os.posix_fadvise(fd, at, min(WILLNEED_CHUNK, size - at), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lookup(path: Path, f: HotFile) -> bool:
    """The path's dentries and inode, and the file's first page: CRIU reads each mapped ELF
    file's header and build-id note as it restores the mapping, one file after another.
    Whether the file is still the one the set was learned on (a library's size and mtime; a
    snapshot file's size was checked against its manifest by `load`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if f.path.startswith("/") and (st.st_size != f.size or st.st_mtime_ns != f.mtime_ns):
            return False  # an upgraded library: its old ranges mean nothing
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # that page, not a read-ahead window
        os.pread(fd, PAGE, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
