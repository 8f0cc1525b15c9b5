"""A snapshot is private to its owner: every file 0600, every directory 0700.

Its page images hold the server's memory, the environment's secrets included (HF_TOKEN=...,
runtime.credentials), and its /dev/shm copies hold the server's message queues. CRIU writes
its images 0644 and vLLM its log 0644; the snapshot's own 0700 directory keeps other users
out only while nobody copies, moves or bind-mounts it, so each file is private on its own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastvllm.runtime import shm

FILE_MODE = 0o600
DIR_MODE = 0o700
SHM_DIR = "shm"  # where a snapshot keeps its /dev/shm copies (snapshot and restore pipelines)


def make_private(root: Path) -> int:
    """Make every file under `root` 0600 and every directory (`root` too) 0700; returns how many
    changed. Only modes that differ are changed: a chmod changes a file's ctime, which
    runtime.verified's stamps include, so an already private file keeps its stamp. The /dev/shm
    copies' own modes are kept aside first: a restore puts them back with them (CRIU checks a
    file's mode). Symbolic links are left alone (their targets are someone else's)."""
    shm.keep_modes(root / SHM_DIR)
    changed = 0
    for dirpath, _dirs, files in os.walk(root):
        here = Path(dirpath)
        changed += _chmod(here, DIR_MODE)
        for name in files:
            changed += _chmod(here / name, FILE_MODE)
    return changed


def _chmod(path: Path, mode: int) -> int:
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or stat.S_IMODE(st.st_mode) == mode:
        return 0
    os.chmod(path, mode)
    return 1


def loose(root: Path) -> list[Path]:
    """Files and directories under `root` that other users may read or enter (mode & 0o077),
    e.g. in a snapshot an older fastvllm wrote."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in files)]:
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and st.st_mode & 0o077:
                out.append(p)
    return out
