"""The journal of operations in flight: what a snapshot or restore started and has not yet
finished, kept where the next fastvllm command finds it when no handler could clean up (a
SIGKILL, an OOM kill, a crash).

An `Operation` is a pipeline's undo stack (a contextlib.ExitStack): each step registers how
to undo itself as it goes. On a failure (or Ctrl-C, SIGTERM, SIGHUP: runtime.signals) the
stack unwinds in this process. Every undo registered with `undo()` is also written, as a
small recipe, to one JSON file per operation under the run directory (`<run dir>/ops/`, 0700,
files 0600), replaced atomically at each change: a persisted copy of the stack. The file
also names its owner (PID and start time, so a reused PID is not mistaken for it) and the
CRIU child running for it. It goes when the operation ends, however it ends in-process.

`recover()` (run by every stateful command, and by `fastvllm gc`) takes the files whose
owner is dead: it lets a CRIU still running for it finish (and kills one that does not), then
runs the recipes, last first (stop the server tree by its session, remove the staging
directory and the /dev/shm files), and prints one line per operation saying what it cleaned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.runtime import atomic, instances, proctree, shm
from fastvllm.runtime.signals import shielded

SUBDIR = "ops"
CRIU_WAIT_S = 300.0  # how long recover() lets an orphaned CRIU finish before it kills it


def journal_dir() -> Path:
    return instances.instances_dir() / SUBDIR


@dataclass
class Recipe:
    """One undo, as `recover()` can run it: an action of ACTIONS and its JSON arguments."""

    id: int
    action: str
    args: dict[str, Any]


@dataclass
class Entry:
    """One operation in flight, as written to its journal file."""

    id: str
    kind: str  # "snapshot" | "restore"
    owner_pid: int
    owner_start: int  # proctree.start_ticks of the owner: its PID alone may be reused
    started: int  # proctree.ticks_now() when it began: what it started, started after this
    subject: str  # the snapshot it writes or restores, for messages
    criu_pid: int = 0  # the CRIU child running for it, if one is
    criu_start: int = 0
    undo: list[Recipe] = field(default_factory=list)  # in the order registered

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        d = dict(d)
        d["undo"] = [Recipe(**r) for r in d.get("undo", [])]
        return cls(**d)

    def owner_alive(self) -> bool:
        return proctree.is_same(self.owner_pid, self.owner_start)


# --- the actions a recipe names: each idempotent, each returns what it did, in words ---------


def stop_tree(
    sid: int = 0, pids: list[int] | None = None, started: int = 0, grace: float = 10.0
) -> list[str]:
    """Stop the server tree an operation started: the processes of session `sid` (the root
    fastvllm launched; CRIU restores a tree's session too) and the PIDs `pids` (a restored
    tree's, known before CRIU gives it a root), and the sessions those lead, each only if it
    started at or after `started` (an older process holding a reused PID is not ours). Their
    /dev/shm files and instance record go with them."""
    candidates = set(pids or [])
    sids = {sid} if sid else set()
    for p in proctree.started_since(sorted(candidates), started):
        with contextlib.suppress(OSError):
            s = os.getsid(p)
            # The session its root leads; not, while CRIU has not yet given the tree its own
            # session back, the session of whoever ran CRIU (a shell's, this command's).
            if s in candidates:
                sids.add(s)
    for s in sids:
        candidates.update(proctree.session_pids(s))
    never = _self_and_ancestors()
    ours = [p for p in proctree.started_since(sorted(candidates), started) if p not in never]
    if ours:
        files = shm.names_of(ours)
        proctree.stop_pids(ours, grace)
        proctree.wait_gone(ours, 30.0, reaped=True)
        shm.remove(files)
        for s in sids:
            instances.forget(s)
    shm.remove(_left_since(started))  # those of a root killed before (its maps went with it)
    if not ours:
        return []
    root = sid if sid in ours else min(ours)
    return [f"stopped server tree {root} ({len(ours)} processes)"]


def remove_dir(path: str) -> list[str]:
    """Remove a staging directory (`.NAME.partial-*`)."""
    p = Path(path)
    if not p.exists():
        return []
    atomic.discard(p)
    return [f"removed {p}"]


def _left_since(started: int) -> list[Path]:
    """/dev/shm files of vLLM's and CRIU's kinds (shm.ORPHAN_PATTERNS) made since `started`
    (ticks) that no process holds and no operation in flight claims: what a tree whose root
    was killed leaves, whose names its maps can no longer tell."""
    if not started:
        return []
    since = time.time() - (proctree.ticks_now() - started) / os.sysconf("SC_CLK_TCK") - 1.0
    out = []
    for p in shm.orphans(claimed_files()):
        with contextlib.suppress(OSError):
            if p.stat().st_ctime >= since:
                out.append(p)
    return out


def remove_criu_work(path: str) -> list[str]:
    """Remove CRIU's scratch directory of a restore (runtime.criu: its cgroup yard detached)."""
    from fastvllm.runtime import criu

    if not Path(path).exists():
        return []
    criu.remove_scratch(Path(path))
    return [f"removed {path}"]


def remove_files(paths: list[str], unless_alive: list[int] | None = None) -> list[str]:
    """Unlink files: the /dev/shm files of a tree that is gone, or put back for one. Not while
    a process of `unless_alive` runs (a tree that was running before, and runs on, keeps them)."""
    if any(proctree.alive(p) for p in unless_alive or ()):
        return []
    gone = 0
    for f in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
            gone += 1
    return [f"removed {gone} /dev/shm file{'s' * (gone != 1)}"] if gone else []


def give_back_gpu(pids: list[int]) -> list[str]:
    """Restore and unlock the GPU state of processes left checkpointed."""
    from fastvllm.runtime import cuda_checkpoint

    alive = [p for p in pids if proctree.alive(p)]
    if not alive:
        return []
    back = cuda_checkpoint.give_back(alive)
    return [f"gave GPU state back to {', '.join(map(str, back))}"] if back else []


def wake_server(
    pid: int,
    host: str,
    port: int,
    log: str,
    token: str,
    level: int,
    weights: str,
    sleeping: bool,
    intact: bool = False,
) -> list[str]:
    """Give a server that was running before the snapshot (--pid) back what the snapshot
    released (unless it is `intact`), then reopen its readiness gate. A server that cannot get
    its weights back stays closed (503) rather than answer without them."""
    from fastvllm.runtime import vllm_server, worker_rpc

    if not proctree.alive(pid):
        return []
    server = vllm_server.Server(pid, host, port, Path(log), token=token)
    if intact:
        vllm_server.set_gate(server, open=True)
        return [f"reopened server {pid} to its clients"]
    if level == 2:
        vllm_server.wake_up(server, "weights")
        worker_rpc.reload(server, worker_rpc.ReloadArgs(weights))
        vllm_server.wake_up(server, "kv_cache")
    elif level == 1:
        vllm_server.wake_up(server)
    elif sleeping and not vllm_server.cuda_present():
        worker_rpc.reload(server, worker_rpc.ReloadArgs(weights))
    vllm_server.set_gate(server, open=True)
    return [f"gave server {pid} its weights back"]


ACTIONS: dict[str, Callable[..., list[str]]] = {
    "stop_tree": stop_tree,
    "remove_dir": remove_dir,
    "remove_files": remove_files,
    "remove_criu_work": remove_criu_work,
    "give_back_gpu": give_back_gpu,
    "wake_server": wake_server,
}


def perform(action: str, args: dict[str, Any]) -> list[str]:
    return ACTIONS[action](**args)


# --- the operation: an undo stack that keeps its journal file in step ------------------------


class Undo:
    """One registered undo: runs once, on failure; `cancel()` when its reason is gone (the
    tree exited after its dump), `now()` to run it early (the original gets its weights back
    after a --leave-running dump)."""

    def __init__(self, op: Operation, fn: Callable[[], object], recipe: Recipe | None) -> None:
        self._op, self._fn, self.recipe, self.pending = op, fn, recipe, True

    def update(self, **args: Any) -> None:
        """Change the journaled recipe's arguments (what `recover()` would run)."""
        if self.recipe is not None and self.pending:
            self.recipe.args.update(args)
            self._op._rewrite()

    def __call__(self) -> None:
        if self.pending:
            self.pending = False
            try:
                self._fn()
            finally:
                self._op._drop(self.recipe)

    def cancel(self) -> None:
        if self.pending:
            self.pending = False
            self._op._drop(self.recipe)

    def now(self) -> None:
        self()


_current = threading.local()


class Operation:
    """A pipeline's undo stack and its journal entry (see the module's docstring).

    with Operation("restore", path) as op:
        op.undo("stop_tree", sid=..., started=op.started)     # journaled
        op.undo_local(ahead.stop)                             # this process only
        ...
        op.commit()                                           # success: nothing to undo
    """

    def __init__(self, kind: str, subject: str | Path) -> None:
        self._stack = contextlib.ExitStack()
        me = os.getpid()
        self.entry = Entry(
            uuid.uuid4().hex[:12],
            kind,
            me,
            proctree.start_ticks(me) or 0,
            proctree.ticks_now(),
            str(subject),
        )
        self.path = journal_dir() / f"{kind}-{me}-{self.entry.id}.json"
        self._next = 0
        self._lock = threading.Lock()

    @property
    def started(self) -> int:
        return self.entry.started

    def __enter__(self) -> Operation:
        _private_dir(journal_dir())
        self._write()
        stack = getattr(_current, "ops", None)
        if stack is None:
            stack = _current.ops = []
        stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> bool:
        try:
            with shielded():  # a second signal must not stop the undo half-way
                return bool(self._stack.__exit__(*exc))
        finally:
            _current.ops.remove(self)
            self.path.unlink(missing_ok=True)

    def undo(self, action: str, *, local: Callable[[], object] | None = None, **args: Any) -> Undo:
        """Register a journaled undo: ACTIONS[action](**args) by `recover()` if this process
        dies first; here, on failure, the same (with the arguments as they are by then), or
        `local` where this process does it its own way (the same effect, with what it holds in
        memory: a server object, its child to reap)."""
        with self._lock:
            recipe = Recipe(self._next, action, args)
            self._next += 1
            self.entry.undo.append(recipe)
            self._write()
        u = Undo(self, local or (lambda: perform(action, recipe.args)), recipe)
        self._stack.callback(u)
        return u

    def undo_local(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> Undo:
        """Register an undo for this process only (threads, in-memory state)."""
        u = Undo(self, lambda: fn(*args, **kwargs), None)
        self._stack.callback(u)
        return u

    def push(self, exit_fn: Callable[[type[BaseException] | None, BaseException | None, Any], bool]) -> None:
        """Register an undo that sees the exception (an ExitStack exit callback); this process only."""
        self._stack.push(exit_fn)

    def commit(self) -> None:
        """The operation succeeded: drop every undo, and the journal file."""
        self._stack.pop_all()
        self.path.unlink(missing_ok=True)

    def criu_started(self, pid: int) -> None:
        with self._lock:
            self.entry.criu_pid, self.entry.criu_start = pid, proctree.start_ticks(pid) or 0
            self._write()

    def criu_done(self) -> None:
        with self._lock:
            self.entry.criu_pid = self.entry.criu_start = 0
            self._write()

    def _rewrite(self) -> None:
        with self._lock:
            self._write()

    def _drop(self, recipe: Recipe | None) -> None:
        if recipe is None:
            return
        with self._lock:
            self.entry.undo = [r for r in self.entry.undo if r.id != recipe.id]
            self._write()

    def _write(self) -> None:
        if self.path.parent.is_dir():
            _write_private(self.path, json.dumps(asdict(self.entry)))


def current() -> Operation | None:
    """The innermost operation running in this thread, if any."""
    ops = getattr(_current, "ops", None)
    return ops[-1] if ops else None


@contextlib.contextmanager
def child(pid: int) -> Iterator[None]:
    """Record `pid` as the CRIU child of the current operation while it runs."""
    op = current()
    if op is not None:
        op.criu_started(pid)
    try:
        yield
    finally:
        if op is not None:
            op.criu_done()


# --- recovery --------------------------------------------------------------------------------


def entries() -> list[tuple[Path, Entry]]:
    """Every readable journal entry on this host (a file being replaced is skipped)."""
    d = journal_dir()
    out = []
    with contextlib.suppress(OSError):
        for p in sorted(d.glob("*.json")):
            try:
                out.append((p, Entry.from_dict(json.loads(p.read_text()))))
            except (OSError, ValueError, TypeError):
                continue
    return out


def orphaned() -> list[Entry]:
    """Entries whose owner died before it could clean up."""
    return [e for _, e in entries() if not e.owner_alive()]


def _say(line: str) -> None:
    print(f"fastvllm: {line}", file=sys.stderr, flush=True)


def recover(say: Callable[[str], None] = _say) -> list[str]:
    """Clean up after every operation whose owner died; returns (and says) one line per
    operation cleaned, e.g. "cleaned up after an interrupted snapshot (pid 123): stopped
    server tree 456 (3 processes), removed /x/.tiny.partial-ab12". Costs one directory listing
    when there is nothing to do."""
    d = journal_dir()
    try:
        if not any(d.iterdir()):
            return []
    except OSError:
        return []
    lines = []
    with _locked(d):
        for path, e in entries():
            if e.owner_alive():
                continue
            did = _undo_entry(e)
            path.unlink(missing_ok=True)
            if did:
                line = f"cleaned up after an interrupted {e.kind} (pid {e.owner_pid}): " + ", ".join(did)
                lines.append(line)
                say(line)
    return lines


def _undo_entry(e: Entry) -> list[str]:
    did = []
    if e.criu_pid and proctree.is_same(e.criu_pid, e.criu_start):
        # Let it finish, as the owner would have: CRIU killed mid-dump leaves its parasite code
        # in a tree that may run on (--leave-running), mid-restore a half-built tree. Its work
        # is undone below. Only a CRIU that does not finish is killed.
        if proctree.wait_gone([e.criu_pid], CRIU_WAIT_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(e.criu_pid, signal.SIGKILL)
            proctree.wait_gone([e.criu_pid], 10.0)
            did.append(f"killed CRIU {e.criu_pid}")
        else:
            did.append(f"waited for CRIU {e.criu_pid} to finish")
    for r in reversed(e.undo):
        try:
            did += perform(r.action, r.args)
        except Exception as exc:  # one failed undo must not keep the others from running
            did.append(f"could not {r.action.replace('_', ' ')} ({exc})")
    return did


def partial_is_stale(partial: Path) -> bool:
    """Whether nobody writes the staging directory `partial` any more: an operation in the
    journal says so (its owner is dead, or alive), else its writer's lock does
    (runtime.atomic.is_stale: a writer in another container, or from before a reboot)."""
    partial = partial.absolute()
    for _, e in entries():
        if any(r.action == "remove_dir" and Path(r.args["path"]) == partial for r in e.undo):
            return not e.owner_alive()
    return atomic.is_stale(partial)


def clean_partials(paths: list[Path], say: Callable[[str], None] = _say) -> list[str]:
    """Remove the stale staging directories among `paths` (partial directories themselves,
    or directories to look in); returns (and says) a line for each."""
    found: list[Path] = []
    for p in paths:
        p = p.expanduser().absolute()
        if atomic.is_partial(p):
            found.append(p)
        elif p.is_dir():
            found += [c for c in sorted(p.iterdir()) if atomic.is_partial(c) and c.is_dir()]
    lines = []
    for p in found:
        if partial_is_stale(p):
            shutil.rmtree(p, ignore_errors=True)
            lines.append(f"removed {p}, left by a snapshot that did not finish")
            say(lines[-1])
    return lines


def claimed_files() -> set[str]:
    """Files and directories the undo recipes of operations in flight name: a restore's
    /dev/shm files are put back before CRIU maps them, CRIU's scratch directory is in use; no
    process holds them, and they are not orphans."""
    out: set[str] = set()
    for _, e in entries():
        if e.owner_alive():
            for r in e.undo:
                out.update(r.args.get("paths", []))
                if "path" in r.args:
                    out.add(r.args["path"])
    return out


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One recovery at a time on a host (two commands starting at once)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _private_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        if d.stat().st_uid == os.geteuid():
            os.chmod(d, 0o700)


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with a 0600 file holding `text`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _self_and_ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out
