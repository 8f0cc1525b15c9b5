"""Where a snapshot's workers ran, and whether this host can take them back.

A snapshot records the device kind its workers used (CPU, or CUDA GPUs), and on GPUs the
model, the driver, how many GPUs the tree used (one per worker: tensor x pipeline parallel)
and their UUIDs. Device state only comes back on the same GPU model and driver, and each
worker needs a GPU of its own, so a restore on a host with other GPUs, another driver or
fewer GPUs is refused with one line naming the difference.

`--gpus` restores onto other GPUs of the host than the snapshotted ones (the driver's restore
takes old-UUID -> new-UUID pairs from driver 580 on, CUDA 13's "GPU migration"); this module
turns the option into those pairs. Everything here but `list_gpus` and `driver_gpus` is pure
logic.
"""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.runtime.errors import IdentityMismatchError, UsageError

# The driver's restore takes GPU pairs from this major version on (CUDA 13's cuda-checkpoint
# "GPU migration"; CUcheckpointRestoreArgs.gpuPairs).
REMAP_MIN_DRIVER = 580


class DeviceKind(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class Gpu:
    """One GPU of a host, as nvidia-smi lists it."""

    index: int
    uuid: str
    model: str
    driver: str


@dataclass
class Devices:
    """Where a server's workers ran. On CPU only `kind` says anything."""

    kind: DeviceKind
    model: str = ""
    driver: str = ""
    count: int = 0  # GPUs the tree used (one per worker)
    uuids: list[str] = field(default_factory=list)  # those GPUs, in the workers' device order
    host_count: int = 0  # GPUs the host had

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d if self.kind is DeviceKind.CUDA else {"kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Devices | None:
        """None for a snapshot that recorded nothing (taken before devices were recorded)."""
        if not d:
            return None
        fields = {k: v for k, v in d.items() if k != "kind"}
        return cls(DeviceKind(d["kind"]), **fields)

    def describe(self) -> str:
        if self.kind is DeviceKind.CPU:
            return "CPU"
        return f"{self.count} x {self.model} (driver {self.driver})"


def nvidia_smi(query: str, *, timeout: float = 30.0) -> str | None:
    """nvidia-smi's CSV answer (no header, no units) to `query` (e.g.
    `--query-gpu=index,uuid`); None without nvidia-smi, or where it fails or hangs. The one
    place fastvllm asks the driver's tool anything."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        r = subprocess.run(
            [smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def list_gpus() -> list[Gpu]:
    """This host's GPUs, from nvidia-smi; [] without one."""
    out = nvidia_smi("--query-gpu=index,uuid,name,driver_version")
    return parse_gpu_list(out) if out is not None else []


DRIVER_PROC = Path("/proc/driver/nvidia")
DRIVER_VERSION = Path("/sys/module/nvidia/version")
_UUID = re.compile(r"^GPU-[0-9a-fA-F-]+$")


def driver_gpus(proc: Path = DRIVER_PROC, version: Path = DRIVER_VERSION) -> list[Gpu] | None:
    """This host's GPUs from the driver's own files (`information` per GPU, in PCI bus order:
    nvidia-smi's order), without starting nvidia-smi (tens of milliseconds of a restore's
    checks in a fresh process). None where they cannot say all of it: no such files (a
    container may lack them), a field missing, or a UUID the driver shows unknown ("GPU-????",
    before anything opened the GPU). The names come from the same driver as nvidia-smi's; a
    check that finds them different asks nvidia-smi before it refuses (restore.pipeline)."""
    try:
        drv = version.read_text().strip()
        dirs = sorted(d for d in (proc / "gpus").iterdir() if d.is_dir())
        out = []
        for i, d in enumerate(dirs):
            lines = (d / "information").read_text().splitlines()
            info = {k.strip(): v.strip() for k, sep, v in (x.partition(":") for x in lines) if sep}
            model, uuid = info.get("Model", ""), info.get("GPU UUID", "")
            if not (model and _UUID.match(uuid)):
                return None
            out.append(Gpu(i, uuid, model, drv))
    except OSError:
        return None
    return out if out and re.match(r"^\d+\.\d+", drv) else None


def parse_gpu_list(text: str) -> list[Gpu]:
    """nvidia-smi's `index, uuid, name, driver_version` lines."""
    out = []
    for line in text.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            out.append(Gpu(int(parts[0]), parts[1], parts[2], parts[3]))
    return out


def visible(gpus: Sequence[Gpu], cuda_visible: str | None) -> list[Gpu]:
    """The GPUs a process sees, in its device order: CUDA_VISIBLE_DEVICES's entries (indices or
    UUIDs, or their prefixes) in its order, or every GPU when it is unset."""
    if cuda_visible is None:
        return list(gpus)
    out = []
    for item in (x.strip() for x in cuda_visible.split(",")):
        hit = next((g for g in gpus if str(g.index) == item or (item and g.uuid.startswith(item))), None)
        if hit is None:
            break  # CUDA stops at the first entry it does not know
        out.append(hit)
    return out


def of_tree(gpus: Sequence[Gpu], world_size: int, env: Mapping[str, str], on_gpu: bool) -> Devices:
    """What a snapshot records: CPU, or the first `world_size` GPUs the tree saw (vLLM gives
    worker i the i-th visible device)."""
    if not on_gpu or not gpus:
        return Devices(DeviceKind.CPU)
    used = visible(gpus, env.get("CUDA_VISIBLE_DEVICES"))[: max(1, world_size)]
    first = used[0] if used else gpus[0]
    return Devices(DeviceKind.CUDA, first.model, first.driver, len(used), [g.uuid for g in used], len(gpus))


def differences(snap: Devices, here: Sequence[Gpu]) -> list[str]:
    """Why this host cannot take the snapshot's workers back ([] when it can)."""
    if snap.kind is DeviceKind.CPU:
        return []
    if not here:
        return [f"the snapshot ran on {snap.describe()}, this host has no GPU"]
    out = []
    if here[0].model != snap.model:
        out.append(f"GPU model: snapshot {snap.model!r}, here {here[0].model!r}")
    if here[0].driver != snap.driver:
        out.append(f"GPU driver: snapshot {snap.driver}, here {here[0].driver}")
    if len(here) < snap.count:
        out.append(f"GPUs: the snapshot used {snap.count}, this host has {len(here)}")
    return out


def check(snap: Devices | None, here: Sequence[Gpu]) -> None:
    """Refuse, in one line naming each difference, a restore this host cannot do."""
    if snap is None:
        return
    diffs = differences(snap, here)
    if diffs:
        raise IdentityMismatchError(
            "snapshot was taken on other devices: " + "; ".join(diffs),
            hint="restore on a host with the same GPU model and driver and enough GPUs, "
            "or take a new snapshot here",
        )


def parse_gpus(spec: str, here: Sequence[Gpu]) -> list[Gpu]:
    """`--gpus`: GPUs of this host by index or UUID, comma-separated, one per GPU the
    snapshot used, in the workers' order."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise UsageError(f"--gpus {spec!r} names no GPU", hint="e.g. --gpus 1, or --gpus 2,3 for two workers")
    out: list[Gpu] = []
    for item in items:
        hit = next((g for g in here if str(g.index) == item or g.uuid == item), None)
        if hit is None:
            have = ", ".join(str(g.index) for g in here) or "none"
            raise UsageError(
                f"--gpus: this host has no GPU {item!r} (it has {have})", hint="see nvidia-smi -L"
            )
        if hit in out:
            raise UsageError(f"--gpus names GPU {item} twice", hint="give each worker a GPU of its own")
        out.append(hit)
    return out


def gpu_pairs(snap: Devices | None, spec: str, here: Sequence[Gpu]) -> list[tuple[str, str]]:
    """(snapshot UUID, target UUID) per GPU the snapshot used, for the driver's restore; or a
    one-line refusal: a CPU host or snapshot, a driver that cannot remap, a count or model
    that does not match."""
    if not here:
        raise UsageError(
            "--gpus: this host has no GPU", hint="drop --gpus (it moves GPU snapshots between GPUs)"
        )
    if snap is None:
        raise UsageError(
            "--gpus: the snapshot does not record which GPUs it used (taken by an older fastvllm)",
            hint="drop --gpus, or take a new snapshot",
        )
    if snap.kind is DeviceKind.CPU:
        raise UsageError("--gpus: the snapshot ran on the CPU, it holds no GPU state", hint="drop --gpus")
    target = parse_gpus(spec, here)
    if len(target) != len(snap.uuids):
        raise UsageError(
            f"--gpus names {len(target)} GPU(s), the snapshot used {len(snap.uuids)}",
            hint=f"name {len(snap.uuids)}, one per worker, e.g. --gpus "
            + ",".join(str(i) for i in range(len(snap.uuids))),
        )
    for g in target:
        if g.model != snap.model:
            raise IdentityMismatchError(
                f"--gpus: GPU {g.index} is a {g.model}, the snapshot ran on {snap.model}",
                hint="pick GPUs of the snapshot's model (the driver restores onto the same chip only)",
            )
    if not driver_can_remap(target[0].driver):
        raise UsageError(
            f"--gpus: driver {target[0].driver} cannot restore onto other GPUs "
            f"(needs {REMAP_MIN_DRIVER} or later)",
            hint="upgrade the driver, or restore without --gpus onto the snapshot's own GPUs",
        )
    return list(zip(snap.uuids, (g.uuid for g in target), strict=True))


def driver_can_remap(driver: str) -> bool:
    """Whether this driver version's restore takes GPU pairs."""
    try:
        return int(driver.split(".")[0]) >= REMAP_MIN_DRIVER
    except ValueError:
        return False


def device_map(pairs: Sequence[tuple[str, str]]) -> str:
    """The pairs as cuda-checkpoint's `--device-map` spells them (for logs and the manual
    fallback): oldUuid=newUuid,..."""
    return ",".join(f"{a}={b}" for a, b in pairs)


def uuid_bytes(uuid: str) -> bytes:
    """The 16 bytes of a GPU UUID as nvidia-smi prints it (GPU-xxxxxxxx-xxxx-...), as the
    driver's CUuuid holds them."""
    hexdigits = uuid.removeprefix("GPU-").replace("-", "")
    if len(hexdigits) != 32:
        raise UsageError(f"{uuid!r} is not a GPU UUID", hint="see nvidia-smi -L")
    try:
        return bytes.fromhex(hexdigits)
    except ValueError:
        raise UsageError(f"{uuid!r} is not a GPU UUID", hint="see nvidia-smi -L") from None
