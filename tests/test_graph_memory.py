"""weights/graph_memory.py: the CUDA graphs' pool routed through vLLM's sleep-mode allocator.

The routing itself needs a GPU and vLLM's cumem allocator: on the GPU machine tests/test_e2e.py
checks that a snapshot's worker released its graphs' memory and that the restored server still
answers token for token (its graphs replay on memory mapped back empty). Here: the setting,
the wake-up's tags, and that without CUDA vLLM is left as it is.
"""

from __future__ import annotations

import pytest
from fastvllm.runtime import config
from fastvllm.runtime.errors import UsageError
from fastvllm.weights import graph_memory


def test_the_setting_releases_the_graphs_memory_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTVLLM_GPU_GRAPH_MEMORY", raising=False)
    assert config.GPU_GRAPH_MEMORY.get() is config.GraphMemory.RELEASE
    monkeypatch.setenv("FASTVLLM_GPU_GRAPH_MEMORY", " KEEP ")
    assert config.GPU_GRAPH_MEMORY.get() is config.GraphMemory.KEEP
    monkeypatch.setenv("FASTVLLM_GPU_GRAPH_MEMORY", "drop")
    with pytest.raises(UsageError, match=r"FASTVLLM_GPU_GRAPH_MEMORY.*release, keep"):
        config.GPU_GRAPH_MEMORY.get()


@pytest.mark.parametrize(
    ("tags", "woken"),
    [
        (None, None),  # everything, the graphs included
        (["weights"], ["default", "weights"]),  # the graphs first, before any forward pass
        (["kv_cache"], ["kv_cache"]),  # the graphs came back with the weights already
        (["weights", "kv_cache"], ["default", "weights", "kv_cache"]),
        (["default", "weights"], ["default", "weights"]),
    ],
)
def test_the_graphs_memory_comes_back_with_the_weights(
    tags: list[str] | None, woken: list[str] | None
) -> None:
    assert graph_memory.wake_tags(tags, "default") == woken


def test_without_cuda_vllm_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check: on a GPU, install() routes the pool (tests/test_e2e.py)")
    monkeypatch.setattr(
        graph_memory, "_state", {"mode": "", "patched": False, "installed": False, "reason": ""}
    )
    monkeypatch.setenv("FASTVLLM_GPU_GRAPH_MEMORY", "release")
    got = graph_memory.install()
    assert got["mode"] == "release" and not got["patched"] and not got["installed"]
    assert "no CUDA" in got["reason"]
    assert graph_memory.pool_id() is None and "graph_bytes" not in got
    monkeypatch.setenv("FASTVLLM_GPU_GRAPH_MEMORY", "keep")
    assert graph_memory.install() == {
        "mode": "keep",
        "patched": False,
        "installed": False,
        "reason": "FASTVLLM_GPU_GRAPH_MEMORY=keep",
    }
