"""`fastvllm restore DIR` on this host: the command's work, shared by the typer CLI
(fastvllm/cli.py's `restore`) and the launcher's path for a restore whose options it parsed
(fastvllm/launcher.py), which runs it without importing typer (~35 ms) and, for `--json`
into a pipe, without rich (~25 ms): the user's wait starts with the command, and a restore
that is not drawn has nothing to draw with. rich is imported where something is drawn: the
live timeline, the table, an error's line, JSON on a terminal (colored).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastvllm.runtime.errors import FastVLLMError, UsageError
from fastvllm.runtime.modes import CriuRestoreMode, SnapshotKind
from fastvllm.runtime.timeline import Timeline

if TYPE_CHECKING:
    from fastvllm.restore.pipeline import RestoreResult
    from fastvllm.restore.process import ProcessRestoreResult

T = TypeVar("T")


def run(
    snapshot_dir: Path,
    *,
    verify: bool = True,
    reverify: bool = False,
    keep_affinity: bool = False,
    prefetch: bool = True,
    prefetch_threads: int = 0,
    timeout: float = 120.0,
    criu_restore: CriuRestoreMode = CriuRestoreMode.AUTO,
    gpus: str | None = None,
    as_json: bool = False,
) -> None:
    """Restore, print the result (a table and a line, or `--json`'s document). A failure
    prints its one line and raises typer's Exit with its code (ui.guard)."""
    # The restore stack, imported before the timeline's origin: the phases (and the time to the
    # first completion printed below) time the restore, as the API's callers see it.
    import fastvllm.restore.pipeline  # noqa: F401
    from fastvllm import api, launcher

    tl = Timeline()
    live = None
    if not as_json:
        from fastvllm import ui

        live = ui.LiveTimeline(tl)

    def work() -> RestoreResult | ProcessRestoreResult:
        with live.running() if live is not None else contextlib.nullcontext():
            if api.snapshot_kind(snapshot_dir) is SnapshotKind.PROCESS:  # no server, no canary
                if gpus is not None:
                    raise UsageError(
                        "--gpus applies to vLLM snapshots; this is a plain process snapshot",
                        hint="restore it onto its own GPUs (drop --gpus)",
                    )
                return api.restore_process(
                    snapshot_dir, verify=verify, timeline=tl, criu_restore=criu_restore, reverify=reverify
                )
            return api.restore(
                snapshot_dir,
                verify=verify,
                health_timeout=timeout,
                prefetch=prefetch,
                prefetch_threads=prefetch_threads,
                timeline=tl,
                on_bytes=live.on_bytes if live is not None else None,
                criu_restore=criu_restore,
                reverify=reverify,
                keep_affinity=keep_affinity,
                gpus=gpus,
            )

    res = guard(work)
    launcher.record_startup_files()  # what this restore imported: the next launcher reads it ahead
    if as_json:
        emit_json(res.as_dict())
        return
    _print_result(res, tl)


def _print_result(res: RestoreResult | ProcessRestoreResult, tl: Timeline) -> None:
    from fastvllm import ui
    from fastvllm.restore.process import ProcessRestoreResult

    ui.console.print(ui.phase_table(tl, f"restore {res.snapshot} (CRIU {res.criu_restore} mode)"))
    if res.criu_restore == CriuRestoreMode.MMAP:
        ui.console.print(
            "[dim]the restored tree maps this snapshot's page images: keep the snapshot in place "
            "and unchanged while it runs ('fastvllm inspect' shows who maps it)[/]"
        )
    if isinstance(res, ProcessRestoreResult):
        ui.console.print(f"restored process tree, root pid [bold]{res.pid}[/] in {tl.elapsed():.2f} s")
        return
    ui.console.print(
        f"serving at [bold]{ui.address(res.server)}[/] (pid {res.server.pid}); first completion after "
        f"[bold green]{res.time_to_first_completion_s:.2f} s[/], canary identical; stop with "
        f"'fastvllm stop {res.server.pid}'"
    )


def guard(fn: Callable[[], T]) -> T:
    """ui.guard (a FastVLLMError is its one line and exit code, Ctrl-C exit 130), with rich
    imported only when there is an error to print."""
    try:
        return fn()
    except (FastVLLMError, OSError, KeyboardInterrupt) as e:
        from fastvllm import ui

        err = e

        def again() -> T:
            raise err

        return ui.guard(again)


def emit_json(doc: Any) -> None:
    """The CLI's JSON document on stdout: as rich's print_json writes it (indent 2, no ASCII
    escapes), colored by rich on a terminal, written plainly into a pipe."""
    text = json.dumps(doc)
    if sys.stdout.isatty():
        from fastvllm import ui

        ui.out.print_json(text)
        return
    sys.stdout.write(json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# resident_client.parse_restore's keys -> run()'s keywords (the rest are the same names)
_KEYWORDS = {"dir": "snapshot_dir", "json": "as_json"}
_OPTIONS = frozenset(
    ("snapshot_dir", "verify", "reverify", "keep_affinity", "prefetch", "prefetch_threads", "timeout",
     "criu_restore", "as_json")
)  # fmt: skip


def keywords(opts: dict[str, Any]) -> dict[str, Any] | None:
    """run()'s keywords for the options the launcher parsed (resident_client.parse_restore:
    plain options only, each checked as the command checks it); None for an option run() does
    not know (a parser newer than this module: typer's CLI takes the command)."""
    got = {_KEYWORDS.get(k, k): v for k, v in opts.items()}
    if not got.keys() <= _OPTIONS or "snapshot_dir" not in got:
        return None
    got["snapshot_dir"] = Path(got["snapshot_dir"])
    if "criu_restore" in got:
        got["criu_restore"] = CriuRestoreMode(got["criu_restore"])
    return got


def main(opts: dict[str, Any]) -> None:
    """The launcher's `fastvllm restore` with options it parsed: cli.main's handling (signals
    unwind as Ctrl-C and exit 128 + the signal, a bug is one line and a traceback file)
    around run(), without typer. Exits; returns only for options run() does not know."""
    from fastvllm import command_exit

    kwargs = keywords(opts)
    if kwargs is None:
        return

    def restore() -> None:
        with exits():
            run(**kwargs)

    command_exit.run(restore)
    sys.exit(0)


@contextlib.contextmanager
def exits() -> Iterator[None]:
    """typer's Exit (what ui.guard raises) as the process's exit status, outside typer."""
    try:
        yield
    except Exception as e:
        import typer  # only on the way out of a failed command

        if isinstance(e, typer.Exit):
            sys.exit(e.exit_code)
        raise
