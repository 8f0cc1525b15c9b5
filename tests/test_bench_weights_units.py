"""Pure-logic checks of the weight-loader benchmark (fastvllm.weights.bench): model shapes,
peer selection, bounds and the summary. Nothing here reads weights or starts a process."""

from __future__ import annotations

from typing import Any

import pytest
from fastvllm.weights import bench as bw


def test_3b_has_llama_3_2_3b_shapes() -> None:
    m = bw.SIZES["3b"]
    specs = dict(bw.tensor_specs(m))
    assert specs["model.embed_tokens.weight"] == [128256, 3072]
    assert specs["model.layers.0.self_attn.k_proj.weight"] == [1024, 3072]
    assert specs["model.layers.27.mlp.down_proj.weight"] == [3072, 8192]
    assert "lm_head.weight" not in specs  # tied embeddings
    assert len(specs) == 1 + 28 * 9 + 1
    assert 3.2e9 < bw.param_count(m) < 3.22e9


def test_tiny_is_about_100_mb() -> None:
    assert 80e6 < bw.param_count(bw.SIZES["tiny"]) * 2 < 120e6


def test_select_loaders() -> None:
    assert [li.name for li in bw.select_loaders("all")] == [li.name for li in bw.LOADERS]
    got = [li.name for li in bw.select_loaders("runai,safetensors")]
    ours = ["fastvllm", "fastvllm (copy)"]
    assert got == [*ours, "safetensors.load_file", "safetensors.safe_open", "runai-model-streamer"]
    assert [li.name for li in bw.select_loaders("none")] == ours
    with pytest.raises(SystemExit):
        bw.select_loaders("nosuchloader")


def test_bound_is_read_rate_capped_by_h2d() -> None:
    read = {"cold": {"max_gbps": 2.0}, "warm": {"max_gbps": 40.0}}
    assert bw.bound_for("cold", read, None) == 2.0
    assert bw.bound_for("warm", read, 25.0) == 25.0
    assert bw.bound_for("cold", {"cold": {"max_gbps": None}}, 25.0) is None


def _loader(name: str, kind: str, cold: list[float], warm: list[float]) -> dict[str, Any]:
    def cond(vals: list[float]) -> dict[str, Any]:
        return {"status": "ok", "runs": [{"ok": True, "gbps": g, "seconds": 1 / g} for g in vals]}

    return {"name": name, "kind": kind, "conditions": {"cold": cond(cold), "warm": cond(warm)}}


def test_summarize_medians_percent_and_ratio() -> None:
    loaders = [
        _loader("fastvllm", "ours", [1.0, 3.0, 2.0], [8.0, 10.0, 9.0]),
        _loader("a", "peer", [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]),
        _loader("b", "peer", [0.5, 0.5, 0.5], [4.5, 4.5, 4.5]),
    ]
    skipped = {"name": "c", "kind": "peer", "conditions": {"cold": {"status": "skipped", "runs": []}}}
    ratio = bw.summarize([*loaders, skipped], {"cold": 4.0, "warm": None})
    ours = loaders[0]["conditions"]
    assert ours["cold"]["median_gbps"] == 2.0
    assert ours["cold"]["percent_of_bound"] == 50.0
    assert ours["warm"]["percent_of_bound"] is None
    assert ratio["cold"] == {"fastest_peer": "a", "peer_gbps": 1.0, "ours_gbps": 2.0, "ratio": 2.0}
    assert ratio["warm"]["fastest_peer"] == "b"
    assert ratio["warm"]["ratio"] == 2.0


def test_one_line_error() -> None:
    assert bw.one_line(ValueError("a\n  b")) == "ValueError: a b"


def test_zero_copy_peer_is_flagged_and_a_copying_ratio_given() -> None:
    ours = _loader("fastvllm", "ours", [2.0], [4.0])
    mmap = _loader("mmap", "peer", [2.0], [20.0])
    copy = _loader("copy", "peer", [1.0], [2.0])
    for ld, frac in [(ours, 1.0), (mmap, 0.01), (copy, 0.99)]:
        for c in ld["conditions"].values():
            c["runs"][0]["private_fraction"] = frac
    ratio = bw.summarize([ours, mmap, copy], {"cold": None, "warm": None})
    assert mmap["conditions"]["warm"]["zero_copy"] is True
    assert ours["conditions"]["warm"]["zero_copy"] is False
    assert ratio["warm"]["fastest_peer"] == "mmap"
    assert ratio["warm"]["ratio"] == 0.2
    assert ratio["warm"]["fastest_copying_peer"] == "copy"
    assert ratio["warm"]["ratio_to_copying"] == 2.0
