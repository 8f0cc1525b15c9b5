"""The restore's plan (restore/plan.py): every decision it takes from the manifest, the CRIU
mode and the options, without CRIU or vLLM."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastvllm.restore import plan
from fastvllm.restore.plan import WeightsBack
from fastvllm.runtime.modes import CriuRestoreMode, Reloader


def _m(
    sleep_level: int = 0, weights_file: str | None = "weights/model.fvw", cuda_pids: list[int] | None = None
) -> Any:
    return SimpleNamespace(sleep_level=sleep_level, weights_file=weights_file, cuda_pids=cuda_pids or [])


@pytest.mark.parametrize(
    ("sleep_level", "weights_file", "reloader", "expected"),
    [
        (0, None, Reloader.FASTVLLM, WeightsBack.IN_IMAGE),
        (0, "w.fvw", Reloader.FASTVLLM, WeightsBack.LOADER),  # a CPU snapshot's released weights
        (0, "w.fvw", Reloader.VLLM, WeightsBack.LOADER),  # vLLM's reload exists for sleep 2 only
        (1, None, Reloader.FASTVLLM, WeightsBack.WAKE_UP),
        (1, "w.fvw", Reloader.VLLM, WeightsBack.WAKE_UP),
        (2, "w.fvw", Reloader.FASTVLLM, WeightsBack.LOADER),
        (2, "w.fvw", Reloader.VLLM, WeightsBack.VLLM_RELOAD),
        (2, None, Reloader.VLLM, WeightsBack.IN_IMAGE),
    ],
)
def test_how_the_weights_come_back(
    sleep_level: int, weights_file: str | None, reloader: Reloader, expected: WeightsBack
) -> None:
    p = plan.make(_m(sleep_level, weights_file), CriuRestoreMode.COPY, prefetch=True, reloader=reloader)
    assert p.weights is expected
    woken = sleep_level == 2 and weights_file is not None
    assert (p.wake_weights_first, p.wake_kv_cache) == (woken, woken)


@pytest.mark.parametrize("mode", list(CriuRestoreMode))
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("gpu", [True, False])
def test_the_gpu_host_copy_is_read_first_only_where_mmap_would_fault_it_in(
    mode: CriuRestoreMode, prefetch: bool, gpu: bool
) -> None:
    p = plan.make(_m(2, cuda_pids=[7] if gpu else []), mode, prefetch=prefetch, reloader=Reloader.FASTVLLM)
    assert p.gpu is gpu
    assert p.early_reads is prefetch
    assert p.gpu_host_copy_first is (gpu and prefetch and mode is CriuRestoreMode.MMAP)
    # mapped in from outside during the CUDA restore whenever the pages are mapped, read ahead or not
    assert p.prefault_host_copy is (gpu and mode is CriuRestoreMode.MMAP)
    assert p.mode is mode
    assert p.as_dict()["mode"] == mode.value
