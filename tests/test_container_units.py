"""Pure logic of the container path (no Docker engine needed): the entrypoint's arguments,
and a snapshot name that changes with the image's identity."""

from __future__ import annotations

from fastvllm import container as ctr
from fastvllm import entrypoint


def test_entrypoint_command_passes_vllm_arguments_after_a_separator() -> None:
    cmd = ctr.entrypoint_command("/m", port=9000, name="snap", vllm_args=["--max-model-len", "512"])
    assert cmd == ["/m", "--snapshots", "/snapshots", "--host", "0.0.0.0", "--port", "9000",
                   "--name", "snap", "--", "--max-model-len", "512"]  # fmt: skip
    assert "--" not in ctr.entrypoint_command("/m")


def test_snapshot_name_depends_on_the_image_identity() -> None:
    host = entrypoint.snapshot_name("/models/tiny", ["--seed", "1"])
    a = entrypoint.snapshot_name("/models/tiny", ["--seed", "1"], "aaaa")
    b = entrypoint.snapshot_name("/models/tiny", ["--seed", "1"], "bbbb")
    assert len({host, a, b}) == 3
    assert a == entrypoint.snapshot_name("/models/tiny", ["--seed", "1"], "aaaa")
    assert all(n.startswith("tiny-") for n in (host, a, b))
