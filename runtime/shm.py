"""/dev/shm files a tree maps or holds open, kept with the snapshot.

CRIU records a shared file mapping by path, not content: vLLM's shared-memory message
queues (/dev/shm/psm_*) would have to survive unchanged on the host until the restore, and
they do not (the restored server's resource tracker unlinks them at exit, a reboot clears
them). So their bytes go into the snapshot, copied while CRIU holds the tree frozen, and are
put back before each restore. Copies are sparse: the queues are mostly holes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastvllm.runtime import sparse

SHM = Path("/dev/shm")
_CHUNK = 4 << 20


def files_of(pids: list[int]) -> list[Path]:
    """Existing (linked) /dev/shm files that the processes map or have open."""
    found: set[Path] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if (
                    len(parts) == 6
                    and parts[5].startswith("/dev/shm/")
                    and not parts[5].endswith("(deleted)")
                ):
                    found.add(Path(parts[5]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                    found.add(Path(target))
        except OSError:
            continue
    return sorted(p for p in found if p.is_file())


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy data extents only (SEEK_DATA/SEEK_HOLE); the destination has the same size and mode.
    Written to a temporary name and renamed, so a reader never sees half a file."""
    tmp = dst.with_name(f".{dst.name}.fastvllm-tmp")
    st = src.stat()
    with open(src, "rb", buffering=0) as fi, open(tmp, "wb", buffering=0) as fo:
        fin, fout = fi.fileno(), fo.fileno()
        size = st.st_size
        # reads fetch their run of data and no read-ahead window past it into the hole
        os.posix_fadvise(fin, 0, 0, os.POSIX_FADV_RANDOM)
        os.ftruncate(fout, size)
        for data, n in sparse.data_extents(fin, size):
            off, hole = data, data + n
            while off < hole:
                buf = os.pread(fin, min(_CHUNK, hole - off), off)
                if not buf:
                    break
                os.pwrite(fout, buf, off)
                off += len(buf)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, dst)


def hook_script(files: list[Path], dest: Path) -> str:
    """A CRIU action script that copies `files` into `dest` at post-dump, while the tree is
    still frozen (so --leave-running gets a consistent copy too). The link_remap.N links CRIU
    made in /dev/shm during this dump are moved, not copied: their names repeat from dump to
    dump, and a stale one makes the next dump fail with 'Can't link remap ... File exists'."""
    quoted = " ".join(f"'{f}'" for f in files)
    return (
        "#!/bin/sh\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
        f"mkdir -p '{dest}' || exit 1\n"
        f"for f in {quoted}; do\n"
        '  [ -f "$f" ] || continue\n'
        f"  cp --sparse=always --preserve=mode,ownership \"$f\" '{dest}/' || exit 1\n"
        "done\n"
        "for f in /dev/shm/link_remap.*; do\n"
        '  [ -f "$f" ] || continue\n'
        f'  cp --preserve=mode,ownership "$f" \'{dest}/\' && rm -f "$f" || exit 1\n'
        "done\n"
    )


def remove(files: list[Path]) -> None:
    """Unlink /dev/shm files of a tree that is gone (killed trees leave them behind)."""
    for f in files:
        f.unlink(missing_ok=True)


def put_back(saved: Path) -> list[Path]:
    """Before a restore: the snapshot's copies go back to /dev/shm under their names, with the
    modes the originals had (CRIU refuses a file whose mode differs from the one it recorded)."""
    if not saved.is_dir():
        return []
    modes = _kept_modes(saved)
    out = []
    for f in sorted(saved.iterdir()):
        if f.name == MODES_FILE:
            continue
        copy_sparse(f, SHM / f.name)
        if f.name in modes:
            os.chmod(SHM / f.name, modes[f.name])
        out.append(SHM / f.name)
    return out


# Beside the copies in a snapshot: each original's mode, since the copies themselves are made
# private (0600, runtime.private) and a restore must put the originals' modes back.
MODES_FILE = ".fastvllm-modes.json"


def keep_modes(saved: Path) -> None:
    """Record the modes of the copies in `saved` (as dumped: the originals') before they are
    made private; once per snapshot (a second call keeps the first record)."""
    import json

    if not saved.is_dir() or (saved / MODES_FILE).exists():
        return
    modes = {f.name: f.lstat().st_mode & 0o7777 for f in sorted(saved.iterdir()) if f.is_file()}
    fd = os.open(saved / MODES_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(modes, out)


def _kept_modes(saved: Path) -> dict[str, int]:
    import json

    try:
        raw = json.loads((saved / MODES_FILE).read_text())
        return {str(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # a snapshot from before the copies were private: they have the modes


# What vLLM's shared-memory message queues, multiprocessing's named semaphores and CRIU's
# --link-remap leave in /dev/shm when their processes are killed.
ORPHAN_PATTERNS = ("psm_*", "sem.mp-*", "link_remap.*")


def held() -> set[Path]:
    """/dev/shm files some live process maps or holds open, under their name or, like a POSIX
    semaphore (mapped under the temporary name sem_open created it with), only by inode: a
    live server's `sem.mp-*` that a child is about to open by name is held, not an orphan."""
    import psutil

    return set(names_of([p.pid for p in psutil.process_iter()]))


def orphans(claimed: set[str] | None = None) -> list[Path]:
    """vLLM's and CRIU's /dev/shm files (ORPHAN_PATTERNS) that no process maps or holds open
    and no operation in flight has `claimed`: what a killed tree leaves behind."""
    found = {p for pat in ORPHAN_PATTERNS for p in SHM.glob(pat) if p.is_file()}
    if not found:
        return []
    skip = held() | {Path(c) for c in claimed or ()}
    return sorted(found - skip)


def names_of(pids: list[int]) -> list[Path]:
    """`files_of`, and the names still linked to /dev/shm files the processes map only under a
    deleted name: a POSIX semaphore's (sem_open creates it under a temporary name, maps it,
    links it to its real name, `sem.mp-*` for Python's multiprocessing, and unlinks the
    temporary one). What to remove once the processes are gone."""
    found = set(files_of(pids))
    inodes: set[int] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm/") and parts[5].endswith("(deleted)"):
                    inodes.add(int(parts[4]))
        except (OSError, ValueError):
            continue
    if inodes:
        for p in SHM.iterdir():
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_ino in inodes:
                found.add(p)
    return sorted(found)
