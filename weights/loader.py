"""Loads a flat weight file into live tensors.

CPU targets: every tensor's bytes are read with preadv straight into the destination's own
memory (no staging copy), by N threads over chunks. Hand-written rather than a library
because the point is to skip the intermediate buffers every public loader allocates.
Shapes, dtypes and names are all checked before the first byte is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from fastvllm.runtime.errors import IntegrityError, UsageError
from fastvllm.weights import fileformat

DEFAULT_THREADS = 4
DEFAULT_CHUNK = 16 << 20


@dataclass
class LoadStats:
    bytes: int
    seconds: float
    tensors: int

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def _byte_view(t: Any) -> memoryview:
    import torch

    t = t.detach()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray())


def check_compatible(idx: fileformat.Index, targets: dict[str, Any], path: Path) -> None:
    entries = idx.by_name()
    missing = sorted(set(targets) - set(entries))
    extra = sorted(set(entries) - set(targets))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"has extra {extra[:3]}"
        raise UsageError(
            f"weight file {path} does not match this model: it {what}",
            hint="it was dumped from another model; re-dump the weights",
        )
    for name, t in targets.items():
        e = entries[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != e.shape or dtype != e.dtype:
            raise UsageError(
                f"weight {name}: file has {e.dtype}{e.shape}, model has {dtype}{list(t.shape)}",
                hint="the file belongs to another model or configuration; re-dump the weights",
            )


def load_into(
    path: Path,
    targets: dict[str, Any],
    *,
    threads: int = DEFAULT_THREADS,
    chunk: int = DEFAULT_CHUNK,
    verify: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> LoadStats:
    """Fill CPU tensors `targets` (name -> tensor) from the file at `path`."""
    import time

    import torch

    idx = fileformat.read_index(path)
    check_compatible(idx, targets, path)
    t0 = time.perf_counter()
    jobs: list[tuple[memoryview, int]] = []
    staged: list[tuple[Any, Any]] = []  # (destination, contiguous staging) for strided targets
    for e in idx.tensors:
        dst = targets[e.name]
        if e.alias_of is not None or not e.nbytes:
            continue
        if not dst.is_contiguous():
            tmp = torch.empty(dst.shape, dtype=dst.dtype)
            staged.append((dst, tmp))
            dst = tmp
        view = _byte_view(dst)
        base = idx.data_offset + e.offset
        for off in range(0, e.nbytes, chunk):
            jobs.append((view[off : off + chunk], base + off))
    fd = os.open(path, os.O_RDONLY)
    try:

        def read(job: tuple[memoryview, int]) -> int:
            buf, off = job
            done = 0
            while done < buf.nbytes:
                n = os.preadv(fd, [buf[done:]], off + done)
                if n == 0:
                    raise IntegrityError(f"weight file {path} ended early", hint="re-dump the weights")
                done += n
            if on_bytes:
                on_bytes(done)
            return done

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            total = sum(pool.map(read, jobs))
    finally:
        os.close(fd)
    for dst, tmp in staged:
        dst.copy_(tmp)
    for e in idx.tensors:  # tied weights that do not already share storage with their origin
        if e.alias_of is not None:
            dst, src = targets[e.name], targets[e.alias_of]
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
    if verify:
        for e in idx.tensors:
            if e.alias_of is None and e.nbytes:
                got = xxhash.xxh3_64_hexdigest(_byte_view(targets[e.name].contiguous()))
                if got != e.xxh3_64:
                    raise IntegrityError(
                        f"weight {e.name} does not match its checksum", hint="re-dump the weights"
                    )
    return LoadStats(total, time.perf_counter() - t0, len(idx.tensors))
