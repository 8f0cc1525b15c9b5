"""The one place that runs the `criu` binary: find it, check it, dump a tree, restore it.

Flags are the ones that dumped and restored vLLM's process tree here (DESIGN.md):
established TCP and external unix sockets, link-remap for unlinked files, file locks.
The network lock is skipped because hosts without iptables fail with it. A snapshot of a
serving server (`snapshot --pid --leave-running`) is taken with its clients' connections open:
the dump skips connections still in the listening socket's accept queue (`--skip-in-flight`),
which the running server keeps and accepts once it is thawed, and which CRIU otherwise refuses
to dump (the snapshot would fail whenever a client connected during the dump).

Restore modes (how CRIU fills private anonymous memory): `copy` reads every page from the
pages images (stock CRIU); `mmap` maps the images copy-on-write instead (fastvllm's CRIU
patch, patches/criu: restore time no longer grows with the image, the images must stay in
place while the tree runs); `lazy` is CRIU's own userfaultfd restore (`criu lazy-pages`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastvllm.runtime import (
    atomic,
    config,
    faults,
    journal,
    mapped,
    native_build,
    proctree,
    restore_lock,
    signals,
    system,
)
from fastvllm.runtime.errors import CriuError, EnvironmentNotReadyError, UsageError
from fastvllm.runtime.modes import CriuRestoreMode

MIN_VERSION = (4, 2)
# --link-remap is needed for POSIX semaphores (sem_open maps a temporary name it then renames);
# CRIU leaves /dev/shm/link_remap.N hard links that a restore consumes, so fastvllm keeps copies
# of them with the snapshot (runtime/shm.py).
COMMON_FLAGS = ["--tcp-established", "--ext-unix-sk", "--link-remap", "--file-locks", "--ghost-limit", "64M"]
# The dump's own: see the module docstring for both.
DUMP_FLAGS = ["--network-lock", "skip", "--skip-in-flight"]
# scripts/setup.sh installs fastvllm's patched CRIU (stock 4.2.1 + patches/criu) here, beside a
# stock /usr/local/sbin/criu it leaves alone; it is a superset (copy stays its default), so it
# comes first.
PATCHED_CRIU = "/usr/local/libexec/fastvllm/criu"
# Where the patched CRIU keeps its kernel-feature cache (scripts/build_criu_mmap.sh builds it with
# this RUNDIR; stock CRIU uses /run and keeps nothing where /run is not tmpfs).
KDAT_DIR = Path("/dev/shm/fastvllm-criu-kdat")
_CANDIDATES = ("/usr/local/sbin/criu", "/usr/sbin/criu", "/usr/local/bin/criu")
# The modes a restore can run in (AUTO is resolved to one of them first).
RESTORE_MODES = (CriuRestoreMode.COPY, CriuRestoreMode.MMAP, CriuRestoreMode.LAZY)


@dataclass(frozen=True)
class Criu:
    path: str
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])


def find_criu() -> Criu:
    """CRIU from $FASTVLLM_CRIU, the PATH, or where scripts/setup.sh installs it."""
    chosen = config.CRIU.get()
    candidates = [str(chosen) if chosen else None, PATCHED_CRIU, shutil.which("criu"), *_CANDIDATES]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            version = _probe(c).version
            found = Criu(c, version)
            if found.version_tuple[:2] < MIN_VERSION:
                raise EnvironmentNotReadyError(
                    f"CRIU {version} at {c} is too old (need >= 4.2 on this kernel)",
                    hint="run scripts/setup.sh to build CRIU 4.2, or set FASTVLLM_CRIU to a newer one",
                )
            return found
    raise EnvironmentNotReadyError("CRIU not found", hint="run scripts/setup.sh, or set FASTVLLM_CRIU")


def criu_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"Version:\s*(\S+)", out)
    return m.group(1) if m else "unknown"


@dataclass(frozen=True)
class _Probe:
    """What a CRIU binary says about itself: its version and its options."""

    version: str
    help: str


PROBE_FILE = "criu-probe.json"


def _probe(path: str) -> _Probe:
    """The probe of the CRIU at `path`, run once per version of the binary and kept in
    fastvllm's home (`runtime.system.fastvllm_home`). Why: from a cold page cache, exec'ing
    `criu --version` reads CRIU and its libraries from the disk before anything else can
    start; kept, CRIU's files are read once, when it restores
    (docs/decisions/criu-startup.md)."""
    ident = system.file_identity(path)  # a rebuilt or replaced binary is probed again
    key = (path, *(ident or ()))
    if ident is not None and key in _PROBED:
        return _PROBED[key]
    store = system.fastvllm_home() / PROBE_FILE
    kept = _kept(store)
    got = kept.get(path)
    try:
        if ident is not None and isinstance(got, dict) and got["identity"] == ident:
            probe = _Probe(str(got["version"]), str(got["help"]))
            _PROBED[key] = probe
            return probe
    except (KeyError, TypeError):
        pass
    r = subprocess.run([path, "--help"], capture_output=True, text=True, check=False)
    probe = _Probe(criu_version(path), r.stdout + r.stderr)
    if ident is not None and ident == system.file_identity(path):  # not replaced while probed
        _PROBED[key] = probe
        kept = {k: v for k, v in kept.items() if os.path.exists(k)}  # not test binaries long gone
        kept[path] = {
            "identity": ident,
            "version": probe.version,
            "help": probe.help,
        }
        with contextlib.suppress(OSError):  # a home that cannot be written: probe again next time
            store.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(store, json.dumps(kept))
    return probe


_PROBED: dict[tuple[object, ...], _Probe] = {}  # this process's probes, by path and identity


def _kept(store: Path) -> dict[str, object]:
    try:
        raw = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


_CORE = re.compile(r"(?:^|/)core-(\d+)\.img$")


def image_thread_ids(paths: list[str]) -> list[int]:
    """The thread IDs a CRIU image restores: one core-TID.img per thread of every process.
    CRIU gives each thread its old ID back, and cannot where another holds it."""
    return sorted(int(m.group(1)) for p in paths if (m := _CORE.search(p)))


def check_ids_free(image_paths: list[str], tree_pids: list[int], tree: str = "tree") -> None:
    """Fail before CRIU runs if a live process holds one of the tree's PIDs or thread IDs: CRIU
    gives them all their old IDs back. A thread ID held elsewhere failed CRIU deep in its
    restorer ('Unable to create a thread: -17') with the tree half built, once the host's PID
    counter (pid_max 32768) wrapped around into a snapshot's IDs. Zombies of a stopped tree
    do not count here: the caller waits for them to be reaped."""
    busy = [pid for pid in tree_pids if proctree.alive(pid)]
    if busy:
        raise UsageError(
            f"PID {busy[0]} is in use; CRIU restores the snapshot's processes with their original PIDs",
            hint=f"stop that process (is the snapshotted {tree} still running?)",
        )
    taken = proctree.ids_taken(image_thread_ids(image_paths), tree_pids)
    if taken:
        tid, owner = taken[0]
        raise UsageError(
            f"thread ID {tid} is in use by PID {owner} ({len(taken)} of the snapshot's thread IDs are "
            "taken); CRIU restores the snapshot's threads with their original IDs",
            hint=f"stop PID {owner} if it can go; a container restore (--container) has IDs of its own",
        )


def _help(criu: Criu) -> str:
    """`criu --help`: fastvllm's patches announce their options there."""
    return _probe(criu.path).help


