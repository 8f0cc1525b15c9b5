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

from fastvllm.runtime.memory import MADV_DONTNEED, advise_interior

# Imported with the worker, before any snapshot, not on the first reload: a restored tree would
# otherwise import it on its critical path (path lookups and reads from a cold cache, and a
# compile where no bytecode is cached: 20-25 ms of a restore here).
from fastvllm.weights import fileformat, loader

PACKED_SEP = ".cpu_linear."  # name of a packed tensor: <module>.cpu_linear.<closure variable>


def _prefer_sgl_kernels() -> None:
    """Route CPU dense GEMMs to the SGL kernels, whose packed weights can be released."""
    if os.environ.get("FASTVLLM_CPU_ONEDNN") == "1":
        return
    with contextlib.suppress(Exception):  # a vLLM without this knob keeps its own choice
        import torch

        if torch.cuda.is_available():
            return
        from vllm.model_executor.layers import utils

        if hasattr(utils, "_CPU_SGL_GEMM_MAX_WEIGHT_BYTES"):
            utils._CPU_SGL_GEMM_MAX_WEIGHT_BYTES = 1 << 62


_prefer_sgl_kernels()


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


class WorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def _fastvllm_on_gpu(self) -> bool:
        return str(getattr(self, "device", "cpu")).startswith("cuda")

    def _fastvllm_weights(self) -> tuple[dict[str, Any], int]:
        """Every weight tensor (parameters, and on CPU the packed copies), and the bytes of
        packed weights that are opaque (oneDNN handlers)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
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
        for t in getattr(self.model_runner, "kv_caches", []) or []:  # type: ignore[attr-defined]
            if t is None:
                continue
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return list(seen.items())

    def fastvllm_dump_weights(self, path: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        idx = fileformat.write(
            Path(path), self._fastvllm_tensors(), meta={"writer": "fastvllm worker extension"}
        )
        return {
            "path": path,
            "bytes": idx.file_size,
            "tensors": len(idx.tensors),
            "data_xxh3_128": idx.data_xxh3_128,
            "seconds": time.perf_counter() - t0,
        }

    def fastvllm_weight_bytes(self) -> dict[str, int]:
        """Bytes of weights (parameters and packed copies) and KV cache, for the release figure."""
        seen: dict[int, int] = {}
        tensors, opaque = self._fastvllm_weights()
        for t in tensors.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        kv = sum(n for _, n in self._fastvllm_kv_storages())
        return {"weight_bytes": sum(seen.values()), "kv_bytes": kv, "opaque_weight_bytes": opaque}

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
        return {"weight_bytes_released": weights, "kv_bytes_released": kv, "weight_bytes_kept_opaque": opaque}

    def fastvllm_reload(self, path: str, threads: str = "0", verify: str = "0") -> dict[str, Any]:
        kw: dict[str, Any] = {"verify": verify == "1"}
        if int(threads) > 0:
            kw["threads"] = int(threads)
        stats = loader.load_into(Path(path), self._fastvllm_tensors(), **kw)
        return {"bytes": stats.bytes, "seconds": stats.seconds, "gbps": stats.gbps, "direct": stats.direct}
