"""The client side of `fastvllm agent` (fastvllm/resident.py): hand a `fastvllm restore` to the
warm agent of this host, when one runs, instead of importing the restore stack here.

Standard library only, and little of it: the launcher calls `forward(argv)` before it imports
anything else, so that with an agent running a restore costs this module's import, one socket
round trip and the restore itself. `forward` returns None whenever the full CLI should run the
command instead: it is not `restore`, it uses an option the agent does not take (--container,
--help, a value the CLI would reject: the CLI says why), FASTVLLM_AGENT=0, no agent listens on
this host's socket, or the agent declined (other FASTVLLM_* settings than the client's, the
agent stopping).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import struct
import sys
from typing import Any

SOCKET_NAME = "agent.sock"  # = fastvllm.resident.SOCKET_NAME
PROTOCOL = 1
GREETING_TIMEOUT_S = 10.0  # the agent's accept thread answers at once; a wedged one is skipped
# runtime.modes.CriuRestoreMode's values (tests/test_contracts_units.py keeps them equal), spelled
# out: this client imports nothing but the standard library.
CRIU_MODES = ("auto", "mmap", "copy", "lazy")
_FLAGS = {  # flag -> (option, value)
    "--verify": ("verify", True),
    "--no-verify": ("verify", False),
    "--prefetch": ("prefetch", True),
    "--no-prefetch": ("prefetch", False),
    "--reverify": ("reverify", True),
    "--keep-affinity": ("keep_affinity", True),
    "--json": ("json", True),
}
_VALUED = ("--prefetch-threads", "--timeout", "--criu-restore")
_CATCH = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def socket_path() -> str:
    """<run dir>/agent.sock, the run directory as runtime/config.py's RUN_DIR gives it."""
    raw = os.environ.get("FASTVLLM_RUN_DIR", "").strip()
    if raw:
        run_dir = os.path.expanduser(raw)
    else:
        run_dir = "/run/fastvllm" if os.geteuid() == 0 else "/tmp/fastvllm-run"
    return os.path.join(run_dir, SOCKET_NAME)


def enabled() -> bool:
    """FASTVLLM_AGENT (runtime/config.py's AGENT): on unless 0/false/no/off."""
    return os.environ.get("FASTVLLM_AGENT", "").strip().lower() not in ("0", "false", "no", "off")


def parse_restore(args: list[str]) -> dict[str, Any] | None:
    """`fastvllm restore`'s arguments as the agent's request options; None for anything else
    (the full CLI handles it, and explains what is wrong)."""
    opts: dict[str, Any] = {}
    where: str | None = None
    i, positional_only = 0, False
    while i < len(args):
        a = args[i]
        i += 1
        if positional_only or not a.startswith("-") or a == "-":
            if where is not None:
                return None
            where = a
            continue
        if a == "--":
            positional_only = True
            continue
        if a in _FLAGS:
            key, flag = _FLAGS[a]
            opts[key] = flag
            continue
        name, eq, value = a.partition("=")
        if name not in _VALUED:
            return None  # --container, --help, a typo: the CLI's business
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        parsed = _value(name, value)
        if parsed is None:
            return None
        opts[name[2:].replace("-", "_")] = parsed
    if where is None:
        return None
    opts["dir"] = os.path.abspath(os.path.expanduser(where))
    return opts


def _value(name: str, raw: str) -> Any:
    if name == "--criu-restore":
        mode = raw.lower()
        return mode if mode in CRIU_MODES else None
    try:
        if name == "--prefetch-threads":
            n = int(raw)
            return n if n >= 0 else None
        t = float(raw)
    except ValueError:
        return None
    return t if t > 0 and math.isfinite(t) else None


def connect(path: str | None = None, timeout: float = GREETING_TIMEOUT_S) -> tuple[socket.socket, int] | None:
    """A connection to the agent and its PID; None when none listens there or it is another
    user's (SO_PEERCRED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path or socket_path())
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _gid = struct.unpack("3i", raw)
    except OSError:
        sock.close()
        return None
    if uid != os.geteuid():
        sock.close()
        return None
    return sock, pid


class _Lines:
    """JSON documents, one a line, from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None


