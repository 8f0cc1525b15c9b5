"""The `fastvllm` console script: a small, standard-library launcher in front of the CLI.

Why it exists: importing the CLI and, for a restore, the restore pipeline takes a tenth of a
second with a warm page cache and seconds from a cold one, and until now nothing of the
restore started before all of it was imported. The launcher, in order:
1. hands the command to a running `fastvllm agent` (fastvllm/resident_client.py), which
   restores with no interpreter start or import at all;
2. for `fastvllm restore DIR`, starts a daemon thread that queues reads (WILLNEED) of what the
   restore needs first: the Python and shared-library files a restore imports (recorded by an
   earlier restore, `record_startup_files`), then the snapshot's manifest and its hot set
   (restore/hotset.py's `local/hot.json`, stage by stage). The thread submits I/O and
   returns; the kernel reads while the main thread imports, and when everything is already in
   the page cache (a sample says so) it does nothing;
3. runs a `restore` with only plain options (the agent client parses those) through
   fastvllm/restore_command.py, which imports neither typer (its parsing would import pydantic
   to check option values) nor, with --json into a pipe, rich; any other command through
   fastvllm.cli.

It imports nothing outside the standard library but the agent's client and the modes' enums,
standard library only themselves (tests/test_startup.py), so it starts in a few milliseconds.
The hot set's constants are restore/hotset.py's, copied (importing it would import the restore
stack); tests/test_startup.py checks that they agree.

The file list lives at `$FASTVLLM_HOME/startup-files.json` (runtime/config.py's HOME, read
here from the environment without importing config): one list per user and host, for every
snapshot, kept across reboots (a cold host is what it is for). It is a hint: a file that is
gone or changed is skipped, a list written by another interpreter (its `prefix`) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import NamedTuple

STARTUP_FILES = "startup-files.json"
STARTUP_VERSION = 1
HOT_SET = os.path.join("local", "hot.json")  # = restore.hotset.path_of(snapshot), relative
HOT_SET_VERSION = 7  # = restore.hotset.VERSION: another version's ranges are not read
WILLNEED_CHUNK = 2 << 20  # = restore.hotset.WILLNEED_CHUNK: under the kernel's read-ahead maximum
_SAMPLES = 3  # files probed for residency before deciding there is nothing to read ahead

# The modules loaded before main() runs (interpreter start-up, this module): read by then.
_EARLY = frozenset(sys.modules)
_launched = False  # set by main(): only restores started through the launcher record the list
_early_maps: frozenset[str] = frozenset()  # the shared libraries mapped when main() ran


def main() -> None:
    """The console script's entry point."""
    global _launched, _early_maps
    argv = sys.argv[1:]
    parsed = None  # a restore's options, when they are the plain ones (resident_client)
    try:
        from fastvllm import resident_client
    except ImportError:  # an install without the agent
        pass
    else:
        code = resident_client.forward(argv)
        if code is not None:
            sys.exit(code)
        parsed = resident_client.parse_restore(argv[1:]) if argv[:1] == ["restore"] else None
    _launched = True
    snapshot = _restore_target(argv)
    if snapshot is not None:
        prefetch = "--no-prefetch" not in argv
        reader = threading.Thread(
            target=_read_ahead, args=(snapshot, prefetch), name="readahead", daemon=True
        )
        reader.start()
        _early_maps = frozenset(_maps())
    if parsed is not None:  # the restore, without typer (restore_command says why); exits
        from fastvllm import restore_command

        restore_command.main(parsed)
    from fastvllm import cli

    cli.main(parsed)  # a parsed restore skips typer's parsing (cli._restore_parsed says why)


def _restore_target(argv: list[str]) -> str | None:
    """The snapshot directory of `fastvllm restore DIR ...` (the first argument naming a
    directory with a manifest), or None for any other command, or a restore in a container
    (its own file system: the host's hot set paths mean nothing there)."""
    if (
        not argv
        or argv[0] != "restore"
        or any(a == "--container" or a.startswith("--container=") for a in argv)
    ):
        return None
    for a in argv[1:]:
        if not a.startswith("-") and os.path.isfile(os.path.join(a, "manifest.json")):
            return a
    return None


