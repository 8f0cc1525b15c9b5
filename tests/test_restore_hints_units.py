"""What a host remembers about a snapshot and what a restore puts back beside CRIU: the
verified-file stamps, the hot set (range merging, keeping only files that are still what they
were, learning and reading ranges) and thread affinity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastvllm.prefetch import residency
from fastvllm.restore import hotset
from fastvllm.runtime import affinity, manifest, verified

PAGE = hotset.PAGE


def _snapshot(tmp_path: Path) -> tuple[Path, list[manifest.FileEntry]]:
    snap = tmp_path / "snap"
    (snap / "criu").mkdir(parents=True)
    (snap / "criu" / "pages-1.img").write_bytes(os.urandom(512 * PAGE))
    (snap / "criu" / "core-7.img").write_bytes(b"core")
    return snap, manifest.collect_files(snap)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages are dirty until written back, and those stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_recorded_file_is_trusted_until_it_changes(tmp_path: Path) -> None:
    snap, files = _snapshot(tmp_path)
    assert verified.unchanged(snap, files) == set()
    assert verified.record(snap, files)
    assert verified.unchanged(snap, files) == {"criu/pages-1.img", "criu/core-7.img"}
    # the same bytes written back still change the ctime: hashed again
    p = snap / "criu" / "core-7.img"
    time.sleep(0.01)
    p.write_bytes(p.read_bytes())
    assert verified.unchanged(snap, files) == {"criu/pages-1.img"}
    # a stamp for another digest (a new snapshot written over the old path) does not count
    other = [manifest.FileEntry(e.path, e.size, "0" * 32) for e in files]
    assert verified.unchanged(snap, other) == set()
    verified.forget(snap)
    assert verified.unchanged(snap, files) == set()


def test_stamps_are_not_part_of_the_snapshot(tmp_path: Path) -> None:
    snap, files = _snapshot(tmp_path)
    verified.record(snap, files)
    assert [e.path for e in manifest.collect_files(snap)] == [e.path for e in files]


def test_unreadable_stamps_mean_nothing_is_trusted(tmp_path: Path) -> None:
    snap, files = _snapshot(tmp_path)
    (snap / manifest.LOCAL_DIR).mkdir()
    (snap / manifest.LOCAL_DIR / verified.VERIFIED_FILE).write_text("{not json")
    assert verified.unchanged(snap, files) == set()
    assert verified.record(snap, files)  # and the next record replaces them
    assert len(verified.unchanged(snap, files)) == 2


def test_ranges_merge_across_small_gaps_only() -> None:
    gap = hotset.MERGE_GAP // PAGE
    got = hotset._merge([0, 1, 2, 2 + gap, 10 * gap, 3])
    assert got == [(0, (3 + gap) * PAGE), (10 * gap * PAGE, PAGE)]
    assert hotset._merge([]) == []


def test_what_no_mapping_covers_is_what_criu_copied() -> None:
    assert hotset._complement([(PAGE, PAGE), (4 * PAGE, 2 * PAGE), (5 * PAGE, PAGE)], 8 * PAGE) == [
        (0, PAGE),
        (2 * PAGE, 2 * PAGE),
        (6 * PAGE, 2 * PAGE),
    ]
    assert hotset._complement([], 3 * PAGE) == [(0, 3 * PAGE)]
    assert hotset._complement([(0, 4 * PAGE)], 3 * PAGE) == []


def test_a_hot_set_skips_files_that_changed(tmp_path: Path, willneed: list[tuple[str, int, int]]) -> None:
    """A page image of another size is dropped when the set is loaded (the manifest says its
    size); a library that changed or went since is skipped when the set is read, its ranges
    left unread, while an unchanged one is read (asked for: conftest's `willneed` says why
    the hints are checked, not the pages that arrive)."""
    snap, files = _snapshot(tmp_path)
    libs = [tmp_path / "libfoo.so", tmp_path / "libbar.so"]
    for lib in libs:
        lib.write_bytes(os.urandom(64 * PAGE))
    foo, bar = (lib.stat() for lib in libs)
    hot = hotset.HotSet(
        [
            hotset.HotFile("criu/pages-1.img", 512 * PAGE, 0, [(0, PAGE), (8 * PAGE, 2 * PAGE)]),
            hotset.HotFile(str(libs[0]), foo.st_size, foo.st_mtime_ns, [(PAGE, 8 * PAGE)]),
            hotset.HotFile(str(libs[1]), bar.st_size, bar.st_mtime_ns, [(PAGE, 16 * PAGE)]),
            hotset.HotFile(str(tmp_path / "gone.so"), 10, 1, [(0, 10)]),
        ]
    )
    assert hotset.save(snap, hot)
    sizes = {e.path: e.size for e in files}
    got = hotset.load(snap, sizes)
    assert got is not None and [f.path for f in got.files] == [f.path for f in hot.files]
    os.utime(libs[1], ns=(bar.st_atime_ns, bar.st_mtime_ns + 1))  # an upgraded library
    for p in [snap / "criu" / "pages-1.img", *libs]:
        _drop(p)
    assert hotset.read(snap, got, order=lambda f: (0, f.path)) == 3 * PAGE + 8 * PAGE
    image = str(snap / "criu" / "pages-1.img")
    asked = [(image, 0, PAGE), (image, 8 * PAGE, 2 * PAGE), (str(libs[0]), PAGE, 8 * PAGE)]
    assert sorted(willneed) == sorted(asked)
    assert residency.resident_pages(libs[1])[0] <= 1  # its first page at most: looked up, not read
    got = hotset.load(snap, sizes | {"criu/pages-1.img": 1})  # not the image it was learned on
    assert got is not None and "criu/pages-1.img" not in [f.path for f in got.files]
    hotset.path_of(snap).write_text("[]")
    assert hotset.load(snap, sizes) is None


def test_advising_files_asks_for_them_whole_without_waiting(
    tmp_path: Path, willneed: list[tuple[str, int, int]]
) -> None:
    """The small images are queued whole, in chunks the kernel does not cut, before the hot
    set; a missing one is skipped. The hints are checked (conftest's `willneed` says why)."""
    f = tmp_path / "criu-like"
    f.write_bytes(os.urandom(600 * PAGE))
    hotset.advise([str(tmp_path / "missing"), str(f)])
    size = 600 * PAGE
    chunks = [(at, min(hotset.WILLNEED_CHUNK, size - at)) for at in range(0, size, hotset.WILLNEED_CHUNK)]
    assert sorted(willneed) == [(str(f), at, n) for at, n in chunks]


def test_learning_finds_the_pages_a_process_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child maps the first 400 pages of a page image and reads pages 3 and 300: those, and
    only around them, are hot for the tree; the 112 pages no mapping covers are what CRIU would
    have copied, read first. Of a library mapped private, the page it wrote a copy of (as CRIU
    writes relocated pages) is read before CRIU starts, the page it only read after."""
    snap, _ = _snapshot(tmp_path)
    target = snap / "criu" / "pages-1.img"
    lib = tmp_path / "libfake.so"
    lib.write_bytes(os.urandom(64 * PAGE))
    _drop(target)  # else the freshly written file sits in large folios, mapped whole
    _drop(lib)
    monkeypatch.setattr(hotset, "PAGEMAP_CHUNK", 7)  # pagemap read in many chunks, none aligned
    code = (
        "import mmap, os, sys\n"
        f"f = open({str(target)!r}, 'rb')\n"
        f"m = mmap.mmap(f.fileno(), 400 * {PAGE}, prot=mmap.PROT_READ)\n"
        "m.madvise(mmap.MADV_RANDOM)\n"  # no read-ahead around the two faults
        f"_ = m[3 * {PAGE}] + m[300 * {PAGE}]\n"
        f"g = open({str(lib)!r}, 'rb')\n"
        f"c = mmap.mmap(g.fileno(), 64 * {PAGE}, flags=mmap.MAP_PRIVATE,"
        " prot=mmap.PROT_READ | mmap.PROT_WRITE)\n"
        "c.madvise(mmap.MADV_RANDOM)\n"
        f"c[10 * {PAGE}] = 1\n"  # a private copy, as CRIU writes it
        f"_ = c[40 * {PAGE}]\n"  # read only
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        hot = hotset.learn([child.pid], snap)
    finally:
        child.kill()
        child.wait()
    (img,) = [f for f in hot.files if f.path == "criu/pages-1.img" and f.stage == hotset.STAGE_TREE]
    (copied,) = [f for f in hot.files if f.path == "criu/pages-1.img" and f.stage == hotset.STAGE_CRIU]
    assert copied.ranges == [(400 * PAGE, 112 * PAGE)]
    assert img.mtime_ns == 0 and img.size == 512 * PAGE
    # two ranges, each at most the kernel's fault-around window (16 pages) of cached neighbours
    assert len(img.ranges) == 2 and all(n <= 16 * PAGE for _, n in img.ranges), img.ranges
    assert [o <= p * PAGE < o + n for (o, n), p in zip(img.ranges, (3, 300), strict=True)] == [True, True]
    (written,) = [f for f in hot.files if f.path == str(lib) and f.stage == hotset.STAGE_COPIED]
    (read,) = [f for f in hot.files if f.path == str(lib) and f.stage == hotset.STAGE_LIBRARY]
    assert written.ranges == [(10 * PAGE, PAGE)]
    assert read.mtime_ns == lib.stat().st_mtime_ns and any(o <= 40 * PAGE < o + n for o, n in read.ranges)
    assert not any(o <= 10 * PAGE < o + n for o, n in read.ranges)
    libraries = [f for f in hot.files if f.path.startswith("/")]  # the interpreter's too
    assert all(f.mtime_ns and f.stage in (hotset.STAGE_COPIED, hotset.STAGE_LIBRARY) for f in libraries)


def test_learning_stages_pages_by_the_step_that_first_needed_them(tmp_path: Path) -> None:
    """A child touches page 3 of a page image and page 40 of a library, is captured (a restore
    step ended), then touches pages 300 and 50: the first pair is read in the first step's
    stages, the second pair in the next step's, each library's before the page image's."""
    snap, _ = _snapshot(tmp_path)
    target = snap / "criu" / "pages-1.img"
    lib = tmp_path / "libfake.so"
    lib.write_bytes(os.urandom(64 * PAGE))
    _drop(target)
    _drop(lib)
    code = (
        "import mmap, sys\n"
        f"f, g = open({str(target)!r}, 'rb'), open({str(lib)!r}, 'rb')\n"
        f"m = mmap.mmap(f.fileno(), 400 * {PAGE}, prot=mmap.PROT_READ)\n"
        f"c = mmap.mmap(g.fileno(), 64 * {PAGE}, prot=mmap.PROT_READ)\n"
        "m.madvise(mmap.MADV_RANDOM)\n"
        "c.madvise(mmap.MADV_RANDOM)\n"
        f"_ = m[3 * {PAGE}] + c[40 * {PAGE}]\n"
        "print('one', flush=True)\n"
        "sys.stdin.readline()\n"
        f"_ = m[300 * {PAGE}] + c[50 * {PAGE}]\n"
        "print('two', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "one"
        first = hotset.capture([child.pid])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "two"
        hot = hotset.learn([child.pid], snap, [first])
    finally:
        child.kill()
        child.wait()

    def stage_of(path: str, page: int) -> int:
        (stage,) = [
            f.stage for f in hot.files if f.path == path for o, n in f.ranges if o <= page * PAGE < o + n
        ]
        return stage

    assert stage_of("criu/pages-1.img", 3) == hotset.tree_stage(0, library=False) == hotset.STAGE_TREE
    assert stage_of("criu/pages-1.img", 300) == hotset.tree_stage(1, library=False)
    assert stage_of(str(lib), 40) == hotset.tree_stage(0, library=True) == hotset.STAGE_LIBRARY
    assert stage_of(str(lib), 50) == hotset.tree_stage(1, library=True)
    assert hotset.STAGE_CRIU < hotset.STAGE_LIBRARY < hotset.STAGE_TREE < hotset.tree_stage(1, library=True)


def test_reading_a_hot_set_asks_for_its_ranges(tmp_path: Path, willneed: list[tuple[str, int, int]]) -> None:
    """The hot range is asked for, and only it (conftest's `willneed` says why the hints are
    checked, not the pages that arrive)."""
    snap, _ = _snapshot(tmp_path)
    target = snap / "criu" / "pages-1.img"
    _drop(target)
    before, total = residency.resident_pages(target)
    hot = hotset.HotSet([hotset.HotFile("criu/pages-1.img", 512 * PAGE, 0, [(8 * PAGE, 4 * PAGE)])])
    assert hotset.read(snap, hot, order=lambda f: (0, f.path)) == 4 * PAGE
    assert willneed == [(str(target), 8 * PAGE, 4 * PAGE)]
    assert total == 512 and before < 4


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs to bind a thread to one")
def test_thread_affinity_is_recorded_and_set_again() -> None:
    """What CRIU leaves out: a child bound to one CPU is recorded, loses the binding (as after a
    restore), and gets it back; a CPU that does not exist here is reported, not fatal."""
    one = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.sched_setaffinity(child.pid, {one})
        masks = affinity.record([child.pid])
        assert masks == {str(child.pid): [one]}
        os.sched_setaffinity(child.pid, os.sched_getaffinity(0))
        assert affinity.apply(masks) == []
        assert os.sched_getaffinity(child.pid) == {one}
        assert affinity.apply({str(child.pid): [10_000]}) == [str(child.pid)]
    finally:
        child.kill()
        child.wait()
