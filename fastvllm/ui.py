"""Rich rendering for the CLI: a live phase timeline while a pipeline runs, tables after.

Kept apart from the pipelines so the Python API stays silent and `--json` stays clean.
rich's progress and table modules are imported by the functions that draw them: every command
imports this module, and most draw neither.
"""

from __future__ import annotations

import functools
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.text import Text

from fastvllm.runtime import signals
from fastvllm.runtime.errors import FastVLLMError, from_os_error
from fastvllm.runtime.timeline import Outcome, Phase, Timeline
from fastvllm.runtime.units import human_bytes

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, TaskID
    from rich.table import Table

    from fastvllm.runtime import vllm_server

console = Console(stderr=True)  # human output on stderr; stdout is reserved for --json
out = Console()


@functools.cache
def _column_types() -> tuple[type[ProgressColumn], type[SpinnerColumn]]:
    """The timeline's own columns (bytes, mark), defined on first use with rich.progress."""
    from rich.console import RenderableType
    from rich.progress import ProgressColumn, SpinnerColumn, Task

    class _BytesColumn(ProgressColumn):
        """Bytes and throughput, only for phases that report bytes."""

        def render(self, task: Task) -> Text:
            done = task.fields.get("bytes", 0)
            if not done:
                return Text("")
            speed = done / max(task.elapsed or 0.0, 1e-6)
            return Text(f"{human_bytes(done)} {human_bytes(speed)}/s", style="dim")

    class _MarkColumn(SpinnerColumn):
        """A spinner while the phase runs; then ✓, or a red ✗ for one that failed or was interrupted."""

        def render(self, task: Task) -> RenderableType:
            if task.finished and task.fields.get("outcome", Outcome.OK) != Outcome.OK:
                return Text("✗", style="bold red")
            return super().render(task)

    return _BytesColumn, _MarkColumn


