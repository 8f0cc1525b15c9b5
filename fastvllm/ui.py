"""Rich rendering for the CLI: a live phase timeline while a pipeline runs, tables after.

Kept apart from the pipelines so the Python API stays silent and `--json` stays clean."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from fastvllm.runtime.errors import FastVLLMError
from fastvllm.runtime.timeline import Phase, Timeline
from fastvllm.runtime.units import human_bytes

console = Console(stderr=True)  # human output on stderr; stdout is reserved for --json
out = Console()


class _BytesColumn(ProgressColumn):
    """Bytes and throughput, only for phases that report bytes."""

    def render(self, task: Task) -> Text:
        done = task.fields.get("bytes", 0)
        if not done:
            return Text("")
        speed = done / max(task.elapsed or 0.0, 1e-6)
        return Text(f"{human_bytes(done)} {human_bytes(speed)}/s", style="dim")


class LiveTimeline:
    """Shows each phase as a spinner while it runs and its duration once done; phases that
    move bytes (checksums, the restore's read-ahead) also show bytes and throughput. Phases
    may overlap (the read-ahead runs beside CRIU): each has its own line."""

    BYTE_PHASES = ("verify_checksums", "readahead")

    def __init__(self, timeline: Timeline, enabled: bool = True) -> None:
        self.timeline = timeline
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[extra]}"),
            _BytesColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self.running_tasks: dict[str, TaskID] = {}
        self.byte_task: TaskID | None = None  # where on_bytes counts: the byte phase running
        self._lock = threading.Lock()
        timeline.on_start = self._start
        timeline.on_end = self._end

    def _start(self, name: str) -> None:
        task = self.progress.add_task(name, total=None, extra="", bytes=0)
        with self._lock:
            self.running_tasks[name] = task
            if name in self.BYTE_PHASES:
                self.byte_task = task

    def _end(self, phase: Phase) -> None:
        with self._lock:
            task = self.running_tasks.pop(phase.name, None)
            if task is not None and task == self.byte_task:
                self.byte_task = None
        if task is not None:
            self.progress.update(task, total=1, completed=1, extra=f"{phase.duration_s:7.2f} s")

    def on_bytes(self, n: int) -> None:
        with self._lock:  # from reader threads
            task = self.byte_task
            if task is None:
                return
            done = self.progress.tasks[task].fields.get("bytes", 0) if task < len(self.progress.tasks) else 0
            self.progress.update(task, bytes=done + n)

    @contextmanager
    def running(self) -> Iterator[LiveTimeline]:
        with self.progress:
            yield self


def bytes_bar(total: int, label: str, enabled: bool) -> tuple[Progress, Callable[[int], None]]:
    """A progress bar in bytes and the callback that advances it (safe from reader threads:
    rich's update takes a lock)."""
    bar = Progress(
        *Progress.get_default_columns()[:2],
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.update(task, advance=n)


def phase_table(timeline: Timeline, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("phase")
    t.add_column("starts at", justify="right")
    t.add_column("duration", justify="right")
    t.add_column("")
    total = max((p.start_s + p.duration_s for p in timeline.phases), default=0.0) or 1.0
    for p in sorted(timeline.phases, key=lambda p: p.start_s):  # overlapping phases end out of order
        width = 30
        lead = round(p.start_s / total * width)
        bar = " " * lead + "█" * max(1, round(p.duration_s / total * width))
        t.add_row(p.name, f"{p.start_s:.2f} s", f"{p.duration_s:.2f} s", f"[cyan]{bar}[/]")
    return t


def print_error(e: FastVLLMError) -> None:
    console.print(f"[bold red]error:[/] {e.one_line()}", highlight=False, soft_wrap=True)
    if e.detail:
        console.print(e.detail, style="dim", highlight=False, markup=False)


T = TypeVar("T")


def guard(fn: Callable[[], T]) -> T:
    """Run a command's work: a FastVLLMError becomes its one-line message and exit code, Ctrl-C
    exit 130 (the pipelines have stopped what they started and removed partial output)."""
    try:
        return fn()
    except FastVLLMError as e:
        print_error(e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: stopped what was started and removed partial output")
        raise typer.Exit(130) from None