def supports_mmap(criu: Criu) -> bool:
    """Whether this CRIU has fastvllm's --mmap-pages restore (patches/criu)."""
    return "--mmap-pages" in _help(criu)


def supports_mmap_random(criu: Criu) -> bool:
    """Whether this CRIU can advise mapped runs MADV_RANDOM (patches/criu 0003)."""
    return "--mmap-pages-random" in _help(criu)


def supports_mmap_file(criu: Criu) -> bool:
    """Whether this CRIU can map the written pages of private file mappings from the page
    images too (patches/criu 0004)."""
    return "--mmap-pages-file" in _help(criu)


@functools.cache
def supports_lazy(criu: Criu) -> bool:
    """Whether CRIU's lazy restore works here (userfaultfd for non-cooperative tasks)."""
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        [criu.path, "check", "--feature", "uffd-noncoop"], capture_output=True, text=True, check=False
    )
    return r.returncode == 0


def restore_modes(criu: Criu) -> list[CriuRestoreMode]:
    """The restore modes this CRIU can run here, fastest first."""
    modes = [CriuRestoreMode.MMAP] if supports_mmap(criu) else []
    modes.append(CriuRestoreMode.COPY)
    if supports_lazy(criu):
        modes.append(CriuRestoreMode.LAZY)
    return modes


