"""The worker-extension RPC, typed on both sides: its methods, their arguments and replies.

fastvllm reaches the `weights.extension.WorkerExtension` methods inside a vLLM server through
`POST /collective_rpc` (runtime.vllm_server.rpc), which calls the method on every worker and
answers a JSON list, one reply per worker. The worker builds each reply as one of the dataclasses
here and sends `as_dict()`; the caller gets them back with `from_dict`, which ignores keys it does
not know and fills keys an older worker does not send (a tree restored from an older snapshot
answers with the extension code it was snapshotted with). Arguments cross as strings, as
they always have, for the same reason; `ReloadArgs` encodes and decodes them.

This module is in runtime/ (not beside the extension in weights/) because the pipelines and the
journal call the workers, and runtime/ imports nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from fastvllm.runtime import config
from fastvllm.runtime.errors import ServerError

if TYPE_CHECKING:  # the workers import this module too: they need no HTTP client
    from fastvllm.runtime import vllm_server


class Method(StrEnum):
    """The methods the workers answer: fastvllm's extension, and vLLM's own `reload_weights`."""

    DUMP_WEIGHTS = "fastvllm_dump_weights"
    WEIGHT_BYTES = "fastvllm_weight_bytes"
    RELEASE = "fastvllm_release"
    RELOAD = "fastvllm_reload"
    GPU_MEMORY = "fastvllm_gpu_memory"
    GPU_RELEASE = "fastvllm_gpu_release"
    CHECK_WEIGHTS = "fastvllm_check_weights"
    VLLM_RELOAD_WEIGHTS = "reload_weights"


@dataclass(frozen=True)
class _Reply:
    """A worker's answer: a dataclass that crosses as a JSON object. Keys this side does not
    know (a newer worker's) are kept in `extra` and sent on as they came."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: object) -> Self:
        if not isinstance(raw, dict):
            raise ServerError(f"a worker answered {raw!r}, not a JSON object", hint="see the server's log")
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known}, extra=extra)
        except TypeError as e:  # a key this side needs is missing
            raise ServerError(f"worker reply {raw!r} is incomplete ({e})", hint="see the server's log") from e


R = TypeVar("R", bound=_Reply)


@dataclass(frozen=True)
class DumpedWeights(_Reply):
    """`fastvllm_dump_weights`: the file this rank wrote (weights.fileformat)."""

    path: str
    bytes: int
    tensors: int
    data_xxh3_128: str
    seconds: float
    rank: int = 0
    world_size: int = 1
    tensor_parallel_size: int = 1
    pid: int | None = None  # None: a worker from before ranks were recorded


@dataclass(frozen=True)
class WeightBytes(_Reply):
    """`fastvllm_weight_bytes`: what there is to release."""

    weight_bytes: int = 0
    kv_bytes: int = 0
    opaque_weight_bytes: int = 0  # packed into oneDNN handlers: cannot be released


@dataclass(frozen=True)
class Released(_Reply):
    """`fastvllm_release` (CPU): bytes handed back to the kernel with MADV_DONTNEED."""

    weight_bytes_released: int = 0
    kv_bytes_released: int = 0
    weight_bytes_kept_opaque: int = 0


@dataclass(frozen=True)
class Reloaded(_Reply):
    """`fastvllm_reload`: this rank's weights refilled from its file."""

    bytes: int
    seconds: float
    gbps: float
    direct: bool | None = None
    rank: int = 0
    pool: str | None = None  # "kept" (pinned before the snapshot), "fresh: why", or "held"
    pin_s: float | None = None
    # where the load waited: the copies for reads (reads behind), the readers for a free
    # pinned buffer (copies behind); GPU targets only
    wait_reads_s: float | None = None
    wait_buffers_s: float | None = None
    # its fixed costs: start to the first copy issued, the last copy issued to all done
    first_copy_s: float | None = None
    drain_s: float | None = None
    # weights held in pinned memory by the agent (weights/held.py): "" not asked, "used", or
    # "not used: why" (the file was read instead); a held load's mapping of the agent's memory
    # for the device (the first piece's before any copy, the rest under the copies) and unmapping
    held: str = ""
    map_s: float | None = None
    unmap_s: float | None = None


@dataclass(frozen=True)
class GpuReleased(_Reply):
    """`fastvllm_gpu_release`: the worker's device memory by kind, before and after."""

    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    pinned_pool: dict[str, Any] | None = None  # the loader's staging buffers, kept for the image
    graph_memory: dict[str, Any] | None = None  # the CUDA graphs' pool: released or kept, and why


