"""One exception hierarchy for all of fastvllm.

Every error carries a message a user can act on (what went wrong and how to fix it) and an
exit code, so the CLI maps them to distinct nonzero exit statuses without knowing each type.
"""

from __future__ import annotations

import errno


class FastVLLMError(Exception):
    """Base of every error fastvllm raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail  # e.g. the tail of a log, shown below the one-line message

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FastVLLMError):
    """The user's input is wrong: a path, a flag, a port."""

    exit_code = 2


class ModelError(UsageError):
    """The model path is missing or is not a model directory vLLM can serve."""


class SnapshotExistsError(UsageError):
    """The output directory already exists; a snapshot is never written over."""


class PortInUseError(UsageError):
    """The port the server needs is taken."""


class NotASnapshotError(UsageError):
    """The directory is missing or holds no valid manifest."""


class PermissionDeniedError(UsageError):
    """A path the user named cannot be read or listed by this user."""


class IdentityMismatchError(FastVLLMError):
    """The snapshot was taken on another CRIU, kernel, vLLM, Python or model."""

    exit_code = 3


class IntegrityError(FastVLLMError):
    """A file of the snapshot is missing, truncated or altered."""

    exit_code = 4


class PrivilegeError(FastVLLMError):
    """Not root, or a capability CRIU needs is missing."""

    exit_code = 5


class CriuError(FastVLLMError):
    """CRIU failed; `detail` holds the relevant tail of its log."""

    exit_code = 6


class ServerError(FastVLLMError):
    """The vLLM server failed to start, became unhealthy, or answered wrongly."""

    exit_code = 7


class CanaryMismatchError(ServerError):
    """The restored server's greedy tokens differ from the ones recorded at snapshot time."""

    exit_code = 8


class EnvironmentNotReadyError(FastVLLMError):
    """Something the machine needs is missing (CRIU, vLLM, a sysctl)."""

    exit_code = 9


class CudaCheckpointError(FastVLLMError):
    """The CUDA driver could not lock, checkpoint, restore or unlock a process's GPU state."""

    exit_code = 10


class TreeChangedError(FastVLLMError):
    """A process of the tree being snapshotted exited mid-snapshot (e.g. between the CUDA
    checkpoint and the CRIU dump): the image would miss it, so nothing is written."""

    exit_code = 11


class PinnedMemoryError(FastVLLMError):
    """The CUDA driver would not make, share or map the pinned host memory that holds a
    snapshot's weights between restores (`fastvllm agent --hold`)."""

    exit_code = 12


class SnapshotBusyError(UsageError):
    """Another fastvllm process is restoring the same snapshot on this host right now."""


# errno -> (what went wrong, the fix), for OSErrors on paths a user named (--out, a snapshot).
_PATH_ERRORS = {
    errno.EACCES: ("permission denied", "run as a user who may, or choose another path"),
    errno.EPERM: ("operation not permitted", "run as a user who may, or choose another path"),
    errno.EROFS: ("the file system is read-only", "choose a path on a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free some space there, or choose another path"),
    errno.EDQUOT: ("disk quota exceeded", "free some space there, or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("it is a directory", "name a file"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EEXIST: ("it exists already (a file where a directory was needed?)", "choose another path"),
    errno.ELOOP: ("too many symbolic links", "check the path"),
}


def from_os_error(e: OSError, doing: str | None = None) -> FastVLLMError | None:
    """The one-line error for an OSError on a user's path (None for other OSErrors: those are
    not the user's to fix). `doing` says what was being done, e.g. "create the snapshot
    directory /srv/s"; else the error's own file name is named."""
    known = _PATH_ERRORS.get(e.errno or 0)
    if known is None:
        return None
    what, fix = known
    name = str(e.filename) if e.filename is not None else ""
    if doing is None and (not name or name.startswith(("/proc/", "/sys/"))):
        return None  # no path of the user's to name: nothing a user could act on
    subject = doing or f"use {name}"
    msg = f"cannot {subject}: {what}"
    if doing and e.filename and str(e.filename) not in doing:
        msg += f" ({e.filename})"
    cls = PermissionDeniedError if e.errno in (errno.EACCES, errno.EPERM) else UsageError
    err = cls(msg, hint=fix)
    err.__cause__ = e
    return err