def resolve_mode(criu: Criu, requested: CriuRestoreMode | str, *, gpu: bool = False) -> CriuRestoreMode:
    """`auto` is the fastest mode measured to work (mmap with the patched CRIU, else copy); an
    explicit mode this CRIU cannot run fails here, before anything is restored.

    GPU snapshots (`gpu`) too: the restore reads the CUDA checkpoint's host copy of device
    memory ahead whole (restore.readahead `gpu_host_copy`) instead of letting the CUDA restore
    fault it in from the mapped images page by page, which made cold mmap restores slower than
    copy ones (docs/decisions/mmap-restore.md). Callers still say whether the snapshot is a GPU
    one, so that a rule of its own for them stays a one-line change."""
    try:
        requested = CriuRestoreMode(requested)  # the API takes the plain strings too
    except ValueError:
        raise UsageError(
            f"unknown CRIU restore mode {requested!r}",
            hint="choose one of: " + ", ".join(CriuRestoreMode),
        ) from None
    if requested is CriuRestoreMode.AUTO:
        return CriuRestoreMode.MMAP if supports_mmap(criu) else CriuRestoreMode.COPY
    if requested is CriuRestoreMode.MMAP and not supports_mmap(criu):
        raise EnvironmentNotReadyError(
            f"CRIU {criu.version} at {criu.path} cannot restore in mmap mode (no --mmap-pages: "
            "a CRIU without fastvllm's patch)",
            hint=f"run scripts/setup.sh to build the patched CRIU into {PATCHED_CRIU} (or set "
            "FASTVLLM_CRIU to it), or restore with --criu-restore copy",
        )
    if requested is CriuRestoreMode.LAZY and not supports_lazy(criu):
        raise EnvironmentNotReadyError(
            "CRIU's lazy restore needs userfaultfd for other processes, which this host lacks",
            hint="criu check --feature uffd-noncoop says why; restore with --criu-restore copy or mmap",
        )
    return requested


def criu_check(criu: Criu) -> tuple[bool, str]:
    r = subprocess.run([criu.path, "check"], capture_output=True, text=True, check=False)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def _benign(line: str) -> bool:
    # Printed on every run where CAP_SYS_RESOURCE is missing, or (in a container) where there
    # is no /dev/net/tun to probe; CRIU carries on either way.
    return "RLIMIT_NOFILE" in line or "Unable to create tun" in line


