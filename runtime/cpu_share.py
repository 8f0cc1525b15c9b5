"""A vLLM server's share of the CPU against the rest of the host, under Linux's autogroup.

Why: vLLM's engine core and workers busy-poll their shared-memory queues (`sched_yield` for a
second after each message). With autogroup on (`kernel.sched_autogroup_enabled=1`, the
default of most kernels), the scheduler shares CPU between sessions, and every server runs in
its own session (CRIU needs that). A client or router in another session then waits behind
the polls: on this project's 2-core host a client streaming 600 tokens six times from the
tiny model spent 5.9 s runnable but not running, and its streams stalled for 0.2-0.9 s at a
time (the tokens arriving in bursts afterwards). With the server's session at autogroup nice
5, 10 or 19 the same client waited 5-54 ms in all and no gap between chunks exceeded 100 ms,
and the streams were no slower, because the server still gets every cycle nobody else wants.
With autogroup off, per-thread fairness already keeps the polls from starving anyone
(measured too), and this setting has no effect.

The nice value is `FASTVLLM_SERVER_NICE` (0-19, default 10; 0 leaves the server as the
kernel placed it). It is applied to launched servers and again after every restore, since
CRIU's restored session starts a fresh autogroup at nice 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastvllm.runtime.errors import UsageError

ENV = "FASTVLLM_SERVER_NICE"
DEFAULT_NICE = 10


def server_nice() -> int:
    """The autogroup nice for servers, from the environment."""
    raw = os.environ.get(ENV, str(DEFAULT_NICE)).strip()
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise UsageError(
            f"{ENV}={raw!r} is not a nice value from 0 to 19",
            hint=f"unset it (default {DEFAULT_NICE}) or set 0 to leave servers at the kernel's default",
        )
    return nice


def yield_to_host(pid: int, nice: int | None = None) -> bool:
    """Set the autogroup nice of `pid`'s session (the whole server tree shares it). Returns
    False where the kernel has no autogroup (the file is missing) or the process is gone: the
    server then runs as the kernel placed it, which only costs latency, so it is not an error."""
    nice = server_nice() if nice is None else nice
    if nice == 0:
        return False
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        return False
    return True


def autogroup_nice(pid: int) -> int | None:
    """The autogroup nice of `pid`'s session (None without autogroup)."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()  # "/autogroup-123 nice 10"
    except OSError:
        return None
    return int(text.split()[-1])