class LiveTimeline:
    """Shows each phase as a spinner while it runs and its duration once done; phases that
    move bytes (checksums, the restore's read-ahead) also show bytes and throughput. Phases
    may overlap (the read-ahead runs beside CRIU): each has its own line.

    It draws on a thread of its own, never on the pipeline's: soon after a phase starts or
    ends (at most every DRAW_MIN_S), else every DRAW_IDLE_S for the spinners and clocks. A
    redraw holds the GIL for ~5 ms (a dozen phase lines on a terminal): rich's own 10 per
    second slowed a CPU-bound main thread by 10-15% here, 4 per second by ~2%."""

    BYTE_PHASES = ("verify_checksums", "readahead")
    DRAW_MIN_S = 0.1
    DRAW_IDLE_S = 0.25

    def __init__(self, timeline: Timeline, enabled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bytes_column, mark_column = _column_types()
        self.timeline = timeline
        self.enabled = enabled
        self.progress = Progress(
            mark_column(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[extra]}"),
            bytes_column(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not enabled,
            auto_refresh=False,  # self._draw redraws
        )
        self._changed = threading.Event()  # a phase started or ended: redraw soon
        self._done = threading.Event()
        self.running_tasks: dict[str, TaskID] = {}
        self.byte_task: TaskID | None = None  # where on_bytes counts: the byte phase running
        self._lock = threading.Lock()
        timeline.on_start = self._start
        timeline.on_end = self._end

    def _start(self, name: str) -> None:
        task = self.progress.add_task(name, total=None, extra="", bytes=0, outcome=Outcome.OK)
        with self._lock:
            self.running_tasks[name] = task
            if name in self.BYTE_PHASES:
                self.byte_task = task
        self._changed.set()

    def _end(self, phase: Phase) -> None:
        with self._lock:
            task = self.running_tasks.pop(phase.name, None)
            if task is not None and task == self.byte_task:
                self.byte_task = None
        if task is not None:
            extra = f"{phase.duration_s:7.2f} s"
            if not phase.ok:
                extra = f"[red]{extra} {phase.outcome.value}[/]"
            self.progress.update(task, total=1, completed=1, extra=extra, outcome=phase.outcome)
            self._changed.set()

    def _abandon(self) -> None:
        """The pipeline stopped with phases still running (in threads that will never end
        them): they show as interrupted, not as a spinner frozen mid-turn."""
        with self._lock:
            left, self.running_tasks, self.byte_task = list(self.running_tasks.values()), {}, None
        for task in left:
            self.progress.update(
                task, total=1, completed=1, extra="[red]interrupted[/]", outcome=Outcome.INTERRUPTED
            )

    def on_bytes(self, n: int) -> None:
        with self._lock:  # from reader threads
            task = self.byte_task
            if task is None:
                return
            done = self.progress.tasks[task].fields.get("bytes", 0) if task < len(self.progress.tasks) else 0
            self.progress.update(task, bytes=done + n)

    def _draw(self) -> None:
        while not self._done.is_set():
            self._changed.wait(self.DRAW_IDLE_S)
            self._changed.clear()
            if self._done.is_set():
                return
            self.progress.refresh()
            self._done.wait(self.DRAW_MIN_S)

    @contextmanager
    def running(self) -> Iterator[LiveTimeline]:
        with self.progress:  # drawn at once; the last state again when the block ends
            drawer = threading.Thread(target=self._draw, name="timeline", daemon=True)
            if self.enabled:
                drawer.start()
            try:
                yield self
            except BaseException:
                self._abandon()
                raise
            finally:
                self._done.set()
                self._changed.set()  # wake it now, not at its next tick
                if drawer.is_alive():
                    drawer.join()


def bytes_bar(total: int, label: str, enabled: bool) -> tuple[Progress, Callable[[int], None]]:
    """A progress bar in bytes and the callback that advances it (safe from reader threads:
    rich's update takes a lock)."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

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
    from rich.table import Table

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
        name = p.name if p.ok else f"[red]✗ {p.name} ({p.outcome.value})[/]"
        colour = "cyan" if p.ok else "red"
        t.add_row(name, f"{p.start_s:.2f} s", f"{p.duration_s:.2f} s", f"[{colour}]{bar}[/]")
    return t


def address_of(host: str, port: int) -> str:
    """A server's address as it listens: a wildcard host says it is every address."""
    from fastvllm.runtime import vllm_server

    return vllm_server.describe_address(host, port)


def address(server: vllm_server.Server) -> str:
    """Where a user reaches `server`, and where it listens when that is every address."""
    from fastvllm.runtime import vllm_server

    if server.host in vllm_server.WILDCARD_HOSTS:
        return f"{server.base_url} (it listens on every address of this host: {server.listen_url})"
    return server.base_url


def print_error(e: FastVLLMError) -> None:
    console.print(f"[bold red]error:[/] {e.one_line()}", highlight=False, soft_wrap=True)
    if e.detail:
        console.print(e.detail, style="dim", highlight=False, markup=False)


T = TypeVar("T")


def guard(fn: Callable[[], T]) -> T:
    """Run a command's work: a FastVLLMError becomes its one-line message and exit code, Ctrl-C
    exit 130 (the pipelines have stopped what they started and removed partial output). typer
    is imported on the way out only: a restore the launcher runs does not import it
    (fastvllm/restore_command.py)."""
    try:
        return fn()
    except FastVLLMError as e:
        import typer

        print_error(e)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # a path of the user's that cannot be written or read: say which, and the fix
        import typer

        err = from_os_error(e)
        if err is None:
            raise
        print_error(err)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (runtime.signals.Terminated)
        import typer

        by = f" by {e.name}" if isinstance(e, signals.Terminated) else ""
        console.print(f"[yellow]interrupted{by}[/]: stopped what was started and removed partial output")
        raise typer.Exit(e.exit_code if isinstance(e, signals.Terminated) else 130) from None


INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE (sysexits.h): fastvllm itself is at fault


def internal_error(e: BaseException) -> int:
    """An exception no command expected (a bug): one line for the user, the traceback in a file
    for the report; returns the exit code. An OSError on a path the user can fix (permission,
    a read-only or full file system) that got past a command's guard is told as such instead."""
    if isinstance(e, OSError) and (err := from_os_error(e)) is not None:
        print_error(err)
        return err.exit_code
    path = _write_traceback(e)
    where = f"the traceback written to {path}" if path else "the command you ran"
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__
    line = Text.assemble(("internal error:", "bold red"), f" {msg} (a bug: please report it with {where})")
    console.print(line, highlight=False, soft_wrap=True)
    return INTERNAL_ERROR_EXIT


def _write_traceback(e: BaseException) -> Path | None:
    """The traceback, private (it may quote paths and arguments), under the run directory, else
    the temporary directory."""
    import contextlib
    import os
    import sys
    import time
    import traceback

    from fastvllm.runtime import instances

    text = f"fastvllm {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(e))
    name = f"internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    places = [Path(tempfile.gettempdir())]
    with contextlib.suppress(Exception):  # a bad FASTVLLM_RUN_DIR, say: the temporary directory will do
        places.insert(0, instances.instances_dir() / "errors")
    for d in places:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:  # the report must not fail in its turn: try the next place
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return d / name
    return None
