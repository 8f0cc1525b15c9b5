"""Which of a snapshot's files this host has already checked, so a restore hashes a file once
per version of it instead of on every restore.

Why: checking every page image before a restore may call its server serving means reading
the whole image from disk, 1.4 GB for the tiny model's, while the restored tree itself needs a
fifth of it; from a cold page cache that read, not CRIU, set the restore's time. A file's
identity here is (device, inode, size, mtime, ctime): any write to it, a copy, a rename of
another file over it or a chmod changes the ctime, which no user can set, so a file whose
identity is unchanged holds the bytes that were hashed. The checksums guard against damage in
storage and transfer, not against someone with write access to the snapshot (who could
rewrite the manifest too).

The stamps live beside the snapshot (`local/verified.json`), outside its manifest; a volume
that cannot be written simply keeps none, and every restore then checks everything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fastvllm.runtime import atomic, manifest, system

LOCAL_DIR = manifest.LOCAL_DIR
VERIFIED_FILE = "verified.json"


def _load(snapshot: Path) -> dict[str, list[object]]:
    try:
        raw = json.loads((snapshot / LOCAL_DIR / VERIFIED_FILE).read_text())
        return {str(k): list(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def unchanged(snapshot: Path, files: Iterable[manifest.FileEntry]) -> set[str]:
    """The files (manifest paths) this host hashed, with the manifest's digest, and that have not
    changed since."""
    stamps = _load(snapshot)
    out = set()
    for e in files:
        stamp = stamps.get(e.path)
        if stamp and stamp[:-1] == system.file_identity(snapshot / e.path) and stamp[-1] == e.xxh3_128:
            out.add(e.path)
    return out


def record(snapshot: Path, files: Iterable[manifest.FileEntry]) -> bool:
    """Note that `files` were just hashed and matched; False where nothing could be written."""
    stamps = _load(snapshot)
    for e in files:
        ident = system.file_identity(snapshot / e.path)
        if ident is not None:
            stamps[e.path] = [*ident, e.xxh3_128]
    try:
        (snapshot / LOCAL_DIR).mkdir(mode=0o700, exist_ok=True)  # private, as the snapshot
        atomic.write_text(snapshot / LOCAL_DIR / VERIFIED_FILE, json.dumps(stamps))
    except OSError:
        return False
    return True


def forget(snapshot: Path) -> None:
    """Drop every stamp: the next restore checks every file again."""
    (snapshot / LOCAL_DIR / VERIFIED_FILE).unlink(missing_ok=True)
