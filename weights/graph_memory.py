"""The CUDA graphs' memory out of a sleeping GPU snapshot (`FASTVLLM_GPU_GRAPH_MEMORY=release`,
the default; `keep` leaves vLLM's own pool, and the graphs' memory in the image).

Why: after `sleep(level=2)` a vLLM worker still holds its CUDA graphs' private pool, a third of
what the driver's CUDA checkpoint copies into the image, and the restore copies it back from
pageable memory, the slowest step of a warm restore (docs/benchmarks/gpu-restore.md, "Where the
CUDA restore's time goes"). Its contents are scratch: a graph's replay writes each intermediate
before it reads it, and everything a replay reads first (inputs, weights, the KV cache,
attention metadata) lives outside the pool. So the pool need not be saved, only its addresses
kept.

How: vLLM's sleep-mode allocator (`CuMemAllocator`) already maps and unmaps memory at fixed
virtual addresses for the weights and the KV cache. Imported in the worker before the model is
built (weights/extension.py), `install` makes vLLM's global graph pool a torch `MemPool` backed
by that allocator, so graph capture allocates through it. Its allocations carry the allocator's
default tag (nothing else of vLLM's allocates outside a tagged context), which `sleep` unmaps
without a copy (level 1 offloads only "weights", level 2 nothing), and `install` makes every
wake-up of the weights map the default tag back first, at the same addresses, before any
forward pass can replay a graph. Newer vLLM (0.32, `--sleep-mode-offload-cudagraph`) does the
same routing but copies the pool to host memory and back; a snapshot has no use for the copy.

Where it does not apply, vLLM's own pool is kept and `state()` says why: tensor or pipeline
parallel servers (custom all-reduce and NCCL register the graphs' buffers for IPC, which cuMem
memory does not allow), `expandable_segments:True` (a MemPool refuses it), no sleep mode.

vLLM-specific: written against vLLM 0.24's `Platform.get_global_graph_pool` and
`CuMemAllocator`. Where either is missing or differs, `install` leaves vLLM as it is and says
why: the graphs' memory then stays in the image, as before.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from fastvllm.runtime import config

_lock = threading.Lock()
# mode: the setting; patched: vLLM's graph pool getter and wake-up are fastvllm's; installed:
# the graphs' pool was made through the sleep-mode allocator (False until the model is built,
# and where it does not apply: reason)
_state: dict[str, Any] = {"mode": "", "patched": False, "installed": False, "reason": "not installed"}
_pool: Any = None  # the MemPool the graphs allocate from (kept alive: torch frees it otherwise)
_pluggable: Any = None  # its allocator, kept alive with it (as vLLM keeps its own pools')


def state() -> dict[str, Any]:
    """What `install` did (mode, patched, installed, reason: see `_state`); once the graphs'
    pool is made, the bytes the graphs hold there (`graph_bytes`: what sleep leaves out of the
    image)."""
    out = dict(_state)
    if _pool is not None:
        out["graph_bytes"] = _graph_bytes()
    return out


def _graph_bytes() -> int:
    """Bytes the sleep-mode allocator holds under its default tag: the graphs' segments."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator

        alloc = CuMemAllocator.get_instance()
        tag = CuMemAllocator.default_tag
        return sum(int(d.handle[1]) for d in alloc.pointer_to_data.values() if d.tag == tag)
    except Exception:
        return -1


def pool_id() -> tuple[int, int] | None:
    """The graphs' pool id once made (None before the first capture set-up or when not
    installed)."""
    return tuple(_pool.id) if _pool is not None else None


def install() -> dict[str, Any]:
    """Route vLLM's CUDA graph pool through its sleep-mode allocator (see the module docstring).
    Idempotent; a no-op without CUDA, with `FASTVLLM_GPU_GRAPH_MEMORY=keep`, or with a vLLM
    whose internals differ. Never raises: the graphs' memory then stays in the image."""
    with _lock:
        if _state["patched"]:
            return state()
        try:
            mode = config.GPU_GRAPH_MEMORY.get()
        except Exception as e:  # raising here would kill the worker; `snapshot` checks it first
            _state.update(mode="keep", reason=str(e))
            return state()
        _state["mode"] = mode.value
        if mode is config.GraphMemory.KEEP:
            _state["reason"] = "FASTVLLM_GPU_GRAPH_MEMORY=keep"
            return state()
        try:
            _patch()
        except Exception as e:  # a vLLM without these internals: leave it as it is
            _state["reason"] = f"vLLM's graph pool left as it is: {e!r:.200}"
            return state()
        _state.update(patched=True, reason="the graphs' pool is made with the model")
        return state()


