"""Builds fastvllm's small C helpers (`runtime/native/*.c`) into shared libraries, once per
version of their source, in the user's cache. They are preloaded into other programs (CRIU,
vLLM servers), which is why they are C and not Python."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import xxhash
from fastvllm.runtime import system
from fastvllm.runtime.errors import EnvironmentNotReadyError

SOURCES = Path(__file__).parent / "native"


def build(name: str) -> Path:
    """The library built from `native/<name>.c` (built now if this version is not yet)."""
    src = SOURCES / f"{name}.c"
    digest = xxhash.xxh3_64_hexdigest(src.read_bytes())
    home = system.fastvllm_home()
    lib = home / "lib" / f"{name}-{digest}.so"
    if lib.is_file():
        return lib
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise EnvironmentNotReadyError(
            f"fastvllm needs a C compiler once, to build its helper {name}.so, and none was found",
            hint="install gcc (apt-get install gcc) or run scripts/setup.sh",
        )
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], capture_output=True, text=True
    )
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise EnvironmentNotReadyError(
            f"could not build {lib.name}: {r.stderr.strip()[-200:]}", hint="check gcc"
        )
    os.replace(tmp, lib)
    return lib
