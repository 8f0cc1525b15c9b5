"""What every benchmark shares: repetitions, medians, a description of the host it ran on, and
its results written as JSON and a PNG chart.

A benchmark's result is one JSON document: `document()` gives its frame (name, date, host,
parameters) and each measured column is a `Column` (every run kept, the median beside them),
so a reader can tell a noisy median from a steady one. matplotlib is imported only when a chart
is drawn: the CLI imports this module, and most commands never draw.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.runtime import system


def median(values: Iterable[float]) -> float | None:
    """The median of `values`, None for none (a column whose runs were all skipped)."""
    got = [float(v) for v in values]
    return statistics.median(got) if got else None


@dataclass
class Column:
    """One measured quantity: every run's value (seconds, unless `unit` says otherwise), and
    what each run recorded beside it (`details`, one dict per run, in run order)."""

    name: str
    label: str = ""  # for charts and tables; `name` when empty
    unit: str = "s"
    runs: list[float] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""  # why the column has no runs, when it has none on purpose

    def add(self, value: float, **detail: Any) -> None:
        self.runs.append(float(value))
        self.details.append(detail)

    @property
    def median(self) -> float | None:
        return median(self.runs)

    def as_dict(self) -> dict[str, Any]:
        med = self.median
        doc: dict[str, Any] = {
            "label": self.label or self.name,
            "unit": self.unit,
            "median": round(med, 4) if med is not None else None,
            "min": round(min(self.runs), 4) if self.runs else None,
            "max": round(max(self.runs), 4) if self.runs else None,
            "runs": [round(v, 4) for v in self.runs],
        }
        if any(self.details):
            doc["details"] = self.details
        if self.skipped:
            doc["skipped"] = self.skipped
        return doc


def repeat(
    reps: int,
    once: Callable[[int], float],
    column: Column,
    say: Callable[[str], None] = lambda _m: None,
) -> Column:
    """Run `once(i)` `reps` times into `column` (it returns the run's value) and say each one."""
    for i in range(reps):
        value = once(i)
        column.add(value)
        say(f"{column.label or column.name} {i + 1}/{reps}: {value:.3f} {column.unit}")
    return column


def host_info() -> dict[str, Any]:
    """The machine a result was measured on, and how busy it was when this was called (the load
    average and the other processes using a CPU: a shared machine's figures are noisier)."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_bytes": system.meminfo("MemTotal"),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    gpus = _gpus()
    if gpus:
        info["gpus"] = gpus
    return info


def busy_processes(threshold_pct: float = 20.0, sample_s: float = 0.5) -> list[dict[str, Any]]:
    """Processes other than this one that used more than `threshold_pct` of a CPU over
    `sample_s` seconds: what else ran while a benchmark did."""

    def ticks() -> dict[int, tuple[int, str]]:
        out: dict[int, tuple[int, str]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                rest = stat[stat.rindex(")") + 2 :].split()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                out[int(d.name)] = (int(rest[11]) + int(rest[12]), name)
            except (OSError, ValueError, IndexError):
                continue
        return out

    a = ticks()
    time.sleep(sample_s)
    b = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    busy = []
    for pid, (t, name) in b.items():
        if pid == me or pid not in a:
            continue
        pct = 100.0 * (t - a[pid][0]) / hz / sample_s
        if pct >= threshold_pct:
            busy.append({"pid": pid, "name": name, "cpu_pct": round(pct)})
    return sorted(busy, key=lambda p: -p["cpu_pct"])


def _gpus() -> list[str]:
    from fastvllm.runtime import devices

    text = devices.nvidia_smi("--query-gpu=name,driver_version,memory.total", timeout=20)
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def document(
    benchmark: str, columns: Sequence[Column], params: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A benchmark's result: its name, date, host, parameters, then each column (runs and
    median) and anything else it measured (`extra`)."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_info(),
        "params": dict(params or {}),
        "columns": {c.name: c.as_dict() for c in columns},
        **extra,
    }


def write_json(doc: Mapping[str, Any], path: Path) -> Path:
    """Write `doc` (indented, a newline at the end), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def bar_chart(doc: Mapping[str, Any], path: Path, title: str = "", xlabel: str = "") -> Path:
    """A horizontal bar per column that has runs: the median as the bar, each run as a dot,
    the median's value written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in doc["columns"].values() if c["runs"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(1, len(cols))))
    labels = [c["label"] for c in cols]
    meds = [c["median"] for c in cols]
    ax.barh(range(len(cols)), meds, color="#2a7ab9")
    top = max((max(c["runs"]) for c in cols), default=1.0)
    for y, c in enumerate(cols):
        ax.plot(c["runs"], [y] * len(c["runs"]), "k.", alpha=0.6)
        ax.text(max(c["runs"]), y, f"  {c['median']:.2f} {c['unit']}", va="center", fontsize=8)
    ax.set_yticks(range(len(cols)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log" if top / max(min(meds, default=1.0), 1e-3) > 20 else "linear")
    ax.set_xlim(right=top * (3 if ax.get_xscale() == "log" else 1.25))
    ax.set_xlabel(xlabel or "median (bar) and each run (dots)")
    ax.set_title(title or f"{doc['benchmark']}, {doc['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