@dataclass(frozen=True)
class WeightCheck(_Reply):
    """`fastvllm_check_weights`: this rank's tensors that differ from its weight file."""

    rank: int
    pid: int
    differs: list[str] = field(default_factory=list)  # the first few names
    count: int = 0


@dataclass(frozen=True)
class ReloadArgs:
    """`fastvllm_reload`'s arguments; they cross as strings (`as_kwargs`, `from_kwargs`)."""

    path: str
    verify: bool = False  # check each tensor's checksum while loading
    # The loader's tunables (0: its measured defaults), for sweeps in a restored server.
    threads: int = 0
    chunk_mib: int = 0
    buffers: int = 0
    # How the pipeline's threads share the cores, and one half of it alone for measurements
    # (weights.loader.CopyTuning, which the worker builds from these)
    copy_wait: str = config.CopyWait.SPIN.value
    reader_nice: int = 0
    only: str = ""
    reads: str = config.LoaderReads.PREAD.value
    # the agent's socket, where it holds this file's weights in pinned memory (weights/held.py)
    held: str = ""

    def as_kwargs(self) -> dict[str, str]:
        """Only what differs from the defaults: a worker restored from an older snapshot knows
        `path` and `verify` alone, and the tunables its own version had."""
        out = {"path": self.path}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "path" and value != f.default:
                out[f.name] = "1" if value is True else str(value)
        return out

    @classmethod
    def from_kwargs(
        cls,
        path: str,
        threads: str = "0",
        verify: str = "0",
        chunk_mib: str = "0",
        buffers: str = "0",
        copy_wait: str = config.CopyWait.SPIN.value,
        reader_nice: str = "0",
        only: str = "",
        reads: str = config.LoaderReads.PREAD.value,
        held: str = "",
    ) -> ReloadArgs:
        return cls(
            path,
            verify == "1",
            int(threads),
            int(chunk_mib),
            int(buffers),
            copy_wait,
            int(reader_nice),
            only,
            reads,
            held,
        )

    def loader_kwargs(self) -> dict[str, Any]:
        """weights.loader.load_into's keyword arguments (the defaults left out), less its
        `tuning`, which the worker builds from `copy_wait`, `reader_nice`, `only` and `reads`."""
        kw: dict[str, Any] = {"verify": self.verify}
        if self.threads > 0:
            kw["threads"] = self.threads
        if self.chunk_mib > 0:
            kw["chunk"] = self.chunk_mib << 20
        if self.buffers > 0:
            kw["buffers"] = self.buffers
        return kw


def parse(cls: type[R], replies: list[object]) -> list[R]:
    """One typed reply per worker."""
    return [cls.from_dict(r) for r in replies]


def totals(replies: list[WeightBytes] | list[Released]) -> dict[str, int]:
    """The workers' byte counts summed, key by key."""
    out: dict[str, int] = {}
    for r in replies:
        for k, v in r.as_dict().items():
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return out


def _call(
    server: vllm_server.Server, method: Method, kwargs: dict[str, str] | None = None, timeout: float = 600.0
) -> list[object]:
    from fastvllm.runtime import vllm_server

    return vllm_server.rpc(server, method, timeout, **(kwargs or {}))


def dump_weights(server: vllm_server.Server, path: Path) -> list[DumpedWeights]:
    """Every worker writes its own shard: rank 0 to `path`, the others beside it."""
    return parse(DumpedWeights, _call(server, Method.DUMP_WEIGHTS, {"path": str(path)}))


def weight_bytes(server: vllm_server.Server) -> list[WeightBytes]:
    return parse(WeightBytes, _call(server, Method.WEIGHT_BYTES))


def release(server: vllm_server.Server) -> list[Released]:
    return parse(Released, _call(server, Method.RELEASE))


def reload(server: vllm_server.Server, args: ReloadArgs) -> list[Reloaded]:
    return parse(Reloaded, _call(server, Method.RELOAD, args.as_kwargs()))


def gpu_release(server: vllm_server.Server) -> list[GpuReleased]:
    return parse(GpuReleased, _call(server, Method.GPU_RELEASE))


def check_weights(server: vllm_server.Server, path: Path, timeout: float = 120.0) -> list[WeightCheck]:
    return parse(WeightCheck, _call(server, Method.CHECK_WEIGHTS, {"path": str(path)}, timeout))


def vllm_reload_weights(server: vllm_server.Server) -> None:
    """vLLM's own reload from the model's files (`--reloader vllm`)."""
    _call(server, Method.VLLM_RELOAD_WEIGHTS)
