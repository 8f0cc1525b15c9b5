"""One exception hierarchy for all of fastvllm.

Every error carries a message a user can act on (what went wrong and how to fix it) and an
exit code, so the CLI maps them to distinct nonzero exit statuses without knowing each type.
"""

from __future__ import annotations


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
