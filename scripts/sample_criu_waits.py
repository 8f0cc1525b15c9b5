"""Where a restore's CRIU waits: restores a snapshot (from a cold page cache by default) while a
thread samples every CRIU thread's state about once a millisecond, and prints the kernel stacks
and system calls it found them blocked in (state D), most frequent first.

Why a sampler and not perf: it needs nothing but /proc (root), and the stack plus the file or
path a blocked system call names is what tells a page fault on a page image from file-system
bookkeeping. It found CRIU's work files on ext4 and its uncached kernel probes (README,
"Prefetch and the overlapped restore"). Counts are samples, not time: a sample pass over /proc
takes 1-3 ms on the 2-core machine.

    python -m fastvllm.scripts.sample_criu_waits SNAPSHOT [--warm] [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastvllm.runtime import system

import fastvllm as api

# system calls whose first or second argument is a path (x86_64 numbers)
_PATH_ARG = {"2": 0, "4": 0, "6": 0, "21": 0, "83": 0, "84": 0, "87": 0, "257": 1, "262": 1, "263": 1}


def _syscall_target(pid: str, tid: str) -> str:
    """'nrN <path or file>' for the system call a blocked thread is in ('fault' outside one)."""
    try:
        sc = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return ""
    if not sc or sc[0] in ("running", "-1"):
        return "fault"
    nr = sc[0]
    try:
        if nr in _PATH_ARG:
            addr = int(sc[1 + _PATH_ARG[nr]], 16)
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(addr)
                return f"nr{nr} " + mem.read(256).split(b"\0")[0].decode(errors="replace")
        return f"nr{nr} " + os.readlink(f"/proc/{pid}/fd/{int(sc[1], 16)}")
    except (OSError, ValueError, IndexError):
        return f"nr{nr}"


def _stack(pid: str, tid: str, depth: int = 6) -> str:
    try:
        lines = Path(f"/proc/{pid}/task/{tid}/stack").read_text().splitlines()
    except OSError:
        return ""
    return " < ".join(ln.split(" ", 1)[-1].split("+")[0] for ln in lines[:depth])


class Sampler(threading.Thread):
    """Samples every process named 'criu' (CRIU, and the tree while CRIU still restores it)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.states: collections.Counter[str] = collections.Counter()
        self.blocked: collections.Counter[tuple[str, str]] = collections.Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() != "criu":
                        continue
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    except (OSError, IndexError):
                        continue
                    self.states[state] += 1
                    if state == "D":
                        self.blocked[(_stack(pid, tid), _syscall_target(pid, tid))] += 1
            time.sleep(0.001)


def sample_one(snap: Path, cold: bool) -> dict[str, Any]:
    if cold and not system.drop_page_cache():
        raise SystemExit("cannot drop the page cache (needs root)")
    s = Sampler()
    s.start()
    r = api.restore(snap)
    s.stop.set()
    s.join()
    try:
        phases = {p["name"]: round(p["duration_s"], 3) for p in r.timeline.as_list()}
    finally:
        api.stop(r.server.pid)
    return {
        "ttfc_s": round(r.time_to_first_completion_s, 3),
        "criu_restore_s": phases.get("criu_restore"),
        "states": dict(s.states),
        "blocked": [{"stack": k[0], "call": k[1], "samples": n} for k, n in s.blocked.most_common(25)],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it first)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every repetition's samples here")
    args = ap.parse_args(argv)
    runs = []
    for rep in range(1, args.reps + 1):
        got = sample_one(args.snapshot, cold=not args.warm)
        runs.append(got)
        total = sum(got["states"].values())
        print(
            f"rep {rep}: first completion {got['ttfc_s']} s, CRIU {got['criu_restore_s']} s, "
            f"{total} samples ({got['states']})"
        )
        for b in got["blocked"][:12]:
            print(f"  {b['samples']:4d}  {b['stack'][:100]}  [{b['call'][:80]}]")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"snapshot": str(args.snapshot), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
