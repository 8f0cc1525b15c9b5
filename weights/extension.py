"""The vLLM worker extension (`--worker-extension-cls fastvllm.weights.extension.WorkerExtension`),
reached over `POST /collective_rpc` with VLLM_SERVER_DEV_MODE=1.

CPU (vLLM has no sleep mode there): before the CRIU dump, `fastvllm_release` returns the
pages of every weight and of the KV cache to the kernel with madvise(MADV_DONTNEED) over each
tensor's page-aligned interior. CRIU skips pages that are not present, so the image keeps
only the process skeleton, and the tensors keep their addresses. After the restore,
`fastvllm_reload` reads the weight file straight back into them. The KV cache comes back as
zero pages on first touch; the caller resets the prefix cache because its blocks are gone.

vLLM's CPU backend repacks linear weights after loading and empties the parameters: the
packed tensors live in closures (`layer.cpu_linear`). The extension finds them there, so
the weight file holds what the kernels really read and a reload is a plain copy. Packed
weights inside oneDNN handlers are opaque C++ memory that cannot be found or released, so
when this module is imported (before vLLM loads the model) it raises vLLM's size limit for
the SGL kernels, whose packed weights are ordinary tensors; FASTVLLM_CPU_ONEDNN=1 keeps
vLLM's own choice (those weights then stay in the image; `fastvllm_release` reports them).

GPU: vLLM's `sleep(level=2)` discards weights and KV cache; after `wake_up(weights)`
`fastvllm_reload` fills the re-allocated parameters with the double-buffered GPU loader.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from fastvllm.runtime import config
from fastvllm.runtime import worker_rpc as rpc
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.memory import MADV_DONTNEED, advise_interior

# Imported with the worker, before any snapshot, not on the first reload: a restored tree would
# otherwise import it on its critical path (path lookups and reads from a cold cache, and a
# compile where no bytecode is cached; docs/decisions/pinned-pool.md).
from fastvllm.weights import fileformat, graph_memory, held, loader

PACKED_SEP = ".cpu_linear."  # name of a packed tensor: <module>.cpu_linear.<closure variable>


def _prefer_sgl_kernels() -> None:
    """Route CPU dense GEMMs to the SGL kernels, whose packed weights can be released."""
    if config.CPU_ONEDNN.get():
        return
    with contextlib.suppress(Exception):  # a vLLM without this knob keeps its own choice
        import torch

        if torch.cuda.is_available():
            return
        from vllm.model_executor.layers import utils

        if hasattr(utils, "_CPU_SGL_GEMM_MAX_WEIGHT_BYTES"):
            utils._CPU_SGL_GEMM_MAX_WEIGHT_BYTES = 1 << 62


_prefer_sgl_kernels()
# Before vLLM builds the model and its CUDA graph wrappers (they take the graph pool then).
graph_memory.install()


def packed_tensors(model: Any) -> tuple[dict[str, Any], int]:
    """Tensors captured by each layer's `cpu_linear` closure, and the bytes held by oneDNN
    handlers (opaque, not releasable) as (name -> tensor, opaque bytes)."""
    import torch

    found: dict[str, Any] = {}
    opaque = 0
    for mod_name, mod in model.named_modules():
        fn = getattr(mod, "cpu_linear", None)
        cells = getattr(fn, "__closure__", None) or ()
        names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
        for var, cell in zip(names, cells, strict=False):
            try:
                obj = cell.cell_contents
            except ValueError:
                continue
            if isinstance(obj, torch.Tensor) and obj.numel():
                found[f"{mod_name}{PACKED_SEP}{var}"] = obj
            elif hasattr(obj, "handler_tensor") and hasattr(obj, "n") and hasattr(obj, "k"):
                itemsize = getattr(getattr(mod, "weight", None), "itemsize", 2) or 2
                opaque += int(obj.n) * int(obj.k) * int(itemsize)
    return found, opaque


def gpu_memory_stats() -> dict[str, Any]:
    """This process's device memory by kind: the whole GPU's use (cudaMemGetInfo), torch's
    caching allocator (reserved, allocated), the part of it in private pools (CUDA graphs), and
    what the allocator does not see (the context, vLLM's sleep-mode pool), in bytes."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    out: dict[str, Any] = {
        "gpu_used_bytes": total - free,
        "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
        "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
    }
    sleep_pool: set[int] = set()
    with contextlib.suppress(Exception):  # vLLM's sleep-mode allocations (unmapped while asleep)
        from vllm.device_allocator.cumem import CuMemAllocator

        sleep_pool = set(CuMemAllocator.get_instance().pointer_to_data)
    graph_pool = graph_memory.pool_id()  # the graphs' pool when it is the sleep-mode allocator's
    pools: dict[str, int] = {}
    free_in_graphs = 0
    with contextlib.suppress(Exception):  # the segment listing is a detail; the totals stand
        for seg in torch.cuda.memory_snapshot():
            size = int(seg.get("total_size", 0))
            pool = tuple(seg.get("segment_pool_id", (0, 0)))
            if pool == (0, 0):
                key = "default"
            elif pool == graph_pool:
                key = "graphs_released"  # unmapped while asleep: not in the image (graph_memory)
            elif int(seg.get("address", -1)) in sleep_pool:
                key = "sleep_mode"
            else:
                key = "graphs"
                free_in_graphs += size - int(seg.get("allocated_size", 0))
            pools[key] = pools.get(key, 0) + size
    out["reserved_default_pool_bytes"] = pools.get("default", 0)
    out["reserved_graph_pools_bytes"] = pools.get("graphs", 0)  # private pools: CUDA graphs
    out["free_in_graph_pools_bytes"] = free_in_graphs
    out["sleep_mode_pool_bytes"] = pools.get("sleep_mode", 0)  # mapped only while awake
    if graph_pool is not None:  # FASTVLLM_GPU_GRAPH_MEMORY=release: mapped only while awake
        out["released_graph_pool_bytes"] = pools.get("graphs_released", 0)
    return out


class WorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    model_runner: Any  # the worker's (declared for the type checker; nothing is set here)

    def _fastvllm_on_gpu(self) -> bool:
        return str(getattr(self, "device", "cpu")).startswith("cuda")

    def _fastvllm_weights(self) -> tuple[dict[str, Any], int]:
        """Every weight tensor (parameters, and on CPU the packed copies), and the bytes of
        packed weights that are opaque (oneDNN handlers)."""
        model = self.model_runner.model
        tensors = dict(model.named_parameters(remove_duplicate=False))
        if self._fastvllm_on_gpu():
            return tensors, 0
        packed, opaque = packed_tensors(model)
        tensors.update(packed)
        return tensors, opaque

    def _fastvllm_tensors(self) -> dict[str, Any]:
        return self._fastvllm_weights()[0]

    def _fastvllm_kv_storages(self) -> list[tuple[int, int]]:
        seen: dict[int, int] = {}
        for t in getattr(self.model_runner, "kv_caches", []) or []:
            if t is None:
                continue
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return list(seen.items())

    def _fastvllm_rank(self) -> dict[str, int]:
        """This worker's place in a parallel server: its global rank, the world size and the
        tensor-parallel size. Each rank holds its own shard and has its own weight file
        (`fileformat.rank_path`)."""
        pc = getattr(self, "parallel_config", None)
        return {
            "pid": os.getpid(),  # CRIU restores it: a restore's errors name the rank by it
            "rank": int(getattr(self, "rank", 0) or 0),
            "world_size": int(getattr(pc, "world_size", 1) or 1),
            "tensor_parallel_size": int(getattr(pc, "tensor_parallel_size", 1) or 1),
        }

    def fastvllm_dump_weights(self, path: str) -> dict[str, Any]:
        """Write this rank's weights to its own file: `path` for rank 0, `fileformat.rank_path`
        of it for the others (one shared path would keep whichever rank wrote last)."""
        t0 = time.perf_counter()
        place = self._fastvllm_rank()
        target = fileformat.rank_path(Path(path), place["rank"])
        idx = fileformat.write(
            target, self._fastvllm_tensors(), meta={"writer": "fastvllm worker extension", **place}
        )
        return rpc.DumpedWeights(
            path=str(target),
            bytes=idx.file_size,
            tensors=len(idx.tensors),
            data_xxh3_128=idx.data_xxh3_128,
            seconds=time.perf_counter() - t0,
            rank=place["rank"],
            world_size=place["world_size"],
            tensor_parallel_size=place["tensor_parallel_size"],
            pid=place["pid"],
        ).as_dict()

    def fastvllm_weight_bytes(self) -> dict[str, Any]:
        """Bytes of weights (parameters and packed copies) and KV cache, for the release figure."""
        seen: dict[int, int] = {}
        tensors, opaque = self._fastvllm_weights()
        for t in tensors.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        kv = sum(n for _, n in self._fastvllm_kv_storages())
        return rpc.WeightBytes(sum(seen.values()), kv, opaque).as_dict()

    def fastvllm_release(self) -> dict[str, Any]:
        if self._fastvllm_on_gpu():
            raise RuntimeError("fastvllm_release is the CPU path; on GPU use vLLM's /sleep?level=2")
        weights = kv = 0
        seen: set[int] = set()
        tensors, opaque = self._fastvllm_weights()
        for t in tensors.values():
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            weights += advise_interior(s.data_ptr(), s.nbytes(), MADV_DONTNEED)
        for ptr, n in self._fastvllm_kv_storages():
            kv += advise_interior(ptr, n, MADV_DONTNEED)
        return rpc.Released(weights, kv, opaque).as_dict()

    def fastvllm_gpu_memory(self) -> dict[str, Any]:
        """What this worker holds on its GPU, by kind (`gpu_memory_stats`)."""
        return gpu_memory_stats()

    def fastvllm_gpu_release(self) -> dict[str, Any]:
        """Before the CUDA checkpoint of a sleeping worker: give the driver back every free block
        of torch's caching allocator (the checkpoint copies whatever device memory is still
        mapped into the process, and the restore copies it back), and say what stays and why.
        vLLM's sleep already empties the cache once, but a request or a collective_rpc after it
        can leave blocks behind. What stays: allocated blocks (vLLM's persistent input and
        sampler buffers, cuBLAS workspaces), the CUDA graphs' private pools (the captured
        graphs replay on those addresses; with FASTVLLM_GPU_GRAPH_MEMORY=release sleep has
        unmapped them: weights/graph_memory.py) and the context's own memory (modules, local
        memory), which no allocator call can free."""
        import gc

        import torch

        before = gpu_memory_stats()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # The loader's pinned staging buffers, pinned now so that they are part of the image
        # and a restored worker's first reload pins nothing (loader.keep_pool). Host memory,
        # not device memory. Best effort: without them the reload pins its own, as before.
        try:
            pool: dict[str, Any] = loader.keep_pool()
        except Exception as e:
            pool = {"kept": False, "reason": f"{e!r:.200}"}
        return rpc.GpuReleased(before, gpu_memory_stats(), pool, graph_memory.state()).as_dict()

    def fastvllm_reload(
        self,
        path: str,
        threads: str = "0",
        verify: str = "0",
        chunk_mib: str = "0",
        buffers: str = "0",
        copy_wait: str = "spin",
        reader_nice: str = "0",
        only: str = "",
        reads: str = "pread",
        held: str = "",
    ) -> dict[str, Any]:
        """Fill this rank's weights from its own file (`path` names rank 0's). `threads`,
        `chunk_mib`, `buffers` (0: the loader's defaults) are for sweeps in a restored server;
        `copy_wait`, `reader_nice` and `reads` come from the restore's settings (the worker's own
        environment is the snapshot's); `only` runs half the pipeline, for the bench's sweep;
        `held` is the agent's socket where it holds this file's weights in pinned memory
        (weights/held.py), tried first, the file read if it fails (the held copy's checksums
        were checked when the agent read the file, so `verify` does not check them again).
        The arguments cross as strings (runtime.worker_rpc.ReloadArgs encodes them)."""
        args = rpc.ReloadArgs.from_kwargs(
            path, threads, verify, chunk_mib, buffers, copy_wait, reader_nice, only, reads, held
        )
        kw = args.loader_kwargs()
        kw["tuning"] = loader.CopyTuning(
            config.CopyWait(args.copy_wait),
            args.reader_nice,
            loader.PipelineHalf(args.only) if args.only else None,
            config.LoaderReads(args.reads),
        )
        place = self._fastvllm_rank()
        target = fileformat.rank_path(Path(path), place["rank"])
        idx = fileformat.read_index(target)
        check_rank(idx, place, target)
        tensors = self._fastvllm_tensors()
        used = ""
        if args.held and self._fastvllm_on_gpu():
            got, used = _load_held(args.held, target, tensors, idx)
            if got is not None:
                return rpc.Reloaded(
                    bytes=got.bytes,
                    seconds=got.seconds,
                    gbps=got.bytes / max(got.seconds, 1e-9) / 1e9,
                    rank=place["rank"],
                    pool="held",
                    first_copy_s=round(got.first_copy_s, 4),
                    drain_s=round(got.drain_s, 4),
                    map_s=round(got.map_s, 4),
                    unmap_s=round(got.unmap_s, 4),
                    held=used,
                ).as_dict()
        stats = loader.load_into(target, tensors, _idx=idx, **kw)
        return rpc.Reloaded(
            bytes=stats.bytes,
            seconds=stats.seconds,
            gbps=stats.gbps,
            direct=stats.direct,
            rank=place["rank"],
            pool=stats.pool,  # "kept" (pinned before the snapshot) or "fresh: why"
            pin_s=round(stats.pin_s, 4),
            wait_reads_s=round(stats.wait_reads_s, 4),
            wait_buffers_s=round(stats.wait_buffers_s, 4),
            first_copy_s=round(stats.first_copy_s, 4),
            drain_s=round(stats.drain_s, 4),
            held=used,
        ).as_dict()

    def fastvllm_check_weights(self, path: str) -> dict[str, Any]:
        """After a restore whose canary differs: which of this rank's tensors no longer match
        its weight file (per-tensor xxh3), so the error can name the rank. A diagnosis, on the
        failure path only: it reads every weight once."""
        import xxhash

        place = self._fastvllm_rank()
        target = fileformat.rank_path(Path(path), place["rank"])
        idx = fileformat.read_index(target)
        tensors = self._fastvllm_tensors()
        differs = [
            e.name
            for e in idx.tensors
            if e.alias_of is None
            and e.name in tensors
            and xxhash.xxh3_64_hexdigest(fileformat.tensor_bytes(tensors[e.name].cpu())) != e.xxh3_64
        ]
        return rpc.WeightCheck(place["rank"], place["pid"], differs[:5], len(differs)).as_dict()


def _load_held(
    socket_path: str, path: Path, tensors: dict[str, Any], idx: fileformat.Index
) -> tuple[held.HeldLoad | None, str]:
    """The load out of the agent's held copy: (its figures, "used"), or (None, "not used:
    why"), after which the caller reads the file (which rewrites whatever was copied)."""
    try:
        loader.check_compatible(idx, tensors, path)
        got = held.load_into(socket_path, path, tensors, idx)
    except held.NotHeld as e:
        return None, f"not used: {e}"
    except Exception as e:  # a driver or socket failure: the file still has the weights
        return None, f"not used: {e!r:.200}"
    loader.fill_aliases(idx, tensors)
    return got, "used"


def check_rank(idx: fileformat.Index, place: dict[str, int], path: Path) -> None:
    """A shard has the shapes of every other rank's: only the file's own record of the rank
    that wrote it tells a wrong one (files written before ranks were recorded say nothing)."""
    for key in ("rank", "world_size"):
        got = idx.meta.get(key)
        if got is not None and int(got) != place[key]:
            raise UsageError(
                f"weight file {path} was written by {key} {got}, this worker has {key} {place[key]}",
                hint="restore the snapshot with the parallel layout it was taken with",
            )
