"""Content-addressed sharing of weight files: snapshots of the same model share one file.

A dumped file is named by the xxh3-128 of its data region (already in its index) in a store
directory, and every snapshot holds a hard link to it. Hard links rather than references keep
each snapshot self-contained (copy it anywhere and it still restores) while the disk holds
the bytes once; the store's own link keeps the file while any snapshot is deleted. Where the
store is on another filesystem than the snapshot the file stays unshared (said in the result).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from fastvllm.runtime import config
from fastvllm.weights import fileformat

SUFFIX = ".fvw"


def store_dir() -> Path:
    """FASTVLLM_WEIGHTS_STORE, else /var/lib/fastvllm/weights for root, else the user's cache."""
    return config.WEIGHTS_STORE.get()


@dataclass
class Shared:
    key: str  # xxh3-128 of the data region
    store_path: Path | None  # None when the file could not be shared
    deduplicated: bool  # an identical file was already there: the new copy was replaced by a link
    reason: str = ""


def share(path: Path, store: Path | None = None) -> Shared:
    """Put `path` into the store (or swap it for the identical file already there)."""
    store = store or store_dir()
    idx = fileformat.read_index(path)
    key = idx.data_xxh3_128
    try:
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        return Shared(key, None, False, f"cannot create {store}: {e.strerror}")
    target = store / f"{key}{SUFFIX}"
    try:
        if target.exists() and target.stat().st_size == idx.file_size:
            if os.path.samefile(target, path):
                return Shared(key, target, False)
            tmp = path.with_name(f".{path.name}.link")
            os.link(target, tmp)
            os.replace(tmp, path)  # atomic: the snapshot never lacks its weights
            return Shared(key, target, True)
        tmp = store / f".{key}.{os.getpid()}.tmp"
        os.link(path, tmp)
        os.replace(tmp, target)
        return Shared(key, target, False)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.with_name(f".{path.name}.link").unlink()
        why = "the store is on another filesystem" if e.errno == errno.EXDEV else e.strerror
        return Shared(key, None, False, f"not shared: {why}")


def unused(store: Path | None = None) -> list[Path]:
    """Files only the store still links to (no snapshot uses them)."""
    store = store or store_dir()
    if not store.is_dir():
        return []
    return [p for p in store.glob(f"*{SUFFIX}") if p.stat().st_nlink == 1]
