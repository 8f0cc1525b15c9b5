"""`fastvllm agent`: a warm process per host that restores snapshots on request.

A `fastvllm restore` pays an interpreter start and the import of the restore stack before any
restore work starts (most of what a user waits on a warm host). The agent pays both once: it
imports everything at start, checks CRIU and the privileges, then listens on a Unix socket
(`<run dir>/agent.sock`, 0600, its owner's alone; a peer of another uid is refused by
SO_PEERCRED). `fastvllm restore` hands the restore to it when it runs
(fastvllm/resident_client.py, standard library only).

Protocol, one JSON document per line. A client sends one request:
    {"op": "ping"}  ->  {"event": "pong", "pid": ..., "busy": ..., "held": [...], ...}
    {"op": "held", "file": "/abs/weights.fvw"}  ->  {"event": "held", ...} with the descriptor of
        the pinned memory holding that file's weights (`--hold`; a restored worker asks), or
        {"event": "not_held", "reason": ...}
    {"op": "restore", "dir": "/abs/path", "verify": true, "reverify": false, "prefetch": true,
     "prefetch_threads": 0, "timeout": 120.0, "criu_restore": "auto", "keep_affinity": false,
     "json": false, "env": {FASTVLLM_* of the client}}
and the agent answers a restore with `declined` (the client restores in its own process:
its FASTVLLM_* settings differ, an option the agent does not know, the agent stopping) or
`accepted` (with `ahead`: restores queued before it), then `started`, the phases as they
start and end (`phase_start`, `phase_end`, `progress` in bytes), and one `result` line:
{"exit_code": 0, "result": RestoreResult.as_dict(), "lines": [what the CLI prints]} or
{"exit_code": N, "error": one line, "detail": ...}. While it waits, a client may send
{"op": "cancel"}; a cancel or a dropped connection interrupts the restore as SIGTERM would
(everything started is undone), and the agent serves on.

Restores run one at a time, in the main thread, so the signal and undo machinery works as in
the CLI (runtime/signals.py raises in the main thread); a reader thread per client watches for
the cancel. SIGTERM, SIGINT or SIGHUP to the agent undo the restore running, remove the
socket, and exit 128 + the signal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastvllm.runtime import config, journal, signals
from fastvllm.runtime.errors import FastVLLMError, UsageError, from_os_error
from fastvllm.runtime.modes import CriuRestoreMode, SnapshotKind
from fastvllm.runtime.timeline import Phase, Timeline
from fastvllm.weights import held

if TYPE_CHECKING:
    from fastvllm.restore.pipeline import RestoreResult
    from fastvllm.restore.process import ProcessRestoreResult

SOCKET_NAME = "agent.sock"
PROTOCOL = 1
CANCEL_SIGNAL = signal.SIGUSR1  # the reader thread's nudge: the main thread turns it into SIGTERM
INTERRUPTED_EXIT = 130  # a cancelled restore, as Ctrl-C in the CLI
INTERNAL_ERROR_EXIT = 70
GREETING_TIMEOUT_S = 10.0  # a client that connects and says nothing is dropped
BYTE_PHASES = ("verify_checksums", "readahead")
PROGRESS_EVERY_S = 0.25
# The request's restore options and their types (the rest of `fastvllm restore` stays in the CLI).
OPTIONS: dict[str, type] = {
    "verify": bool,
    "reverify": bool,
    "prefetch": bool,
    "prefetch_threads": int,
    "timeout": float,
    "criu_restore": str,
    "keep_affinity": bool,
    "json": bool,
}
CRIU_MODES = tuple(CriuRestoreMode)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def default_socket() -> Path:
    return config.RUN_DIR.get() / SOCKET_NAME


def peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (for a client, the
    one that listens)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _settings(env: dict[str, str]) -> dict[str, str]:
    """The FASTVLLM_* settings that shape a restore (the agent switch itself aside)."""
    return {
        k: v for k, v in env.items() if k.startswith("FASTVLLM_") and k != config.AGENT.name and v.strip()
    }


class _Reject(Exception):
    """A request the agent will not run: `declined` (the client restores itself) or not."""

    def __init__(self, reason: str, *, declined: bool = True, exit_code: int = 2) -> None:
        super().__init__(reason)
        self.reason, self.declined, self.exit_code = reason, declined, exit_code


def parse_request(req: Any, own_env: dict[str, str]) -> dict[str, Any]:
    """The restore options of a request, checked; _Reject names what does not fit."""
    if not isinstance(req, dict) or req.get("op") != "restore":
        raise _Reject("not a restore request", declined=False)
    if req.get("v", PROTOCOL) != PROTOCOL:
        raise _Reject(f"protocol {req.get('v')!r}, the agent speaks {PROTOCOL}")
    where = req.get("dir")
    if not isinstance(where, str) or not os.path.isabs(where):
        raise _Reject("'dir' must be an absolute path", declined=False)
    opts: dict[str, Any] = {"dir": where}
    unknown = sorted(set(req) - {*OPTIONS, "op", "v", "dir", "env"})
    if unknown:
        raise _Reject(f"options the agent does not know: {', '.join(unknown)}")
    for name, kind in OPTIONS.items():
        if name not in req:
            continue
        value = req[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise _Reject(f"{name!r} must be a {kind.__name__}", declined=False)
        opts[name] = value
    if opts.get("criu_restore", "auto") not in CRIU_MODES:
        raise _Reject(f"criu_restore must be one of {', '.join(CRIU_MODES)}", declined=False)
    if opts.get("timeout", 1.0) <= 0 or opts.get("prefetch_threads", 0) < 0:
        raise _Reject("timeout must be more than 0 and prefetch_threads at least 0", declined=False)
    theirs = req.get("env", {})
    if not isinstance(theirs, dict):
        raise _Reject("'env' must be an object", declined=False)
    mine, theirs = _settings(own_env), _settings(theirs)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise _Reject(f"the client's settings differ from the agent's: {', '.join(differ)}")
    return opts


@dataclass
class Job:
    """One client's restore: its connection, its options, whether it was cancelled."""

    conn: socket.socket
    opts: dict[str, Any]
    peer_pid: int
    cancelled: bool = False
    gone: bool = False  # the client went away: nothing more is sent
    buf: bytearray = field(default_factory=bytearray)  # what came after the request line
    sent_result: dict[str, Any] | None = None  # the final line, for the agent's log
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, doc: dict[str, Any]) -> None:
        """One reply line; a client that has gone is not an error (its cancel follows)."""
        data = (json.dumps(doc, default=str) + "\n").encode()
        if doc.get("event") == "result":
            self.sent_result = doc
        with self._lock:
            if self.gone:
                return
            try:
                self.conn.sendall(data)
            except OSError:
                self.gone = True


