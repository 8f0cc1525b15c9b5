"""The vLLM worker extension (`--worker-extension-cls fastvllm.weights.extension.WorkerExtension`),
reached over `POST /collective_rpc` with VLLM_SERVER_DEV_MODE=1.

On CPU, vLLM has no sleep mode. Before the CRIU dump, `fastvllm_release` returns the pages
of every parameter and of the KV cache to the kernel with madvise(MADV_DONTNEED) over each
tensor's page-aligned interior. CRIU skips pages that are not present, so the image keeps
only the process skeleton, and the tensors keep their addresses. After the restore,
`fastvllm_reload` reads the weight file straight back into them. The KV cache comes back as
zero pages on first touch; the caller resets the prefix cache because its blocks are gone.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from pathlib import Path
from typing import Any

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _release(ptr: int, nbytes: int) -> int:
    page = mmap.PAGESIZE
    start = (ptr + page - 1) // page * page
    end = (ptr + nbytes) // page * page
    if end <= start:
        return 0
    if _libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
    return end - start


class WorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def _fastvllm_params(self) -> dict[str, Any]:
        model = self.model_runner.model  # type: ignore[attr-defined]
        return dict(model.named_parameters(remove_duplicate=False))

    def _fastvllm_kv_storages(self) -> list[tuple[int, int]]:
        seen: dict[int, int] = {}
        for t in getattr(self.model_runner, "kv_caches", []) or []:  # type: ignore[attr-defined]
            if t is None:
                continue
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return list(seen.items())

    def fastvllm_dump_weights(self, path: str) -> dict[str, Any]:
        from fastvllm.weights import fileformat

        t0 = time.perf_counter()
        idx = fileformat.write(
            Path(path), self._fastvllm_params(), meta={"writer": "fastvllm worker extension"}
        )
        return {
            "path": path,
            "bytes": idx.file_size,
            "tensors": len(idx.tensors),
            "seconds": time.perf_counter() - t0,
        }

    def fastvllm_release(self) -> dict[str, Any]:
        if str(getattr(self, "device", "cpu")).startswith("cuda"):
            raise RuntimeError("fastvllm_release is the CPU path; on GPU use vLLM's /sleep")
        weights = kv = 0
        seen: set[int] = set()
        for p in self._fastvllm_params().values():
            s = p.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            weights += _release(s.data_ptr(), s.nbytes())
        for ptr, n in self._fastvllm_kv_storages():
            kv += _release(ptr, n)
        return {"weight_bytes_released": weights, "kv_bytes_released": kv}

    def fastvllm_reload(self, path: str, threads: str = "4") -> dict[str, Any]:
        from fastvllm.weights import loader

        stats = loader.load_into(Path(path), self._fastvllm_params(), threads=int(threads))
        return {"bytes": stats.bytes, "seconds": stats.seconds, "gbps": stats.gbps}
