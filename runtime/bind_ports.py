"""Where a vLLM server's own sockets bind: below the kernel's ephemeral port range, so that a
restore can bind them again on a busy host (`native/bind_ports.c` says why and how).

Each server gets a block of ports derived from its API port (no two servers of a host share
one), and its processes draw from the block in sequence through a small state file.
"""

from __future__ import annotations

from pathlib import Path

from fastvllm.runtime import config, instances, native_build
from fastvllm.runtime.errors import EnvironmentNotReadyError

LOW = 20000  # above Ray's default worker ports (10002-19999)
BLOCK = 256  # a vLLM CPU server binds ~15 such ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def helper() -> Path | None:
    """The helper library, built if this version is not yet (None without a C compiler). A
    restore needs it too: the restored tree maps it from the path it had when dumped."""
    try:
        return native_build.build("bind_ports")
    except EnvironmentNotReadyError:
        return None


def env_for(api_port: int) -> dict[str, str]:
    """The environment that makes a server's port-0 binds land in its block; {} where the host's
    ephemeral range leaves no room below it, or no C compiler was there to build the helper
    (the server then binds as vLLM asks: restores are only more likely to meet a taken port)."""
    high = min(_ephemeral_low() - 1, 65535)
    blocks = (high - LOW + 1) // BLOCK
    if blocks < 1:
        return {}
    lib = helper()
    if lib is None:
        return {}
    first = LOW + (api_port % blocks) * BLOCK
    state = instances.instances_dir() / f"bind-ports-{api_port}"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.unlink(missing_ok=True)  # a new server starts its sequence at its block
    return {
        "LD_PRELOAD": str(lib),
        config.BIND_PORTS.name: f"{LOW}-{high}",
        config.BIND_FIRST.name: str(first),
        config.BIND_STATE.name: str(state),
    }