def _send_line(conn: socket.socket, doc: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(doc, default=str) + "\n").encode())


def _read_line(conn: socket.socket, buf: bytearray, limit: int = 1 << 16) -> bytes | None:
    """The next line from `conn` (None at its end); `buf` keeps what came after it."""
    while b"\n" not in buf:
        if len(buf) > limit:
            raise ValueError("request line too long")
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


class AlreadyRunningError(UsageError):
    """Another agent listens on the socket."""


class Listener:
    """The agent's socket: owner-only, a stale file replaced, a live agent refused; a lock file
    beside it (held for the agent's life) makes two agents starting at once safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._lock_fd = -1
        self._ino = 0

    def open(self) -> socket.socket:
        path = self.path
        if len(os.fsencode(path)) > 107:
            raise UsageError(
                f"socket path {path} is too long for a Unix socket", hint="pick a shorter --socket"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise from_os_error(e, f"create the agent's socket {path}") or e from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._running(self._locked_pid()) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # no moment where the socket is reachable by others
        try:
            sock.bind(str(path))
        except OSError as e:
            sock.close()
            raise from_os_error(e, f"create the agent's socket {path}") or e from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._ino = os.stat(path).st_ino
        self.sock = sock
        return sock

    def listen(self) -> None:
        assert self.sock is not None
        self.sock.listen(64)

    def _running(self, pid: int | None) -> AlreadyRunningError:
        who = f" (pid {pid})" if pid else ""
        fix = f"use it, or stop it first: kill {pid}" if pid else "use it, or stop it first"
        return AlreadyRunningError(f"a fastvllm agent already runs on {self.path}{who}", hint=fix)

    def _locked_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(os.pread(self._lock_fd, 32, 0).decode().strip() or 0) or None
        return None

    def _clear_stale(self) -> None:
        """A socket file nobody listens on is what a killed agent left: replaced."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(
                f"{self.path} exists and is not a socket", hint="remove it, or pick another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(2.0)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # refused: no listener
            return
        else:
            pid = peer_cred(probe)[0]
            raise self._running(pid)
        finally:
            probe.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            if self._ino and os.stat(self.path).st_ino == self._ino:
                self.path.unlink()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class Agent:
    """The accept thread greets clients (answers pings at once, queues restores); the main
    thread runs the queued restores one after the other."""

    def __init__(self, path: Path, say: Callable[[str], None]) -> None:
        self.listener = Listener(path)
        self.say = say
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.current: Job | None = None
        self.restoring = False  # main thread only: inside api.restore
        self.stop_signum: int | None = None
        self.closing = False
        self.started_at = time.time()
        self.done = 0
        self._lock = threading.Lock()
        self._main = threading.main_thread().ident

    # --- signals (main thread) ----------------------------------------------------------------

    def _install_signals(self) -> None:
        signals.install()
        for sig in signals.SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(sig, self._on_stop)
        signal.signal(CANCEL_SIGNAL, self._on_cancel)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signum is None:
            self.stop_signum = signum
        signals.deliver(signum)

    def _on_cancel(self, _signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread: `restoring` cannot change under it. A cancel that comes
        # once the restore returned is too late to undo anything, and is dropped.
        job = self.current
        if self.restoring and job is not None and job.cancelled:
            signals.deliver(signal.SIGTERM)

    def cancel(self, job: Job) -> None:
        """From a reader thread: the client cancelled or went away."""
        with self._lock:
            job.cancelled = True
            if self.current is job and self._main is not None:
                signal.pthread_kill(self._main, CANCEL_SIGNAL)

    # --- the accept thread ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sock = self.listener.sock
        assert sock is not None
        while not self.closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                if self.closing:
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._greet, args=(conn,), name="agent-client", daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        try:
            job = self._first_request(conn)
        except Exception as e:  # a client that breaks the protocol must not stop the agent
            _send_line(conn, {"event": "result", "exit_code": 2, "error": f"bad request: {e}"})
            job = None
        if job is None:
            conn.close()
            return
        self._watch(job)

    def _first_request(self, conn: socket.socket) -> Job | None:
        pid, uid, _gid = peer_cred(conn)
        conn.settimeout(GREETING_TIMEOUT_S)
        buf = bytearray()
        # The request line is read first, whoever sent it: a Unix socket closed with unread
        # data resets the peer's connection, and the refusal below would never reach it.
        line = _read_line(conn, buf)
        if line is None:
            return None  # a probe (a second agent checking whether this one lives)
        if uid != os.geteuid():
            _send_line(conn, {
                "event": "result", "exit_code": 5,
                "error": f"the fastvllm agent serves its own user only (uid {os.geteuid()}), not uid {uid}",
            })  # fmt: skip
            return None
        req = json.loads(line)
        if isinstance(req, dict) and req.get("op") == "ping":
            _send_line(conn, self.status())
            return None
        if isinstance(req, dict) and req.get("op") == held.OP:  # a restored worker's load
            held.answer(conn, req)
            return None
        try:
            if self.closing or self.stop_signum is not None:
                raise _Reject("the agent is stopping")
            opts = parse_request(req, dict(os.environ))
        except _Reject as r:
            if r.declined:
                _send_line(conn, {"event": "declined", "reason": r.reason})
            else:
                _send_line(conn, {"event": "result", "exit_code": r.exit_code, "error": r.reason})
            return None
        conn.settimeout(None)
        job = Job(conn, opts, pid, buf=buf)
        with self._lock:
            ahead = self.jobs.qsize() + (self.current is not None)
            job.send({"event": "accepted", "pid": os.getpid(), "ahead": ahead})
            self.jobs.put(job)
        return job

    def _watch(self, job: Job) -> None:
        """Read the client's lines until it cancels or goes away."""
        while True:
            try:
                line = _read_line(job.conn, job.buf)
            except (OSError, ValueError):
                line = None
            if line is None:  # gone: whatever it waited for is cancelled
                with job._lock:
                    job.gone = True
                self.cancel(job)
                return
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("op") == "cancel":
                    self.cancel(job)

    def status(self) -> dict[str, Any]:
        cur = self.current
        return {
            "event": "pong",
            "v": PROTOCOL,
            "pid": os.getpid(),
            "uid": os.geteuid(),
            "socket": str(self.listener.path),
            "busy": cur is not None,
            "restoring": cur.opts["dir"] if cur is not None else None,
            "queued": self.jobs.qsize(),
            "restores": self.done,
            "since": round(self.started_at, 3),
            "held": held.held_files(),
        }

    # --- the main thread ------------------------------------------------------------------------

    def serve(self) -> int:
        """Until a signal: run the queued restores. Returns the exit status, 128 + the signal."""
        threading.Thread(target=self._accept_loop, name="agent-accept", daemon=True).start()
        try:
            while True:
                try:
                    job = self.jobs.get(timeout=0.5)
                except queue.Empty:
                    _reap()
                    continue
                self._run(job)
                signals.forget()  # a cancelled restore's SIGTERM: the next one may be cut too
                if self.stop_signum is not None:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            self._shutdown()
        return 128 + (self.stop_signum or signal.SIGTERM)

    def _shutdown(self) -> None:
        with signals.shielded():
            self.closing = True
            self.listener.close()
            while True:  # restores queued behind: their clients restore in their own process
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                job.send({"event": "declined", "reason": "the agent is stopping"})
                job.conn.close()

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.cancelled:
                job.conn.close()
                return
            self.current = job
        try:
            job.send({"event": "started"})
            self._restore(job)
        finally:
            with self._lock:
                self.current = None
            self.done += 1
            with contextlib.suppress(OSError):
                job.conn.shutdown(socket.SHUT_RDWR)
            job.conn.close()
            self.say(f"restore {job.opts['dir']}: {_outcome(job.sent_result)}")

    def _restore(self, job: Job) -> int:
        """One restore, its phases streamed to the client; returns the exit status sent."""
        from fastvllm import api

        tl = Timeline()
        events = _Events(job, tl)
        o = job.opts
        try:
            self.restoring = True
            try:
                if job.cancelled:  # before the restore began: its SIGUSR1 was dropped
                    signals.deliver(signal.SIGTERM)
                res: RestoreResult | ProcessRestoreResult
                if api.snapshot_kind(o["dir"]) is SnapshotKind.PROCESS:  # restore_process's
                    res = api.restore_process(
                        o["dir"],
                        verify=o.get("verify", True),
                        timeline=tl,
                        criu_restore=o.get("criu_restore", "auto"),
                        reverify=o.get("reverify", False),
                    )
                else:
                    res = api.restore(
                        o["dir"],
                        verify=o.get("verify", True),
                        health_timeout=o.get("timeout", 120.0),
                        prefetch=o.get("prefetch", True),
                        prefetch_threads=o.get("prefetch_threads", 0),
                        timeline=tl,
                        on_bytes=events.on_bytes,
                        criu_restore=o.get("criu_restore", "auto"),
                        reverify=o.get("reverify", False),
                        keep_affinity=o.get("keep_affinity", False),
                    )
            finally:
                self.restoring = False
        except FastVLLMError as e:
            return _fail(job, e.exit_code, e.one_line(), e.detail)
        except OSError as e:
            err = from_os_error(e)
            if err is None:
                return self._internal(job, e)
            return _fail(job, err.exit_code, err.one_line(), err.detail)
        except KeyboardInterrupt:
            if self.stop_signum is not None:  # the agent itself was told to stop
                name = signal.Signals(self.stop_signum).name
                _fail(job, 128 + self.stop_signum,
                      f"the fastvllm agent was stopped by {name} mid-restore: it stopped what was started "
                      "and removed partial output", None, interrupted=True)  # fmt: skip
                raise
            by = " (the client cancelled)" if job.cancelled else ""
            return _fail(job, INTERRUPTED_EXIT, f"interrupted{by}: stopped what was started and removed "
                         "partial output", None, interrupted=True)  # fmt: skip
        except Exception as e:
            return self._internal(job, e)
        job.send({"event": "result", "exit_code": 0, "result": res.as_dict(), "lines": summary(res)})
        return 0

    def _internal(self, job: Job, e: BaseException) -> int:
        traceback.print_exception(e, file=sys.stderr)
        msg = " ".join(str(e).split())[:300]
        return _fail(
            job, INTERNAL_ERROR_EXIT,
            f"internal error in the fastvllm agent (pid {os.getpid()}): {type(e).__name__}: {msg} "
            "(a bug: please report it with the agent's log)", None,
        )  # fmt: skip


def _outcome(doc: dict[str, Any] | None) -> str:
    """A restore's line in the agent's log."""
    if doc is None:
        return "no result (the agent stopped)"
    if doc["exit_code"] == 0:
        r = doc["result"]
        ttfc = r.get("time_to_first_completion_s", r.get("restore_s"))
        return f"serving, pid {r['pid']}, {ttfc} s"
    return f"exit {doc['exit_code']}: {doc.get('error')}"


def _fail(job: Job, code: int, error: str, detail: str | None, *, interrupted: bool = False) -> int:
    doc: dict[str, Any] = {"event": "result", "exit_code": code, "error": error}
    if detail:
        doc["detail"] = detail
    if interrupted:
        doc["interrupted"] = True
    job.send(doc)
    return code


class _Events:
    """The timeline's phases and the read-ahead's bytes, as reply lines (from any thread)."""

    def __init__(self, job: Job, tl: Timeline) -> None:
        self.job = job
        self.bytes = 0
        self.phase_bytes: dict[str, int] = {}
        self.byte_phase: str | None = None
        self.sent_at = 0.0
        self._lock = threading.Lock()
        tl.on_start = self.on_start
        tl.on_end = self.on_end

    def on_start(self, name: str) -> None:
        with self._lock:
            if name in BYTE_PHASES:
                self.byte_phase = name
                self.phase_bytes[name] = 0
        self.job.send({"event": "phase_start", "name": name})

    def on_end(self, p: Phase) -> None:
        with self._lock:
            n = self.phase_bytes.pop(p.name, None)
            if self.byte_phase == p.name:
                self.byte_phase = None
        doc: dict[str, Any] = {
            "event": "phase_end",
            "name": p.name,
            "start_s": round(p.start_s, 4),
            "duration_s": round(p.duration_s, 4),
            "outcome": p.outcome.value,
        }
        if n:
            doc["bytes"] = n
        self.job.send(doc)

    def on_bytes(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.bytes += n
            if self.byte_phase is not None:
                self.phase_bytes[self.byte_phase] = self.phase_bytes.get(self.byte_phase, 0) + n
            if now - self.sent_at < PROGRESS_EVERY_S:
                return
            self.sent_at = now
            total = self.bytes
        self.job.send({"event": "progress", "bytes": total})


def summary(res: RestoreResult | ProcessRestoreResult) -> list[str]:
    """What `fastvllm restore` prints after its table, as plain lines."""
    from fastvllm import ui

    lines = []
    if res.criu_restore == "mmap":
        lines.append(
            "the restored tree maps this snapshot's page images: keep the snapshot in place and "
            "unchanged while it runs ('fastvllm inspect' shows who maps it)"
        )
    from fastvllm.restore.process import ProcessRestoreResult

    if isinstance(res, ProcessRestoreResult):
        lines.append(f"restored process tree, root pid {res.pid} in {res.timeline.elapsed():.2f} s")
        return lines
    lines.append(
        f"serving at {ui.address(res.server)} (pid {res.server.pid}); first completion after "
        f"{res.time_to_first_completion_s:.2f} s, canary identical; stop with "
        f"'fastvllm stop {res.server.pid}'"
    )
    return lines


def _reap() -> None:
    """Reap the agent's exited children: the restored trees' roots are (CRIU restores them
    detached, and the restore makes this process their reaper), and their zombies would hold
    the snapshot's PIDs, so the next restore of it (here or by the CLI) would wait."""
    with contextlib.suppress(ChildProcessError, OSError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _pretouch() -> None:
    """What every restore needs, done once: the restore stack imported, CRIU found and probed,
    the privileges checked, the port helper built."""
    from fastvllm import api, ui  # noqa: F401  (imported for what they import)
    from fastvllm.runtime import bind_ports, cpu_share, criu, system

    system.require_criu_privileges()
    criu.find_criu()
    bind_ports.helper()
    cpu_share.server_nice()
    from fastvllm.restore import pipeline  # noqa: F401  (the restore itself, not only the API)
    from fastvllm.runtime import cuda_checkpoint, vllm_server

    if vllm_server.cuda_present():  # the driver API loaded and cuInit done before the first restore
        cuda_checkpoint.prepare()


def hold_weights(snapshots: list[Path], say: Callable[[str], None]) -> None:
    """Read each GPU snapshot's weight files (every rank's) into pinned host memory that the
    workers it restores map and copy from (weights/held.py). Refuses what cannot be held, before
    the agent listens."""
    from fastvllm.runtime import manifest, shared_pinned

    if snapshots and (why := shared_pinned.unavailable()):
        raise UsageError(
            f"--hold cannot hold weights on this host: {why}", hint="run the agent without --hold"
        )
    files: list[Path] = []
    for snap in snapshots:
        mf = manifest.load(snap)
        if not mf.cuda_pids or not mf.weights_file:
            raise UsageError(
                f"--hold {snap}: only a sleeping GPU snapshot's weights can be held",
                hint="name a snapshot taken on a GPU (the default sleeping snapshot)",
            )
        files += [snap / f for f in mf.all_weight_files()]
    held.make_room_for(sum(held.pieces_for(f) for f in files))
    for f in files:
        h = held.hold(f, progress=_hold_progress(f, say))
        gb = h.data_bytes / 1e9
        say(f"holding {h.path} ({gb:.1f} GB pinned; read and checked in {h.seconds:.1f} s)")


HOLD_PROGRESS_EVERY_S = 5.0  # the agent's output is a log: a line every few seconds, not a bar


def _hold_progress(path: Path, say: Callable[[str], None]) -> held.Progress:
    """A line now and then while `path` is held: which step, how many GB of how many."""
    last = [time.monotonic()]
    lock = threading.Lock()

    def report(step: held.Step, done: int, total: int) -> None:
        now = time.monotonic()
        with lock:
            if now - last[0] < HOLD_PROGRESS_EVERY_S:
                return
            last[0] = now
        say(f"holding {path}: {step} {done / 1e9:.1f} of {total / 1e9:.1f} GB")

    return report


def run(
    path: Path | None = None, say: Callable[[str], None] | None = None, hold: list[Path] | None = None
) -> int:
    """The agent, in the foreground until SIGTERM/SIGINT/SIGHUP; returns its exit status.
    A FastVLLMError at start (another agent, no privileges, no CRIU, weights it cannot hold)
    is raised."""
    speak = say or (lambda line: print(f"fastvllm agent: {line}", file=sys.stderr, flush=True))
    agent = Agent((path or default_socket()).expanduser().absolute(), speak)
    agent._install_signals()
    journal.recover(say=speak)
    sock_path = agent.listener.path
    agent.listener.open()
    try:
        _pretouch()
        hold_weights(list(hold or []), speak)
        agent.listener.listen()
    except BaseException:
        agent.listener.close()
        held.release_all()
        raise
    held.announce(sock_path)
    speak(f"ready on {sock_path} (pid {os.getpid()}); restores on request, one at a time")
    try:
        return agent.serve()
    finally:
        held.announce(None)
        held.release_all()