def _read_ahead(snapshot: str, prefetch: bool) -> None:
    """Queue the reads, startup files first: the main thread waits on those now. Never fails:
    every file is a hint."""
    try:
        startup = _startup_files()
        hot = _hot_set(snapshot) if prefetch else []
        # modules imported late in a restore (the early ones, this process has just read)
        mods = startup.modules
        probe = [(p, 0) for p in mods[len(mods) // 2 :: max(1, len(mods) // 2 // _SAMPLES)]]
        if _cached(probe + [(h.path, h.ranges[0][0]) for h in hot[:1]]):
            return  # a warm page cache: nothing to gain, and the main thread needs the CPU
        for path in [*startup.modules, *startup.libraries]:
            _advise(path)
        for path in startup.stat:  # each import checks its source's mtime: inode reads
            with contextlib.suppress(OSError):
                os.stat(path)
        _advise(os.path.join(snapshot, "manifest.json"))
        for h in hot:
            _advise(h.path, h.ranges, h.size, h.mtime_ns)
    except Exception:  # a hint, on a thread nobody waits for: never an error of the command
        pass


def _home() -> str:
    """runtime/config.py's HOME, as it reads FASTVLLM_HOME (a path; default ~/.cache/fastvllm)."""
    raw = os.environ.get("FASTVLLM_HOME", "").strip()
    return os.path.expanduser(raw) if raw else os.path.join(os.path.expanduser("~"), ".cache", "fastvllm")


class _Startup(NamedTuple):
    modules: list[str]  # compiled modules and extensions, in the order they were imported
    libraries: list[str]  # shared libraries the extensions load (OpenSSL, libffi...)
    stat: list[str]  # the modules' sources (an import stats each to check its compiled file)


def _startup_files() -> _Startup:
    try:
        with open(os.path.join(_home(), STARTUP_FILES), "rb") as f:
            doc = json.load(f)
        if doc.get("version") != STARTUP_VERSION or doc.get("prefix") != sys.prefix:
            return _Startup([], [], [])
        return _Startup(*([str(p) for p in doc[k]] for k in _Startup._fields))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _Startup([], [], [])


class _HotFile(NamedTuple):
    path: str
    size: int
    mtime_ns: int  # 0: a file of the snapshot (the manifest's checksums cover those)
    ranges: list[tuple[int, int]]


def _hot_set(snapshot: str) -> list[_HotFile]:
    """The hot set's files with ranges, stage by stage (the order the restore needs them)."""
    try:
        with open(os.path.join(snapshot, HOT_SET), "rb") as f:
            doc = json.load(f)
        if doc.get("version") != HOT_SET_VERSION:
            return []
        out = []
        for e in sorted(doc["files"], key=lambda e: (int(e["stage"]), str(e["path"]))):
            path = str(e["path"])
            ranges = [(int(o), int(n)) for o, n in e["ranges"]]
            if ranges:
                where = path if path.startswith("/") else os.path.join(snapshot, path)
                out.append(_HotFile(where, int(e["size"]), int(e["mtime_ns"]), ranges))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _cached(probe: list[tuple[str, int]]) -> bool:
    """Is the page at each (path, offset) of `probe` in the page cache (a read that may not
    wait)? False for an empty probe: nothing is known."""
    buf = bytearray(1)
    for path, offset in probe:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:
            return False
        finally:
            os.close(fd)
    return bool(probe)


def _advise(path: str, ranges: list[tuple[int, int]] | None = None, size: int = 0, mtime_ns: int = 0) -> None:
    """Queue reads of `ranges` of `path` (None: the whole file), in chunks the kernel does not
    cut, without waiting for them. A library that is not the size and age the hot set learned
    (`mtime_ns` not 0) is skipped: an upgrade's old ranges mean nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if mtime_ns and (st.st_size != size or st.st_mtime_ns != mtime_ns):
            return
        for off, n in ranges if ranges is not None else [(0, st.st_size)]:
            for at in range(off, off + n, WILLNEED_CHUNK):
                os.posix_fadvise(fd, at, min(WILLNEED_CHUNK, off + n - at), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def record_startup_files() -> None:
    """After a restore in this process, keep the files it imported for the next launcher: each
    module's compiled file (or extension) in the order they were imported, then the shared
    libraries mapped (OpenSSL, libffi...), and the modules' sources. Only for restores the
    launcher started (not tests running the CLI in-process), and only rewritten when changed."""
    if not _launched:
        return
    modules, stat = _module_files()
    known = set(modules)
    startup = _Startup(modules, [p for p in _mapped_libraries() if p not in known], stat)
    if _startup_files() == startup:
        return
    doc = {"version": STARTUP_VERSION, "prefix": sys.prefix, **startup._asdict()}
    path = os.path.join(_home(), STARTUP_FILES)
    try:
        os.makedirs(_home(), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except OSError:  # a read-only home: the hint is not kept
        pass


def _module_files() -> tuple[list[str], list[str]]:
    """(compiled file or extension, source) of each module imported after the launcher."""
    read: dict[str, None] = {}
    stat: dict[str, None] = {}
    for name, mod in list(sys.modules.items()):
        spec = getattr(mod, "__spec__", None)
        if name in _EARLY or spec is None or not isinstance(spec.origin, str):
            continue
        cached = spec.cached if isinstance(spec.cached, str) and os.path.isfile(spec.cached) else None
        if cached is not None:
            read[cached] = None
            stat[spec.origin] = None
        elif os.path.isfile(spec.origin):  # an extension module, or a source without a cache
            read[spec.origin] = None
    return list(read), list(stat)


def _mapped_libraries() -> list[str]:
    """Shared libraries this process maps, once each, leaving out those mapped before the
    launcher ran (the interpreter's own)."""
    return [p for p in dict.fromkeys(_maps()) if p not in _early_maps]


def _maps() -> Iterator[str]:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.startswith("/") and ".so" in os.path.basename(path):
                    yield path
    except OSError:
        return


if __name__ == "__main__":  # python -m fastvllm.launcher: run it as the module the CLI imports
    from fastvllm.launcher import main as launcher_main

    launcher_main()