def log_tail(log: Path, lines: int = 12) -> str:
    """The part of a CRIU log worth showing: its error lines, then its last lines."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no CRIU log at {log})"
    errors = [line for line in text if ("Error" in line or "error" in line) and not _benign(line)][-8:]
    tail = text[-lines:]
    seen = set()
    out = []
    for line in [*errors, *tail]:
        if line not in seen:
            seen.add(line)
            out.append(line)
    return "\n".join(out)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def xcomp_preload() -> Path | None:
    """The LD_PRELOAD library that gives restored tasks AMX permission (native/xcomp_perm.c
    says why); None where the CPU has no AMX."""
    return native_build.build("xcomp_perm") if _cpu_has_amx() else None


def _private_kdat_dir() -> None:
    """Keep KDAT_DIR root's own and private before CRIU runs: CRIU trusts the cache it finds
    there, and /dev/shm is world-writable, so a directory (or anything) someone else put there
    is removed first. Without the directory CRIU simply probes the kernel again."""
    if os.geteuid() != 0:
        return
    for _ in range(3):
        try:
            st = os.lstat(KDAT_DIR)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError, OSError):
                os.mkdir(KDAT_DIR, 0o700)
            continue
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077:
            return
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(KDAT_DIR)
            else:
                os.unlink(KDAT_DIR)


def _run(
    criu: Criu,
    args: list[str],
    log: Path,
    what: str,
    pass_fds: tuple[int, ...] = (),
    preload: Path | None = None,
    *,
    own_group: bool = True,
) -> None:
    """Run CRIU to its end. It runs in a process group of its own (`own_group`), so a
    terminal's Ctrl-C reaches fastvllm only, and an interrupt (Ctrl-C, SIGTERM: a
    KeyboardInterrupt here) waits for CRIU before it goes on: CRIU killed mid-dump leaves its
    parasite code in the tree, mid-restore a half-built tree. The pipeline's undo then stops
    what it restored. The journal names the child while it runs (`runtime.journal`), for a
    recovery after fastvllm itself was killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _private_kdat_dir()
    env = dict(os.environ)
    if preload is not None:
        env["LD_PRELOAD"] = f"{preload} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(preload)
    cmd = [criu.path, *args, *faults.criu_args(what), f"-v{config.CRIU_LOG_LEVEL.get()}", "-o", str(log)]
    with tempfile.TemporaryFile() as output:
        with signals.shielded():  # a signal now is raised once CRIU is done
            proc = subprocess.Popen(
                cmd,
                stdout=output,
                stderr=output,
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL,
                env=env,
                process_group=0 if own_group else None,
            )
            with journal.child(proc.pid):
                faults.criu_started(what, proc.pid, log)
                _wait_through_interrupts(proc)
        output.seek(0)
        stderr = output.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = log_tail(log)
        errs = [ln for ln in tail.splitlines() if "Error" in ln and not _benign(ln)]
        first = re.sub(r"^\(\d+\.\d+\)\s*", "", errs[0]) if errs else stderr.strip()[-200:]
        raise CriuError(
            f"CRIU {what} failed: {first.strip()}",
            hint=f"full log: {log}",
            detail=tail,
        )


