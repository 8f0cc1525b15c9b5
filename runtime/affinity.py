"""CPU affinity of a tree's threads, carried across a snapshot.

Why: CRIU gives restored threads back their TIDs but not their affinity masks. vLLM's CPU
backend binds its OpenMP threads to cores once, at start-up (VLLM_CPU_OMP_THREADS_BIND); a
restored worker that had been bound to core 1 came back allowed on cores 0-1 (measured here),
so two restored servers meant to keep to their own cores contend for both. The masks are
recorded before the dump and, when the restore is asked to (`--keep-affinity`), set again right
after CRIU returns. Not by default: vLLM's `auto` binding puts every server of a host on the
same cores, which only stays harmless while CRIU leaves the restored threads free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def record(pids: Iterable[int]) -> dict[str, list[int]]:
    """TID -> CPUs for every thread of `pids` whose mask is narrower than what this process
    may use (threads left free need nothing restored)."""
    free = os.sched_getaffinity(0)
    out: dict[str, list[int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    mask = os.sched_getaffinity(int(tid))
                    if mask != free:
                        out[tid] = sorted(mask)
    return out


def apply(masks: dict[str, list[int]]) -> list[str]:
    """Set the recorded masks again; returns the TIDs that could not be bound (gone, or their
    CPUs do not exist here): those run unbound, as CRIU left them."""
    usable = os.sched_getaffinity(0)
    missed = []
    for tid, cpus in masks.items():
        mine = set(cpus) & usable
        try:
            if not mine:
                raise OSError("none of its CPUs is usable here")
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            missed.append(tid)
    return missed
