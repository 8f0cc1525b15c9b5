"""The CUDA driver's process checkpoint API, for a whole process tree: CRIU cannot dump GPU
state, so before the dump every process holding a CUDA context is locked and checkpointed
(its device memory moves into its own host memory, and its /dev/nvidia* descriptors close),
and after the restore it is restored and unlocked.

Called in-process through `cuda.bindings.driver` (cuda-python), not through the
`cuda-checkpoint` binary: one Python helper per call cost about a second per snapshot on the
H100 machine (DESIGN.md). The API acts on other processes by PID; it needs cuInit here but
no context of our own. All-or-nothing: if any step fails for any process, what was done is
undone (restored, unlocked), so the tree keeps serving and the error says which PID and step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fastvllm.runtime.errors import CudaCheckpointError, EnvironmentNotReadyError

DEFAULT_LOCK_TIMEOUT_S = 30.0
_STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}  # CUprocessState


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise EnvironmentNotReadyError(
            "cuda-python (cuda.bindings) is not installed, so GPU state cannot be checkpointed",
            hint="pip install cuda-bindings (it comes with torch's CUDA builds)",
        ) from e
    (err,) = driver.cuInit(0)
    if int(err) != 0:
        raise EnvironmentNotReadyError(
            f"the CUDA driver did not initialise ({_name(driver, err)})",
            hint="check nvidia-smi; GPU snapshots need driver >= 570",
        )
    return driver


def _name(driver: Any, err: Any) -> str:
    try:
        got = driver.cuGetErrorName(err)
        return got[1].decode() if int(got[0]) == 0 else str(err)
    except Exception:  # a name is a nicety; the code still says what failed
        return str(err)


def holds_gpu(pid: int) -> bool:
    """Does `pid` have a /dev/nvidia* device open (a CUDA context, or the driver's control
    node)? vLLM's API server holds one too, and must be checkpointed with the engine."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def gpu_pids(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if holds_gpu(p)]


def state(pid: int) -> str:
    """'running', 'locked', 'checkpointed' or 'failed', as the driver sees `pid`."""
    driver = _driver()
    err, st = driver.cuCheckpointProcessGetState(pid)
    if int(err) != 0:
        raise CudaCheckpointError(
            f"cannot read the CUDA state of PID {pid} ({_name(driver, err)})",
            hint="is it a CUDA process, and is the driver >= 570?",
        )
    return _STATES.get(int(st), str(st))


def _step(driver: Any, what: str, pid: int, fn: Any, args: Any) -> None:
    (err,) = fn(pid, args)
    if int(err) != 0:
        raise CudaCheckpointError(
            f"CUDA {what} of PID {pid} failed ({_name(driver, err)})",
            hint="the tree was given back its GPU state and keeps running; see the server log",
        )


def suspend(pids: list[int], lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
    """Lock, then checkpoint, every PID. On any failure, everything done is undone first."""
    driver = _driver()
    locked: list[int] = []
    saved: list[int] = []
    try:
        for pid in pids:
            args = driver.CUcheckpointLockArgs()
            args.timeoutMs = int(lock_timeout_s * 1000)
            try:
                _step(driver, "lock", pid, driver.cuCheckpointProcessLock, args)
            except CudaCheckpointError as e:
                if "TIMEOUT" in e.message or "NOT_READY" in e.message:  # 580 says NOT_READY
                    e.message = f"CUDA lock of PID {pid} timed out after {lock_timeout_s:.0f} s"
                    e.hint = "it kept launching GPU work; retry when idle or raise --lock-timeout"
                raise
            locked.append(pid)
        for pid in pids:
            _step(driver, "checkpoint", pid, driver.cuCheckpointProcessCheckpoint, None)
            saved.append(pid)
    except BaseException:
        _undo(driver, saved, locked)
        raise


def _undo(driver: Any, saved: list[int], locked: list[int]) -> None:
    for pid in saved:
        driver.cuCheckpointProcessRestore(pid, None)
    for pid in locked:
        driver.cuCheckpointProcessUnlock(pid, None)


def resume(pids: list[int]) -> None:
    """Restore, then unlock, every PID (after a CRIU restore, or to give a dumped-and-left-
    running tree its GPU back). Each must be checkpointed; the state is checked first."""
    driver = _driver()
    for pid in pids:
        st = state(pid)
        if st != "checkpointed":
            raise CudaCheckpointError(
                f"PID {pid} is {st}, not checkpointed, so its GPU state cannot be restored",
                hint="the snapshot was not taken by fastvllm's GPU path, or the process changed",
            )
    for pid in pids:
        _step(driver, "restore", pid, driver.cuCheckpointProcessRestore, None)
    for pid in pids:
        _step(driver, "unlock", pid, driver.cuCheckpointProcessUnlock, None)


def give_back(pids: list[int]) -> list[int]:
    """Best effort after a failed snapshot: restore and unlock every PID of `pids` that is
    still alive, whatever step it reached, so none stays locked. Returns the PIDs given back;
    a PID that died meanwhile is skipped (its GPU state went with it)."""
    driver = _driver()
    back = []
    for pid in pids:
        try:
            st = state(pid)
        except CudaCheckpointError:
            continue  # gone, or never a CUDA process
        if st == "checkpointed":
            driver.cuCheckpointProcessRestore(pid, None)
            st = state(pid)
        if st == "locked":
            driver.cuCheckpointProcessUnlock(pid, None)
        back.append(pid)
    return back


@dataclass(frozen=True)
class GpuIdentity:
    """What a restore needs to match: device state only comes back on the same GPU model
    and driver."""

    model: str
    driver: str
    memory_used_mib: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: GpuIdentity) -> list[str]:
        return [
            f"GPU {k}: snapshot {getattr(self, k)!r}, here {getattr(other, k)!r}"
            for k in ("model", "driver")
            if getattr(self, k) != getattr(other, k)
        ]


def gpu_identity() -> GpuIdentity | None:
    """The first GPU's model, the driver version and the memory in use, from nvidia-smi; None
    without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    r = subprocess.run(
        [smi, "--query-gpu=name,driver_version,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0 or not r.stdout.strip():
        return None
    name, drv, used = (x.strip() for x in r.stdout.splitlines()[0].split(","))
    return GpuIdentity(name, drv, int(float(used)))
