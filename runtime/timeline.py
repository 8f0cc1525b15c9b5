"""Phase timings: every pipeline records named phases so the CLI can draw a timeline and
benchmarks and manifests carry the same numbers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """How a phase ended: its work done, an error, or a stop from outside (Ctrl-C, a signal)."""

    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass
class Phase:
    name: str
    start_s: float  # offset from the timeline's origin
    duration_s: float
    outcome: Outcome = Outcome.OK

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass
class Timeline:
    """Records phases relative to one origin; `on_phase` lets a UI show them as they happen."""

    origin: float = field(default_factory=time.perf_counter)
    phases: list[Phase] = field(default_factory=list)
    on_start: Callable[[str], None] | None = None
    on_end: Callable[[Phase], None] | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_start:
            self.on_start(name)
        t0 = time.perf_counter()
        outcome = Outcome.OK
        try:
            yield
        except Exception:
            outcome = Outcome.FAILED
            raise
        except BaseException:  # KeyboardInterrupt (runtime.signals' Terminated too), SystemExit
            outcome = Outcome.INTERRUPTED
            raise
        finally:
            p = Phase(name, t0 - self.origin, time.perf_counter() - t0, outcome)
            self.phases.append(p)
            if self.on_end:
                self.on_end(p)

    def elapsed(self) -> float:
        return time.perf_counter() - self.origin

    def durations(self) -> dict[str, float]:
        return {p.name: round(p.duration_s, 4) for p in self.phases}

    def as_list(self) -> list[dict[str, float | str]]:
        return [
            {
                "name": p.name,
                "start_s": round(p.start_s, 4),
                "duration_s": round(p.duration_s, 4),
                "outcome": p.outcome.value,
            }
            for p in self.phases
        ]
