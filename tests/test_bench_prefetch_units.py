"""Pure-logic checks of what the prefetch benchmark (scripts/bench_prefetch.py) reads: how
runtime.mapped.smaps_rss splits a restored tree's resident memory by kind of mapping. Nothing
here starts a process."""

from __future__ import annotations

from fastvllm.runtime import mapped as bp

SMAPS = """\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:00 1234                       /usr/bin/python3.11
Size:               1024 kB
Rss:                 400 kB
7f0000000000-7f0000400000 rw-p 00200000 fd:00 99                         /snap/criu/pages-3.img
Size:               4096 kB
Rss:                1024 kB
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  12 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                   8 kB
7f0000600000-7f0000700000 rw-p 00000000 fd:00 98                         /snap/criu/pages-4.img (deleted)
Rss:                   4 kB
"""


def test_smaps_rss_splits_page_images_files_and_anonymous() -> None:
    got = bp.smaps_rss(SMAPS)
    assert got == {"page_image_rss": (1024 + 4) * 1024, "file_rss": 400 * 1024, "anon_rss": (12 + 8) * 1024}


def test_smaps_rss_of_nothing_is_zero() -> None:
    assert bp.smaps_rss("") == {"page_image_rss": 0, "file_rss": 0, "anon_rss": 0}
