"""Converts safetensors checkpoints into one flat weight file (`fastvllm weights dump DIR`).

The file then holds the checkpoint's tensors as they are on disk, not vLLM's post-processed
ones (a server's own dump has those); it is what the loader benchmark and offline tools read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastvllm.runtime.errors import UsageError
from fastvllm.weights import fileformat


def safetensors_files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files:
        raise UsageError(
            f"no .safetensors file in {src}", hint="pass a model directory or a .safetensors file"
        )
    return files


def from_safetensors(src: Path, out: Path) -> fileformat.Index:
    """Write every tensor of the checkpoint at `src` (a file or a directory) to `out`."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for f in safetensors_files(src):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                    tensors[name] = st.get_tensor(name)
        except Exception as e:  # safetensors' own SafetensorError: the file is not a checkpoint
            if type(e).__name__ != "SafetensorError":
                raise
            raise UsageError(
                f"{f} is not a readable safetensors file ({e})",
                hint="pass a model directory or a .safetensors file",
            ) from e
    return fileformat.write(out, tensors, meta={"writer": "fastvllm weights dump", "source": str(src)})
