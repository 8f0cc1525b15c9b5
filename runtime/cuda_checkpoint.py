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
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def prepare() -> bool:
    """Load and initialise the driver API now (best effort): the first call costs an import
    and cuInit, which a restore does in the background while it validates. False where the
    driver cannot be used (the CUDA restore then reports why)."""
    try:
        _driver()
    except EnvironmentNotReadyError:
        return False
    return True


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


def suspend(pids: list[int], lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """Lock, then checkpoint, every PID. On any failure, everything done is undone first.

    Returns, per PID (as a string: a manifest key), what the checkpoint moved and how long it
    took (see `HostCopy`): the device memory the process held, and the address ranges of its
    own memory that the driver's host copy of it now fills."""
    driver = _driver()
    locked: list[int] = []
    saved: list[int] = []
    device_mib = device_memory_mib()
    before = {pid: anon_vmas(pid) for pid in pids}
    rss_before = {pid: rss_bytes(pid) for pid in pids}
    times: dict[int, dict[str, float]] = {pid: {} for pid in pids}
    try:
        for pid in pids:
            args = driver.CUcheckpointLockArgs()
            args.timeoutMs = int(lock_timeout_s * 1000)
            t0 = time.perf_counter()
            try:
                _step(driver, "lock", pid, driver.cuCheckpointProcessLock, args)
            except CudaCheckpointError as e:
                if "TIMEOUT" in e.message or "NOT_READY" in e.message:  # 580 says NOT_READY
                    e.message = f"CUDA lock of PID {pid} timed out after {lock_timeout_s:.0f} s"
                    e.hint = "it kept launching GPU work; retry when idle or raise --lock-timeout"
                raise
            times[pid]["lock_s"] = time.perf_counter() - t0
            locked.append(pid)
        for pid in pids:
            t0 = time.perf_counter()
            _step(driver, "checkpoint", pid, driver.cuCheckpointProcessCheckpoint, None)
            times[pid]["checkpoint_s"] = time.perf_counter() - t0
            saved.append(pid)
    except BaseException:
        _undo(driver, saved, locked)
        raise
    out = {}
    for pid in pids:
        copy = host_copy(before[pid], anon_vmas(pid))
        out[str(pid)] = {
            "device_mib": device_mib.get(pid),
            "host_copy_bytes": copy.bytes,
            "host_copy_ranges": [list(r) for r in copy.ranges],
            # all of the process's memory, any kind: what grew beyond the host copy shows here
            "rss_growth_bytes": rss_bytes(pid) - rss_before[pid],
            **{k: round(v, 4) for k, v in times[pid].items()},
        }
    return out


def recorded_host_copy(gpu_state: object, pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Per checkpointed PID, the address ranges its host copy of device memory fills, as
    `suspend` recorded them in the manifest's `gpu_state` ([] for a process that has none; no
    key for one it recorded nothing of: a snapshot taken before they were recorded)."""
    recorded = gpu_state.get("processes", {}) if isinstance(gpu_state, dict) else {}
    out: dict[int, list[tuple[int, int]]] = {}
    for pid in pids:
        got = recorded.get(str(pid)) if isinstance(recorded, dict) else None
        if isinstance(got, dict) and "host_copy_ranges" in got:
            out[pid] = [(int(a), int(b)) for a, b in got["host_copy_ranges"]]
    return out


def release_worker_cache(server: Any) -> list[dict[str, Any]]:
    """Before the checkpoint of a sleeping vLLM server: each worker gives the driver back the
    free blocks of torch's caching allocator (weights.extension `fastvllm_gpu_release`), and
    says what it still holds, by kind, before and after. Best effort: a worker without the
    method (a tree restored from an older snapshot) is snapshotted as it is, and the error is
    kept in place of the figures."""
    from fastvllm.runtime import worker_rpc
    from fastvllm.runtime.errors import ServerError

    try:
        return [r.as_dict() for r in worker_rpc.gpu_release(server)]
    except ServerError as e:
        return [{"error": e.message}]


@dataclass(frozen=True)
class HostCopy:
    """Where a checkpointed process's device memory went: the address ranges of the private
    anonymous mappings the checkpoint created or grew, and by how many resident bytes. The
    CRIU dump writes them into the page images like any other memory; a restore reads them
    ahead whole (the CUDA restore reads them whole), and a report tells them from the CPU
    heap (`runtime.criu_images.split`)."""

    ranges: list[tuple[int, int]]
    bytes: int


# A mapping whose resident size grew by less than this during the checkpoint is the driver's
# bookkeeping or the process's own noise, not a copy of device memory.
HOST_COPY_MIN_GROWTH = 1 << 20


def anon_vmas(pid: int) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each private anonymous mapping of `pid` (unnamed, the
    heap, or named anonymous), from /proc/PID/smaps; [] if it cannot be read."""
    out: list[tuple[int, int, int]] = []
    try:
        with open(f"/proc/{pid}/smaps") as f:
            cur: list[int] | None = None
            for line in f:
                head = line.split(None, 5)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    cur = None
                    path = head[5].strip() if len(head) > 5 else ""
                    if head[1].endswith("p") and (not path or path.startswith(("[heap]", "[anon"))):
                        lo, hi = (int(x, 16) for x in head[0].split("-"))
                        cur = [lo, hi, 0]
                        out.append((lo, hi, 0))
                elif cur is not None and line.startswith("Rss:"):
                    out[-1] = (cur[0], cur[1], int(line.split()[1]) * 1024)
                    cur = None
    except (OSError, ValueError):
        return []
    return out


def rss_bytes(pid: int) -> int:
    """Resident bytes of `pid`, all mappings (/proc/PID/smaps_rollup); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def host_copy(
    before: list[tuple[int, int, int]],
    after: list[tuple[int, int, int]],
    min_growth: int = HOST_COPY_MIN_GROWTH,
) -> HostCopy:
    """The mappings of `after` whose resident bytes grew by at least `min_growth` over the
    mappings of `before` that started inside them (new mappings count whole)."""
    starts = sorted(before)
    ranges: list[tuple[int, int]] = []
    total = 0
    for lo, hi, rss in after:
        had = sum(r for s, _e, r in starts if lo <= s < hi)
        grew = rss - had
        if grew >= min_growth:
            ranges.append((lo, hi))
            total += grew
    return HostCopy(ranges, total)


def device_memory_mib() -> dict[int, int]:
    """Device memory in use per process (MiB), as nvidia-smi lists compute processes; {} where
    it cannot say (no nvidia-smi, or PIDs of another namespace)."""
    from fastvllm.runtime import devices

    text = devices.nvidia_smi("--query-compute-apps=pid,used_memory")
    if text is None:
        return {}
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


def _undo(driver: Any, saved: list[int], locked: list[int]) -> None:
    for pid in saved:
        driver.cuCheckpointProcessRestore(pid, None)
    for pid in locked:
        driver.cuCheckpointProcessUnlock(pid, None)


def can_remap() -> bool:
    """Whether the installed cuda-python can pass GPU pairs to the CUDA restore (the driver's
    own version is runtime.devices.driver_can_remap's to judge)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    return hasattr(driver, "CUcheckpointGpuPair") and hasattr(driver, "CUcheckpointRestoreArgs")


def restore_args(driver: Any, pairs: Sequence[tuple[str, str]]) -> Any:
    """The CUDA restore's arguments: None (same GPUs), or CUcheckpointRestoreArgs whose gpuPairs
    map every checkpointed GPU's UUID onto this host's target GPU (the driver requires every
    checkpointed GPU in the array, and the same chip on both sides)."""
    if not pairs:
        return None
    from fastvllm.runtime import devices

    out = []
    for old, new in pairs:
        pair = driver.CUcheckpointGpuPair()
        pair.oldUuid.bytes = devices.uuid_bytes(old)
        pair.newUuid.bytes = devices.uuid_bytes(new)
        out.append(pair)
    args = driver.CUcheckpointRestoreArgs()
    args.gpuPairs = out
    args.gpuPairsCount = len(out)
    return args


def resume(
    pids: list[int], *, parallel: bool = True, pairs: Sequence[tuple[str, str]] = ()
) -> dict[str, dict[str, float]]:
    """Restore, then unlock, every PID (after a CRIU restore, or to give a dumped-and-left-
    running tree its GPU back). Each must be checkpointed; the state is checked first.
    `pairs` (restore --gpus): (snapshot GPU UUID, target GPU UUID) for every GPU the tree used;
    each process's GPU state goes onto the target GPUs (not yet run on a GPU: docs/limitations.md).

    With `parallel`, each process is restored and unlocked on a thread of its own (the driver
    calls release the GIL): a tree's processes wait on the driver side by side instead of one
    after the other. Returns per PID the seconds its restore and unlock took. If any fails,
    the first failure is raised once every thread has finished."""
    driver = _driver()
    for pid in pids:
        st = state(pid)
        if st != "checkpointed":
            raise CudaCheckpointError(
                f"PID {pid} is {st}, not checkpointed, so its GPU state cannot be restored",
                hint="the snapshot was not taken by fastvllm's GPU path, or the process changed",
            )
    times: dict[str, dict[str, float]] = {str(pid): {} for pid in pids}
    args = restore_args(driver, pairs)

    def one(pid: int) -> None:
        t0 = time.perf_counter()
        _step(driver, "restore", pid, driver.cuCheckpointProcessRestore, args)
        t1 = time.perf_counter()
        _step(driver, "unlock", pid, driver.cuCheckpointProcessUnlock, None)
        times[str(pid)] = {"restore_s": round(t1 - t0, 4), "unlock_s": round(time.perf_counter() - t1, 4)}

    if not parallel or len(pids) < 2:
        for pid in pids:
            one(pid)
        return times
    with ThreadPoolExecutor(len(pids), thread_name_prefix="cuda-restore") as pool:
        futures = [pool.submit(one, pid) for pid in pids]
    errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        raise errors[0]
    return times


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
    from fastvllm.runtime import devices

    text = devices.nvidia_smi("--query-gpu=name,driver_version,memory.used")
    if not text or not text.strip():
        return None
    name, drv, used = (x.strip() for x in text.splitlines()[0].split(","))
    return GpuIdentity(name, drv, int(float(used)))
