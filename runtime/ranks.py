"""Which worker rank a failure of a parallel server comes from.

A tensor-parallel server is one process per rank; a snapshot records each rank's PID (CRIU
gives the restored tree the same PIDs), so an error can say which rank died or failed instead
of leaving the user to read every worker's log.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

from fastvllm.runtime import proctree


def dead(worker_pids: Sequence[int], alive: Callable[[int], bool] = proctree.alive) -> list[tuple[int, int]]:
    """(rank, PID) of each worker that is gone (or a zombie)."""
    return [(rank, pid) for rank, pid in enumerate(worker_pids) if not alive(pid)]


def named_in(message: str, worker_pids: Sequence[int]) -> list[tuple[int, int]]:
    """(rank, PID) of each worker whose PID the message names ("PID 1234", "process 1234")."""
    said = {int(p) for p in re.findall(r"(?:PID|process) (\d+)", message)}
    return [(rank, pid) for rank, pid in enumerate(worker_pids) if pid in said]


def describe(what: str, ranks: Sequence[tuple[int, int]]) -> str:
    """'worker rank 1 (PID 1234) died' / 'worker ranks 0 (PID 1), 1 (PID 2) died'."""
    if not ranks:
        return ""
    listed = ", ".join(f"{rank} (PID {pid})" for rank, pid in ranks)
    return f"worker rank{'s' if len(ranks) > 1 else ''} {listed} {what}"


def blame(
    message: str,
    worker_pids: Sequence[int],
    alive: Callable[[int], bool] = proctree.alive,
    first: Sequence[tuple[int, int]] = (),
) -> str:
    """What to add to an error of a parallel server: the ranks that died first (`first`, as a
    `Watch` saw them: vLLM stops the other workers once one dies), else those dead now, else
    the ranks the message names by PID ("" for a single worker, or when no rank can be told)."""
    if len(worker_pids) < 2:
        return ""
    if first:
        return describe("died first", first)
    gone = dead(worker_pids, alive)
    if gone:
        return describe("had died", gone)
    return describe("is the one that failed", named_in(message, worker_pids))


class Watch:
    """Watches the workers of a parallel server from a thread and keeps the ranks that died
    first: once one worker dies vLLM stops the others, so by the time an error reaches the
    caller every rank is gone and only the order tells which failed."""

    def __init__(self, worker_pids: Sequence[int], poll_s: float = 0.01) -> None:
        self.pids = list(worker_pids)
        self.poll_s = poll_s
        self.first: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        if len(self.pids) > 1:
            self._thread = threading.Thread(target=self._run, name="rank-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            gone = dead(self.pids)
            if gone:
                self.first = gone
                return
            if self._stop.wait(self.poll_s):
                return