def _wait_through_interrupts(proc: subprocess.Popen[bytes]) -> None:
    """Wait for `proc` even when Ctrl-C comes (Python's own SIGINT handler, where
    runtime.signals is not installed: the API in a user's program); the first interrupt is
    raised once it has exited."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            proc.wait()
            break
        except KeyboardInterrupt as e:
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted


def dump(
    criu: Criu,
    pid: int,
    images: Path,
    log: Path,
    *,
    leave_running: bool = False,
    action_script: Path | None = None,
    shell_job: bool = False,
) -> None:
    """Dump the tree rooted at `pid` into `images`. `shell_job` when the root is not a session
    leader (a process started from a shell): its session then lives outside the tree."""
    mapping = mapped.pages_image_mappers([pid, *_descendants(pid)])
    if mapping and not supports_mmap(criu):
        # Stock CRIU would record those mappings as files: the new snapshot would need the old one.
        raise CriuError(
            f"PID {mapping[0]} maps the page images of the snapshot it was restored from (mmap "
            f"mode), and CRIU at {criu.path} has no fastvllm patch to dump them as memory",
            hint=f"dump with fastvllm's patched CRIU ({PATCHED_CRIU}, built by scripts/setup.sh)",
        )
    images.mkdir(parents=True, exist_ok=True)
    args = ["dump", "-t", str(pid), "-D", str(images), *COMMON_FLAGS, *DUMP_FLAGS]
    if leave_running:
        args.append("--leave-running")
    if shell_job:
        args.append("--shell-job")
    if action_script is not None:
        args += ["--action-script", str(action_script)]
    with restore_lock.criu_exclusive():  # one dump or restore at a time: link_remap names repeat
        _run(criu, args, log, "dump")


def _descendants(pid: int) -> list[int]:
    import psutil  # (~10 ms: not imported on a restore's path)

    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def restore(
    criu: Criu,
    images: Path,
    log: Path,
    inherit: dict[str, int],
    *,
    shell_job: bool = False,
    mode: CriuRestoreMode = CriuRestoreMode.COPY,
    random_faults: bool = False,
    own_cgroups: bool = True,
) -> int:
    """Restore detached; returns the root PID. `inherit` maps a path recorded in the image
    (without its leading '/') to an open descriptor that replaces it: the server's log, which
    has moved or grown since the dump, is handed over this way. `mode` is one of
    RESTORE_MODES (see resolve_mode); with `mmap` the restored tree keeps the page images
    mapped, so they must stay in place and unchanged while it runs. `random_faults` (mmap mode,
    where this CRIU can) makes a fault on the mapped page images read only its own page:
    right where a read-ahead already brought in what the tree will touch. Without `own_cgroups`
    the tree is restored into this process's cgroups instead of the ones it was dumped in (the
    caller moves it where it belongs): CRIU then mounts no cgroup yard, 10-25 ms of every
    restore (docs/benchmarks/gpu-restore.md)."""
    args = ["restore", "-D", str(images), *COMMON_FLAGS, "--restore-detached"]
    if not own_cgroups:
        args.append("--manage-cgroups=ignore")
    if shell_job:
        args.append("--shell-job")
    for key, fd in inherit.items():
        args += ["--inherit-fd", f"fd[{fd}]:{key}"]
    if mode == CriuRestoreMode.MMAP:
        args.append("--mmap-pages")
        if random_faults and supports_mmap_random(criu):
            args.append("--mmap-pages-random")
        if supports_mmap_file(criu):
            # A library's written pages (relocations, .data) are mapped from the images
            # instead of written over the library's own pages, which each write first read
            # from disk: a cold restore no longer reads those (docs/decisions/mmap-restore.md).
            args.append("--mmap-pages-file")
    daemon: int | None = None
    if mode == CriuRestoreMode.LAZY:
        # The lazy-pages daemon and the restore meet on a socket in a work directory of their own
        # (not the snapshot's image directory, which stays as it was published).
        work = _lazy_work(log)
        work.mkdir(mode=0o700, parents=True, exist_ok=True)  # inside the snapshot: private
        daemon = _start_lazy_daemon(criu, images, work, log.with_name(log.stem + "-lazy.log"))
        args += ["--lazy-pages", "-W", str(work)]
        scratch = None
        # unique: containers sharing a volume restore one snapshot as PID 1 each
        pidfile = work / f"restore-{uuid.uuid4().hex}.pid"
    else:
        scratch = _scratch_dir(log.parent)
        args += ["-W", str(scratch)]
        pidfile = scratch / "restore.pid"
    op = journal.current()  # if this process is killed, the next command removes the scratch
    noted = op.undo("remove_criu_work", path=str(scratch)) if op is not None and scratch else None
    args += ["--pidfile", str(pidfile)]
    try:
        # A shell job is restored into CRIU's own process group and session: it stays in the
        # caller's, as it was dumped from one.
        with restore_lock.criu_exclusive():
            _run(
                criu,
                args,
                log,
                "restore",
                pass_fds=tuple(inherit.values()),
                preload=xcomp_preload(),
                own_group=not shell_job,
            )
        return int(pidfile.read_text().strip())
    except BaseException:
        if daemon is not None:  # nothing will ask it for pages
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)
        raise
    finally:
        pidfile.unlink(missing_ok=True)
        if scratch is not None:
            remove_scratch(scratch)
        if noted is not None:
            noted.cancel()


def remove_scratch(scratch: Path) -> None:
    """CRIU's work directory, with the cgroup yard CRIU mounts in it (`.criu.cgyard.*`): a
    restore that fails (two restores of one snapshot raced, "Can't fork ... File exists") leaves
    the yard mounted, and a directory with mounts in it cannot be removed: it stayed in
    /dev/shm, 11 cgroup mounts each. Detached first (deepest first), then removed."""
    prefix = f"{scratch}/"
    with contextlib.suppress(OSError):
        mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines() if ln.strip()]
        libc = ctypes.CDLL(None, use_errno=True)
        for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            libc.umount2(os.fsencode(point), _MNT_DETACH)
    shutil.rmtree(scratch, ignore_errors=True)


_MNT_DETACH = 2


SCRATCH_PREFIX = "fastvllm-criu-work-"


def stale_scratch(claimed: set[str]) -> list[Path]:
    """CRIU work directories in /dev/shm (`_scratch_dir`) that a killed restore left: not
    `claimed` by an operation in flight (runtime.journal), named by no running process."""
    found = [p for p in Path("/dev/shm").glob(f"{SCRATCH_PREFIX}*") if p.is_dir() and str(p) not in claimed]
    if not found:
        return []
    import psutil

    in_use: set[str] = set()
    for proc in psutil.process_iter(["cmdline"]):
        in_use.update(proc.info["cmdline"] or ())
    return [p for p in found if str(p) not in in_use]


def _scratch_dir(fallback: Path) -> Path:
    """A private directory for CRIU's work files (its stats, its pidfile, its cgroup yard), on
    tmpfs where there is one, else under `fallback`.

    Why: in its work directory CRIU truncates the last restore's `stats-restore` and creates and
    removes its cgroup yard. On ext4 each frees blocks, which needs the block bitmaps (cold after
    the page cache was dropped) and, on a `discard` mount, a synchronous discard, on the cold
    restore's critical path. On tmpfs neither touches a disk (docs/decisions/criu-startup.md)."""
    with contextlib.suppress(OSError):
        return Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir="/dev/shm"))
    fallback.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".criu-work-", dir=fallback))