def _patch() -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA")
    from vllm.device_allocator import cumem
    from vllm.platforms import current_platform

    allocator_cls = cumem.CuMemAllocator
    if not getattr(cumem, "cumem_available", False):
        raise RuntimeError("vLLM's cumem allocator is not available")
    for name in ("get_pluggable_allocator", "default_tag", "wake_up", "get_instance"):
        if not hasattr(cumem, name) and not hasattr(allocator_cls, name):
            raise RuntimeError(f"vllm.device_allocator.cumem has no {name}")
    platform_cls = type(current_platform)
    if not hasattr(platform_cls, "get_global_graph_pool") or not hasattr(platform_cls, "_global_graph_pool"):
        raise RuntimeError("vLLM's platform has no global graph pool")
    if platform_cls._global_graph_pool is not None:
        raise RuntimeError("vLLM made its graph pool before fastvllm's worker extension loaded")

    def get_global_graph_pool(self: Any) -> Any:
        # Made on first use (model construction), when the worker's device is set.
        global _pool, _pluggable
        cls = self.__class__
        if cls._global_graph_pool is None and (why := _not_applicable()):
            cls._global_graph_pool = self.graph_pool_handle()  # vLLM's own pool
            _state.update(installed=False, reason=why)
        if cls._global_graph_pool is None:
            alloc = allocator_cls.get_instance()
            # the allocator's own callbacks: its C extension holds one pair for every pool
            _pluggable = cumem.get_pluggable_allocator(
                alloc.python_malloc_callback, alloc.python_free_callback
            )
            _pool = torch.cuda.memory.MemPool(_pluggable._allocator)
            # Never freed: at interpreter exit torch would free the segments through the
            # allocator (unmapped ones too) and assert that no graph still uses the pool.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(_pool))
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(_pluggable))
            cls._global_graph_pool = _pool.id
            _state.update(installed=True, reason="")
        return cls._global_graph_pool

    wake_up = allocator_cls.wake_up

    def wake_up_with_graphs(self: Any, tags: list[str] | None = None) -> None:
        wake_up(self, wake_tags(tags, allocator_cls.default_tag))

    setattr(platform_cls, "get_global_graph_pool", get_global_graph_pool)  # noqa: B010 (a method)
    setattr(allocator_cls, "wake_up", wake_up_with_graphs)  # noqa: B010


def wake_tags(tags: list[str] | None, graphs_tag: str) -> list[str] | None:
    """The tags a wake-up maps back: the graphs' memory comes back with the weights (first), as
    no forward pass runs before the weights are back; None (everything) stays None."""
    if tags is None or "weights" not in tags or graphs_tag in tags:
        return tags
    return [graphs_tag, *tags]


def _not_applicable() -> str:
    """Why the server being built keeps vLLM's own graph pool ("" when the routing applies)."""
    if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
        return "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which a MemPool refuses"
    if not _sleep_mode():
        return "the server runs without --enable-sleep-mode"
    try:
        from vllm.distributed import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pp_group().world_size
    except Exception as e:  # the groups are set up before the model: unknown means keep
        return f"the parallel layout is unknown ({e!r:.100})"
    if tp > 1 or pp > 1:
        # custom all-reduce and NCCL register the graphs' buffers for IPC; cuMem memory is not
        # registrable that way (vLLM 0.32 says so for its own routing)
        return f"a parallel server (tensor {tp}, pipeline {pp}): its graphs' buffers are registered for IPC"
    return ""


def _sleep_mode() -> bool:
    """Whether the server being built runs with vLLM's sleep mode (the only case in which its
    allocator unmaps and maps memory); True when the config cannot be read (the patch then
    behaves as with sleep mode, which is harmless: the memory is simply never unmapped)."""
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
    except Exception:
        return True
    model_config = getattr(cfg, "model_config", None)
    return bool(getattr(model_config, "enable_sleep_mode", True)) if cfg is not None else True