def ping(path: str | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    """The agent's status (pid, busy, restores done...), or None when none answers."""
    got = connect(path, timeout)
    if got is None:
        return None
    sock, _pid = got
    try:
        sock.sendall(b'{"op": "ping"}\n')
        doc = _Lines(sock).next()
    except OSError:
        return None
    finally:
        sock.close()
    return doc if doc is not None and doc.get("event") == "pong" else None


def forward(argv: list[str]) -> int | None:
    """Run `fastvllm <argv>` through the agent if it is a restore the agent can do; returns the
    exit status, or None: run the full CLI instead."""
    if not argv or argv[0] != "restore" or not enabled():
        return None
    opts = parse_restore(argv[1:])
    if opts is None:
        return None
    got = connect()
    if got is None:
        return None
    sock, pid = got
    env = {k: v for k, v in os.environ.items() if k.startswith("FASTVLLM_")}
    req = {"op": "restore", "v": PROTOCOL, **opts, "env": env}
    lines = _Lines(sock)
    try:
        sock.sendall((json.dumps(req) + "\n").encode())
        first = lines.next()
    except OSError:
        first = None
    if first is None or first.get("event") != "accepted":
        sock.close()  # declined, or no answer: nothing was started for us
        return None
    sock.settimeout(None)
    return _Session(sock, lines, pid, opts).run(int(first.get("ahead", 0)))


class _Session:
    """One forwarded restore: the agent's events printed, Ctrl-C/SIGTERM sent as a cancel."""

    def __init__(self, sock: socket.socket, lines: _Lines, pid: int, opts: dict[str, Any]) -> None:
        self.sock, self.lines, self.pid, self.opts = sock, lines, pid, opts
        self.quiet = bool(opts.get("json"))
        self.signum: int | None = None

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is not None:
            return  # the agent is undoing: a second Ctrl-C must not cut that short
        self.signum = signum
        with contextlib.suppress(OSError):
            self.sock.sendall(b'{"op": "cancel"}\n')

    def run(self, ahead: int) -> int | None:
        old = {}
        for sig in _CATCH:
            current = signal.getsignal(sig)
            if current is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            if ahead:
                self.say(f"waiting for the fastvllm agent (pid {self.pid}): {ahead} restore(s) ahead")
            return self._events()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.sock.close()

    def _events(self) -> int | None:
        while True:
            ev = self.lines.next()
            if ev is None:
                print(
                    f"error: the fastvllm agent (pid {self.pid}) went away mid-restore (the next fastvllm "
                    "command cleans up what it left; its log says why)",
                    file=sys.stderr,
                    flush=True,
                )
                return 128 + self.signum if self.signum else 1
            kind = ev.get("event")
            if kind == "started":
                self.say(f"restoring {self.opts['dir']} through the fastvllm agent (pid {self.pid})")
            elif kind == "phase_end":
                self.say(_phase_line(ev))
            elif kind == "declined":  # it stops before our turn: nothing was started for us
                return 128 + self.signum if self.signum else None
            elif kind == "result":
                return self._result(ev)

    def _result(self, ev: dict[str, Any]) -> int:
        code = int(ev.get("exit_code", 1))
        if code == 0:
            if self.opts.get("json"):
                try:
                    print(json.dumps(ev.get("result"), indent=2, ensure_ascii=False), flush=True)
                except BrokenPipeError:
                    return 1
            for line in ev.get("lines", []):
                self.say(line)
            return 0
        if self.signum is not None and ev.get("interrupted"):
            name = signal.Signals(self.signum).name
            print(
                f"interrupted by {name}: stopped what was started and removed partial output",
                file=sys.stderr,
                flush=True,
            )
            return 128 + self.signum
        print(f"error: {ev.get('error')}", file=sys.stderr, flush=True)
        if ev.get("detail"):
            print(ev["detail"], file=sys.stderr, flush=True)
        return code


def _phase_line(ev: dict[str, Any]) -> str:
    ok = ev.get("outcome") == "ok"
    mark = "✓" if ok else "✗"
    line = f"{mark} {ev.get('name', ''):<22} {float(ev.get('duration_s', 0.0)):7.2f} s"
    if not ok:
        line += f" {ev.get('outcome')}"
    n = ev.get("bytes")
    if n:
        rate = n / max(float(ev.get("duration_s", 0.0)), 1e-6)
        line += f"  {_human(n)} {_human(rate)}/s"
    return line


def _human(n: float) -> str:
    """= runtime/units.py's human_bytes (binary units), without importing it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
