"""Termination signals handled like Ctrl-C.

`install()` (the CLI calls it first thing) makes SIGTERM, SIGHUP and SIGINT raise
`Terminated`, a KeyboardInterrupt, in the main thread: every cleanup written for Ctrl-C (the
pipelines' undo stacks, `runtime.journal`) then runs for `timeout`, `docker stop`, `systemctl
stop` or a dropped SSH session too, and the process exits 128 + the signal's number.

Only the first signal raises. Later ones are recorded and nothing more: a second Ctrl-C
cannot abort a cleanup half-way (SIGKILL still can; the journal covers that). `shielded()`
does the same for a cleanup that runs for another reason (a failed step): a signal that
comes during it raises once it is done. A signal the process inherited as ignored (`nohup`'s
SIGHUP, a background job's SIGINT) stays ignored.

Worker threads cannot be interrupted; a pipeline running in one (the cluster agent's) calls
`check()` between its steps, which raises there once the process has been told to stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """The process was told to stop by `signum`; raised where Ctrl-C would have raised."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    def __init__(self) -> None:
        self.received: int | None = None  # the first terminating signal, once one came
        self.shield = 0  # depth of shielded() blocks
        self.installed: dict[int, Any] = {}  # signal -> the handler it had before install()


_state = _State()


def _handler(signum: int, _frame: FrameType | None) -> None:
    first = _state.received is None
    if first:
        _state.received = signum
    if first and not _state.shield:
        raise Terminated(signum)


def install() -> None:
    """Handle SIGTERM, SIGHUP and SIGINT like Ctrl-C in this process (main thread only; a
    no-op elsewhere). Signals inherited as ignored are left ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN or current is _handler:
            continue
        _state.installed[sig] = current
        signal.signal(sig, _handler)


def reset() -> None:
    """Undo `install()` and forget any signal received (tests)."""
    for sig, old in _state.installed.items():
        signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: not set from Python
    _state.installed = {}
    _state.received = None
    _state.shield = 0


def received() -> int | None:
    """The first terminating signal this process got since `install()`, if any."""
    return _state.received


def deliver(signum: int) -> None:
    """Act on `signum` as if it had just come (main thread, from a signal handler of the
    caller's own): raise Terminated, unless shielded or one came already. The resident agent
    turns a client's cancel into a SIGTERM for the restore it runs this way."""
    _handler(signum, None)


def forget() -> None:
    """Forget the signal received: a resident process that undid one request's work on it
    goes on serving, and the next request must be interruptible again."""
    _state.received = None


def check() -> None:
    """Between the steps of a pipeline: raise Terminated in a worker thread once the process
    was told to stop (the main thread got it already, where the signal landed)."""
    if _state.received is not None and threading.current_thread() is not threading.main_thread():
        raise Terminated(_state.received)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Run a cleanup to its end: a signal that comes during it is recorded, and raised as
    Terminated once the block is done (if the block raises, its exception goes on instead, and
    the process still exits 128+signum through the CLI).

    Without `install()` (the Python API: the caller's Ctrl-C is Python's own KeyboardInterrupt,
    which lands anywhere) the outermost block holds SIGINT itself while it runs and raises it
    after, as KeyboardInterrupt: a Ctrl-C that came between launching a server and registering
    its undo would otherwise leave the server running, with nothing left to stop it."""
    main = threading.current_thread() is threading.main_thread()
    before = _state.received
    held = False
    if main:
        if not _state.shield and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _handler)
            held = True
        _state.shield += 1
    done = False
    try:
        yield
        done = True
    finally:
        if main:
            _state.shield -= 1
            if held:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                got, _state.received = _state.received, before  # the caller's to keep, not ours
                if done and got is not None:
                    raise Terminated(got)
    if main and before is None and _state.received is not None and not _state.shield:
        raise Terminated(_state.received)
