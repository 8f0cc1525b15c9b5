"""Facts about this host that CRIU cares about: kernel, privileges, the io_uring sysctl,
and the page cache (dropped before benchmarks so cold numbers are cold)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path

from fastvllm.runtime import config
from fastvllm.runtime.errors import EnvironmentNotReadyError, PrivilegeError

IO_URING_SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")

# Capabilities CRIU uses to dump and restore a tree like vLLM's (ptrace, namespaces, sockets,
# credentials, files); bit numbers from linux/capability.h. CAP_SYS_RESOURCE is left out:
# the machines here lack it and CRIU dumps and restores vLLM without it.
CRIU_CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_CHECKPOINT_RESTORE": 40,
}


# Written by Dockerfile.criu: a hash of the image's software (CRIU, Python, pip freeze, fastvllm).
IMAGE_ID_FILE = Path("/etc/fastvllm/image-id")


def image_identity() -> str:
    """The container image's identity ("" outside a fastvllm image): a snapshot records it, and
    one taken on another image is not restored."""
    if config.IMAGE_ID.is_set():
        return config.IMAGE_ID.get()
    try:
        return IMAGE_ID_FILE.read_text().strip()
    except OSError:
        return ""


def fastvllm_home() -> Path:
    """Where fastvllm keeps what it builds or learns once per user (helpers, the tiny model,
    what it found out about CRIU): $FASTVLLM_HOME, else ~/.cache/fastvllm."""
    return config.HOME.get()


def file_identity(path: str | Path) -> list[int] | None:
    """(device, inode, size, mtime, ctime) of a file, None if it cannot be stat'ed. Any write,
    copy, rename over it or chmod changes the ctime, which no user can set: a file whose
    identity is unchanged holds the bytes it held when the identity was taken."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def meminfo(field: str) -> int | None:
    """One /proc/meminfo field in bytes (e.g. "MemTotal", "MemAvailable"); None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def kernel_release() -> str:
    return platform.release()


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_capabilities() -> list[str]:
    eff = effective_capabilities()
    missing = [name for name, bit in CRIU_CAPABILITIES.items() if not eff & (1 << bit)]
    if "CAP_CHECKPOINT_RESTORE" in missing and eff & (1 << CRIU_CAPABILITIES["CAP_SYS_ADMIN"]):
        # The kernel accepts CAP_SYS_ADMIN wherever it asks for CAP_CHECKPOINT_RESTORE (the
        # latter was split out of it in 5.9), and engines such as Docker 20.10 cannot grant it.
        missing.remove("CAP_CHECKPOINT_RESTORE")
    return missing


def require_criu_privileges() -> None:
    """CRIU needs root with its capabilities; fail before anything is started or written."""
    if os.geteuid() != 0:
        raise PrivilegeError(
            "fastvllm must run as root: CRIU needs ptrace and namespace privileges",
            hint="run it with sudo, or in a container started with --privileged",
        )
    missing = missing_capabilities()
    if missing:
        raise PrivilegeError(
            f"missing capabilit{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}",
            hint="CRIU needs them; run as full root or add them (docker run --cap-add ...)",
        )


def io_uring_disabled() -> int | None:
    try:
        return int(IO_URING_SYSCTL.read_text().strip())
    except (OSError, ValueError):
        return None  # kernels before 6.6 have no such switch


def ensure_io_uring_disabled() -> bool:
    """vLLM's API server (uvloop/libuv) opens an io_uring at start-up unless the kernel refuses,
    and CRIU cannot dump io_uring. Returns True when it changed the setting."""
    current = io_uring_disabled()
    if current is None or current == 2:
        return False
    try:
        IO_URING_SYSCTL.write_text("2\n")
    except OSError as e:
        raise EnvironmentNotReadyError(
            f"cannot set kernel.io_uring_disabled=2 ({e.strerror})",
            hint="run 'sysctl -w kernel.io_uring_disabled=2' as root: CRIU cannot dump io_uring",
        ) from e
    return True


def drop_page_cache() -> bool:
    """Drop clean page-cache pages (root only); returns whether it happened."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True
