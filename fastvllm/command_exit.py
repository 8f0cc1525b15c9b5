"""How a fastvllm command ends, for the CLI and for the launcher's restore without typer alike:
SIGTERM, SIGHUP and SIGINT unwind like Ctrl-C (the pipelines stop what they started and remove
partial output) and the exit status is then 128 + the signal's number; a closed output pipe
exits 1; a bug is one line for the user and its traceback in a file (ui.internal_error)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(command: Callable[[], None]) -> None:
    """Run `command` with the signals installed and its ending mapped as above."""
    from fastvllm.runtime import signals

    signals.install()
    try:
        command()
    except SystemExit as e:
        # A signal outside a command's guard (click makes that "Aborted!", exit 1) still exits
        # 128 + its number; a command that took the signal as its cue to finish (prefetch lock)
        # exits as it chose.
        if (signum := signals.received()) is not None and e.code not in (0, None):
            sys.exit(128 + signum)
        raise
    except BrokenPipeError:
        sys.exit(1)
    except Exception as e:  # a bug: one line for the user, the traceback in a file
        from fastvllm import ui

        sys.exit(ui.internal_error(e))
