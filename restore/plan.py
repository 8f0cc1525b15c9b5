"""A restore's plan: what it will do, decided before anything runs, from the snapshot's
manifest, the options and the CRIU restore mode this host resolved.

Why: the steps of restore/pipeline.py read their decisions from this one value instead of each
working them out from the manifest and the options; it is a pure function, so every
combination is unit-tested without CRIU or vLLM (tests/test_restore_plan_units.py). What only
the restore itself can find out (whether a hot set was learned, which files this host already
checked) stays with the steps that read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fastvllm.runtime import manifest
from fastvllm.runtime.modes import CriuRestoreMode, Reloader


class WeightsBack(enum.Enum):
    """How the restored server gets back the weights its snapshot released."""

    IN_IMAGE = "in_image"  # nothing was released: the weights came back with the image
    WAKE_UP = "wake_up"  # sleep level 1: vLLM kept them in host memory, one wake-up
    VLLM_RELOAD = "vllm_reload"  # sleep level 2, --reloader vllm: vLLM reads the model's files
    LOADER = "loader"  # fastvllm's loader reads the snapshot's flat weight file(s)


@dataclass(frozen=True)
class RestorePlan:
    mode: CriuRestoreMode  # how CRIU fills the tree's memory
    gpu: bool  # the tree holds CUDA state: a CUDA restore follows CRIU's
    early_reads: bool  # the hot set and CRIU's small images are read while the host is checked
    # the CUDA checkpoint's host copy of device memory is read whole right after CRIU's first
    # reads (mmap mode would fault it in from the page images page by page)
    gpu_host_copy_first: bool
    # mmap mode: the host copy is mapped in from outside while the driver restores it
    # (runtime/prefault.py), instead of the driver faulting it in page by page
    prefault_host_copy: bool
    weights: WeightsBack
    wake_weights_first: bool  # sleep level 2: the weights' memory is woken before they load
    wake_kv_cache: bool  # sleep level 2: the KV cache is woken after the weights

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "gpu": self.gpu,
            "early_reads": self.early_reads,
            "gpu_host_copy_first": self.gpu_host_copy_first,
            "prefault_host_copy": self.prefault_host_copy,
            "weights": self.weights.value,
            "wake_weights_first": self.wake_weights_first,
            "wake_kv_cache": self.wake_kv_cache,
        }


def make(
    m: manifest.Manifest,
    mode: CriuRestoreMode,
    *,
    prefetch: bool,
    reloader: Reloader,
) -> RestorePlan:
    """The plan of a restore of `m` in CRIU `mode` (criu.resolve_mode's answer), with the
    read-ahead on or off (`prefetch`), and the reloader asked for."""
    gpu = bool(m.cuda_pids)
    return RestorePlan(
        mode=mode,
        gpu=gpu,
        early_reads=prefetch,
        gpu_host_copy_first=prefetch and gpu and mode is CriuRestoreMode.MMAP,
        prefault_host_copy=gpu and mode is CriuRestoreMode.MMAP,
        weights=weights_back(m.sleep_level, bool(m.weights_file), reloader),
        wake_weights_first=m.sleep_level == 2 and bool(m.weights_file),
        wake_kv_cache=m.sleep_level == 2 and bool(m.weights_file),
    )


def weights_back(sleep_level: int, has_weights_file: bool, reloader: Reloader) -> WeightsBack:
    """Sleep level 1 keeps the weights in host memory (a wake-up); otherwise released weights
    come from the snapshot's flat file through fastvllm's loader, or from the model's own files
    through vLLM where a sleep-2 snapshot asks for vLLM's reload; a snapshot that released
    nothing has them in its image."""
    if sleep_level == 1:
        return WeightsBack.WAKE_UP
    if not has_weights_file:
        return WeightsBack.IN_IMAGE
    if sleep_level == 2 and reloader == Reloader.VLLM:
        return WeightsBack.VLLM_RELOAD
    return WeightsBack.LOADER
