"""Process-tree control by session: fastvllm starts every server in its own session, and
CRIU restores that session, so "the server" is exactly the processes of one session id.
We stop what we started by that id, never by name."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

from fastvllm.runtime.errors import TreeChangedError

_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Make this process the reaper of orphaned descendants (a server whose root died, a tree
    `criu restore --restore-detached` leaves behind). Their zombies then hold PIDs only until
    our next waitpid, not until the host's init gets round to it (seconds on some hosts), and
    CRIU can restore those PIDs again right away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == sid:
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def tree_pids(root: int) -> list[int]:
    import psutil

    try:
        proc = psutil.Process(root)
        return [root] + [c.pid for c in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    """A process (or thread) `pid` exists and is not a zombie: its state in /proc/PID/stat, as
    psutil's status() reads it, without psutil (~10 ms to import, on a restore's path)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return bool(state) and state != b"Z"


def pid_exists(pid: int) -> bool:
    """psutil.pid_exists: `pid` names a process (zombies too), not one of its threads."""
    if pid <= 0:
        return pid == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _thread_group(pid) == pid if os.path.exists(f"/proc/{pid}/status") else False


def ids_taken(ids: list[int], ours: list[int]) -> list[tuple[int, int]]:
    """(id, the process holding it) for each of `ids` that a live thread or process holds,
    except those in `ours` (the tree's own PIDs, checked, and waited for, on their own) and
    the threads of those: a stopped tree's process shows as a zombie while its other threads
    are still exiting, and the caller's wait for its PID covers them (a restore right after a
    stop failed on exactly that). /proc/ID answers for a thread's ID too, though /proc does not
    list it."""
    taken = []
    skip = set(ours)
    for i in ids:
        if i in skip or not alive(i):
            continue
        owner = _thread_group(i)
        if owner not in skip:
            taken.append((i, owner))
    return taken


def _thread_group(tid: int) -> int:
    """The process a thread ID belongs to (the ID itself if that cannot be read)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


def wait_gone(pids: list[int], timeout: float, *, reaped: bool = False) -> list[int]:
    """Wait until none of `pids` is alive (zombies of our own children are reaped); returns
    those left at the deadline. With `reaped`, a zombie still counts: a restore must wait for
    that, because CRIU re-creates the same PIDs and fails with 'File exists' while one lingers."""
    deadline = time.monotonic() + timeout
    left = list(pids)

    def reap() -> None:
        for pid in left:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        with contextlib.suppress(ChildProcessError, OSError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # adopted orphans (see adopt_orphans)
                pass

    while True:
        reap()
        left = [p for p in left if (pid_exists(p) if reaped else alive(p))]
        if not left:
            # The last ones may have exited after that sweep: reap once more, or their zombies
            # would hold the PIDs until this process next waits, which a CLI restore of the
            # same snapshot cannot do for us (a GPU e2e test timed out on exactly that).
            reap()
            return left
        if time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def stop_session(sid: int, grace: float = 10.0) -> None:
    """SIGTERM every process of the session, SIGKILL what outlives `grace`, wait until gone."""
    pids = session_pids(sid)
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = wait_gone(pids, grace)
    # Children forked while we waited belong to the session too.
    left = sorted(set(left) | set(session_pids(sid)))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(left, 10.0)


def require_alive(pids: list[int], when: str) -> None:
    """Raise TreeChangedError naming the PIDs of `pids` that are gone (or zombies) `when`."""
    dead = [p for p in pids if not alive(p)]
    if dead:
        which = ", ".join(map(str, dead))
        raise TreeChangedError(
            f"process {which} of the tree exited {when}; nothing was written",
            hint="the rest of the tree was given its GPU state back and keeps running; "
            "find why it exited (its log), then snapshot again",
        )


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat), None if it is gone: with
    the PID it names one process for good, where a PID alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def ticks_now() -> int:
    """Now, on the clock of `start_ticks` (a process started after this has a larger value)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def is_same(pid: int, ticks: int) -> bool:
    """Whether `pid` is alive (not a zombie) and is the process that started at `ticks`."""
    return ticks > 0 and start_ticks(pid) == ticks and alive(pid)


def started_since(pids: list[int], ticks: int) -> list[int]:
    """Those of `pids` alive and started at or after `ticks`: processes a fastvllm operation
    that began at `ticks` may have started (a PID reused by an older process is not one)."""
    return [p for p in pids if (t := start_ticks(p)) is not None and t >= ticks and alive(p)]


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each of `pids`, SIGKILL what outlives `grace`, wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = wait_gone(pids, grace)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(left, 10.0)