def _start_lazy_daemon(criu: Criu, images: Path, work: Path, log: Path) -> int:
    """`criu lazy-pages --daemon`: returns once its socket listens; the daemon serves the
    restored tree's page faults and pushes the remaining pages in the background, then exits
    by itself once every page is in (the tree hangs on a fault if it is killed before)."""
    pidfile = work / "lazy-pages.pid"
    pidfile.unlink(missing_ok=True)
    _run(
        criu,
        ["lazy-pages", "-D", str(images), "-W", str(work), "--daemon", "--pidfile", str(pidfile)],
        log,
        "lazy-pages",
    )
    return int(pidfile.read_text().strip())


def _lazy_work(log: Path) -> Path:
    return log.parent / f".lazy-{log.stem}"


def lazy_daemon_pid(log: Path) -> int | None:
    """The lazy-pages daemon started for the restore logged at `log`, if it still runs."""
    import psutil

    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int((_lazy_work(log) / "lazy-pages.pid").read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            return pid
        with contextlib.suppress(ChildProcessError):  # ours when we are a subreaper
            os.waitpid(pid, os.WNOHANG)
    return None


def wait_lazy_done(log: Path, timeout: float) -> bool:
    """Wait until the lazy-pages daemon of the restore logged at `log` has pushed every page
    and exited; False on timeout."""
    deadline = time.monotonic() + timeout
    while lazy_daemon_pid(log) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def image_bytes(images: Path) -> int:
    return sum(f.stat().st_size for f in images.iterdir() if f.is_file())
