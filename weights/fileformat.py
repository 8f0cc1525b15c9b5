"""One flat file per model and rank: a 4 KiB-aligned header holding a JSON index, then every
tensor's bytes at a 4 KiB-aligned offset (so O_DIRECT reads work and a reload is a plain
copy into the live parameters).

    [ "FVLLMWTS" | u32 version | u32 0 | u64 index length | JSON index ] pad to 4 KiB
    [ tensor 0 bytes ] pad to 4 KiB [ tensor 1 bytes ] ...

The index records name, dtype, shape, stride, offset (from the data region's start), byte
length and xxh3-64 per tensor, and the xxh3-128 of the whole data region. Tensors that share
storage (tied weights) are stored once; the later names point at the first (`alias_of`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash
from fastvllm.runtime.errors import IntegrityError, UsageError

MAGIC = b"FVLLMWTS"
VERSION = 1
ALIGN = 4096
_HEAD = struct.Struct("<8sIIQ")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class TensorEntry:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: list[int]
    stride: list[int]
    offset: int  # offset of the bytes from the start of the data region
    nbytes: int
    xxh3_64: str
    alias_of: str | None = None


@dataclass
class Index:
    tensors: list[TensorEntry]
    data_offset: int
    file_size: int
    data_xxh3_128: str
    meta: dict[str, Any]

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def rank_path(path: Path, rank: int) -> Path:
    """The weight file of worker `rank` of a tensor- or pipeline-parallel server, named after
    rank 0's `path`: each rank holds its own shard of every split tensor (same names and
    shapes, other bytes), so one file shared by all ranks would hold one rank's shard only.
    Rank 0 keeps `path` itself: a single-worker snapshot's file is named as it always was."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def tensor_bytes(t: Any) -> memoryview:
    """A CPU tensor's bytes in row-major order: its own memory (writable) when it is
    contiguous, else a contiguous copy."""
    import torch

    c = t.detach().contiguous()
    return memoryview(c.view(-1).view(torch.uint8).numpy()) if c.numel() else memoryview(b"")


def write(path: Path, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> Index:
    """Write `tensors` (torch tensors on any device) to `path` atomically. Offsets in the index
    are relative to the data region, so the index does not depend on its own length."""
    entries: list[TensorEntry] = []
    blobs: list[memoryview] = []
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], str], str] = {}
    off = 0
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), dtype)
        if t.numel() and key in seen:  # tied weights: stored once
            entries.append(TensorEntry(name, dtype, list(t.shape), list(t.stride()), 0, 0, "", seen[key]))
            blobs.append(memoryview(b""))
            continue
        seen[key] = name
        data = tensor_bytes(t.cpu())
        digest = xxhash.xxh3_64_hexdigest(data)
        entries.append(TensorEntry(name, dtype, list(t.shape), list(t.stride()), off, data.nbytes, digest))
        blobs.append(data)
        off = align(off + data.nbytes)
    data_len = off
    whole = xxhash.xxh3_128()
    for e, blob in zip(entries, blobs, strict=True):
        if e.alias_of is None:
            whole.update(blob)
            whole.update(b"\0" * (align(e.nbytes) - e.nbytes))
    doc = {
        "tensors": [asdict(e) for e in entries],
        "meta": meta or {},
        "data_len": data_len,
        "data_xxh3_128": whole.hexdigest(),
    }
    body = json.dumps(doc).encode()
    data_offset = align(_HEAD.size + len(body))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(data_offset + data_len)
        f.write(_HEAD.pack(MAGIC, VERSION, 0, len(body)))
        f.write(body)
        for e, blob in zip(entries, blobs, strict=True):
            if e.alias_of is None and e.nbytes:
                f.seek(data_offset + e.offset)
                f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return read_index(path)


def read_index(path: Path) -> Index:
    """Parse and sanity-check the header; raise with what is wrong and how to fix it."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise IntegrityError(f"{path} is too short to be a weight file", hint="re-dump the weights")
            magic, version, _, n = _HEAD.unpack(head)
            if magic != MAGIC:
                raise UsageError(
                    f"{path} is not a fastvllm weight file", hint="pass a file written by 'weights dump'"
                )
            if version != VERSION:
                raise UsageError(
                    f"{path} has format version {version}, expected {VERSION}", hint="re-dump it"
                )
            doc = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise UsageError(f"weight file {path} does not exist", hint="check the path") from e
    idx = Index(
        tensors=[TensorEntry(**t) for t in doc["tensors"]],
        data_offset=align(_HEAD.size + n),
        file_size=align(_HEAD.size + n) + doc["data_len"],
        data_xxh3_128=doc["data_xxh3_128"],
        meta=doc.get("meta", {}),
    )
    size = path.stat().st_size
    if size != idx.file_size:
        raise IntegrityError(
            f"weight file {path} has {size} bytes, its index says {idx.file_size} (truncated?)",
            hint="re-dump the weights",
        )
    return idx


def verify(path: Path, on_bytes: Callable[[int], None] | None = None) -> Index:
    """Check the whole data region and every tensor against their checksums."""
    idx = read_index(path)
    whole = xxhash.xxh3_128()
    by_offset = sorted((e for e in idx.tensors if e.alias_of is None), key=lambda e: e.offset)
    with open(path, "rb", buffering=0) as f:
        for e in by_offset:
            f.seek(idx.data_offset + e.offset)
            data = f.read(align(e.nbytes))
            whole.update(data)
            if xxhash.xxh3_64_hexdigest(data[: e.nbytes]) != e.xxh3_64:
                raise IntegrityError(
                    f"weight {e.name} in {path} does not match its checksum", hint="re-dump the weights"
                )
            if on_bytes:
                on_bytes(len(data))
    if whole.hexdigest() != idx.data_xxh3_128:
        raise IntegrityError(
            f"{path}: the data region does not match its checksum", hint="re-dump the weights"
        )
    return idx
