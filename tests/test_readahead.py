"""The restore's read-ahead and its order: which file first, checksums on the way, a claimed
file left to its claimant. Real files on disk; no CRIU or vLLM needed (the end-to-end tests
restore a real server with the read-ahead on)."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from fastvllm.prefetch import residency
from fastvllm.restore import order
from fastvllm.restore.readahead import ReadAhead
from fastvllm.runtime import manifest
from fastvllm.runtime.errors import IntegrityError


def _pagemap(pages_id: int) -> bytes:
    """A CRIU pagemap image's start: two magic words, then the length-prefixed head entry."""
    head = bytes([0x08]) + _varint(pages_id)
    return struct.pack("<III", 0x54564319, 0x56084025, len(head)) + head


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _entry(root: Path, rel: str, data: bytes) -> manifest.FileEntry:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return manifest.FileEntry(rel, len(data), manifest.hash_file(p) or "")


def test_pages_id_reads_the_pagemap_head(tmp_path: Path) -> None:
    for n in (1, 2, 300):
        (tmp_path / "pm.img").write_bytes(_pagemap(n) + b"\x00" * 32)
        assert order.pages_id(tmp_path / "pm.img") == n
    (tmp_path / "junk.img").write_bytes(b"\x01\x02")
    assert order.pages_id(tmp_path / "junk.img") is None


def test_restore_order_follows_the_process_tree(tmp_path: Path) -> None:
    # root 100 owns pages-2.img, its child 250 owns pages-1.img: root's pages come first.
    files = [
        _entry(tmp_path, "criu/pages-1.img", b"a" * 10),
        _entry(tmp_path, "criu/pages-2.img", b"b" * 10),
        _entry(tmp_path, "criu/pagemap-100.img", _pagemap(2)),
        _entry(tmp_path, "criu/pagemap-250.img", _pagemap(1)),
        _entry(tmp_path, "criu/core-100.img", b"c"),
        _entry(tmp_path, "criu/pstree.img", b"p"),
        _entry(tmp_path, "criu/inventory.img", b"i"),
        _entry(tmp_path, "weights/model.fvw", b"w"),
        _entry(tmp_path, "shm/psm_1", b"s"),
        _entry(tmp_path, "zzz/other", b"o"),
    ]
    m = manifest.Manifest.__new__(manifest.Manifest)
    m.files, m.weights_file, m.weights_files = files, "weights/model.fvw", []
    m.server = manifest.ServerSpec.__new__(manifest.ServerSpec)
    m.server.tree_pids = [100, 250]
    got = [e.path for e in order.restore_order(tmp_path, m)]
    assert got[0] == "shm/psm_1"
    assert got[1:3] == ["criu/inventory.img", "criu/pstree.img"]
    assert got.index("criu/pages-2.img") < got.index("criu/pages-1.img")
    assert max(got.index("criu/core-100.img"), got.index("criu/pagemap-250.img")) < got.index(
        "criu/pages-2.img"
    )
    assert got[-2:] == ["weights/model.fvw", "zzz/other"]
    assert sorted(got) == sorted(e.path for e in files)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("verify", [True, False])
def test_readahead_reads_every_file_into_the_page_cache(tmp_path: Path, verify: bool) -> None:
    entries = [_entry(tmp_path, f"criu/pages-{i}.img", os.urandom(3 << 20)) for i in range(3)]
    for e in entries:
        _evict(tmp_path / e.path)
    seen: list[int] = []
    stats = ReadAhead(tmp_path, entries, verify=verify, on_bytes=seen.append).start().wait()
    assert stats.bytes == sum(seen) == sum(e.size for e in entries)
    assert sorted(stats.verified) == (sorted(e.path for e in entries) if verify else [])
    assert all(residency.resident_fraction(tmp_path / e.path) > 0.99 for e in entries)


def test_readahead_finds_a_flipped_byte(tmp_path: Path) -> None:
    entries = [_entry(tmp_path, f"f{i}", os.urandom(1 << 20)) for i in range(2)]
    raw = bytearray((tmp_path / "f1").read_bytes())
    raw[12345] ^= 0x01
    (tmp_path / "f1").write_bytes(bytes(raw))
    ahead = ReadAhead(tmp_path, entries, verify=True).start()
    with pytest.raises(IntegrityError, match="f1"):
        ahead.wait()
    assert isinstance(ahead.error, IntegrityError)


def test_a_claimed_file_is_left_to_its_claimant(tmp_path: Path) -> None:
    big = _entry(tmp_path, "weights/model.fvw", os.urandom(8 << 20))
    small = _entry(tmp_path, "criu/core-1.img", b"x" * 100)
    ahead = ReadAhead(tmp_path, [small, big], verify=True)
    assert ahead.claim(big.path) is False  # not read yet: the claimant must check it itself
    stats = ahead.start().wait()
    assert stats.verified == [small.path]
    assert stats.bytes == small.size
    done = ReadAhead(tmp_path, [small], verify=True).start()
    done.wait()
    assert done.claim(small.path) is True  # read and checked whole before the claim


def test_wait_for_the_small_images_before_the_page_images(tmp_path: Path) -> None:
    core = _entry(tmp_path, "criu/core-1.img", b"registers")
    pages = _entry(tmp_path, "criu/pages-1.img", os.urandom(4 << 20))
    ahead = ReadAhead(tmp_path, [core, pages], verify=True).start()
    ahead.wait_for(order.before_pages([core, pages]))
    assert core.path in ahead.stats.verified
    ahead.wait()
    (tmp_path / core.path).write_bytes(b"registerz")
    bad = ReadAhead(tmp_path, [core, pages], verify=True).start()
    with pytest.raises(IntegrityError, match="core-1"):
        bad.wait_for({core.path})


def test_a_held_file_waits_for_release(tmp_path: Path) -> None:
    pages = _entry(tmp_path, "criu/pages-1.img", os.urandom(1 << 20))
    weights = _entry(tmp_path, "weights/model.fvw", os.urandom(1 << 20))
    ahead = ReadAhead(tmp_path, [pages, weights], verify=True).hold(weights.path).start()
    ahead.wait_for({pages.path})
    time.sleep(0.2)
    assert weights.path not in ahead.stats.verified  # still held
    ahead.release()
    assert sorted(ahead.wait().verified) == sorted([pages.path, weights.path])
    stopped = ReadAhead(tmp_path, [pages, weights], verify=True).hold(weights.path).start()
    stopped.wait_for({pages.path})
    stopped.stop()  # a restore that fails before CRIU finishes must not hang on a held file
    assert weights.path not in stopped.stats.verified


def test_a_held_file_does_not_block_the_files_behind_it(tmp_path: Path) -> None:
    """mmap restore: the page images are held while CRIU maps them, and the weight file behind
    them is checked meanwhile (else the loader pays a checksum pass of its own)."""
    pages = _entry(tmp_path, "criu/pages-1.img", os.urandom(1 << 20))
    weights = _entry(tmp_path, "weights/model.fvw", os.urandom(1 << 20))
    ahead = ReadAhead(tmp_path, [pages, weights], verify=True).hold(pages.path).start()
    ahead.wait_for({weights.path})
    assert pages.path not in ahead.stats.verified  # still held
    ahead.release()
    assert sorted(ahead.wait().verified) == sorted([pages.path, weights.path])
