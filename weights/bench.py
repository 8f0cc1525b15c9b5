"""Weight-loader benchmark: fastvllm's loader against the public ones, same weights, same run.

Why: the restore path reloads a model's weights, and the claim that our loader is fast only
means something next to the loaders people already use (safetensors, fastsafetensors,
runai-model-streamer, tensorizer, instanttensor) and next to what the machine can do at all.

How: a Llama with Llama-3.2-3B's shapes (or a ~100 MB `tiny` one) is made from seeded random
bf16 weights once, written as one safetensors file, one fastvllm flat file and one tensorizer
file under --workdir, and reused on later runs. Every (loader, condition, rep) then runs in a
fresh child process; the child times only the load call until every tensor is on the target
device (CUDA synchronised; on CPU every page touched, so that an mmap is not counted as a
load), then checks every tensor's bytes against digests taken when the weights were made and
three tensors bit for bit against values regenerated from the seed. Cold = page cache dropped
before the child starts; warm = the loader's file read once right before it. The bounds are
measured in the same run: parallel preadv of the file with the same thread count (cold and
warm) and, on CUDA, pinned host-to-device copy. Results: JSON + PNG under --out, a table on
stdout.

    python -m fastvllm.weights.bench --size tiny --reps 2          # quick
    python -m fastvllm.weights.bench --size 3b --device cpu --reps 3
    fastvllm weights bench --size 3b                              # the same
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = 1
MARK = "@@fastvllm-bench-weights@@ "
READ_CHUNK = 16 << 20
H2D_BYTES = 1 << 30
CHILD_TIMEOUT_S = 1800.0
DEFAULT_WORKDIR = Path("/var/tmp/fastvllm-bench-weights")
DEFAULT_SEED = 1234
CONDITIONS = ("cold", "warm")


@dataclass(frozen=True)
class ModelShape:
    """Llama shapes; embeddings are tied, so lm_head is not stored."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


SIZES: dict[str, ModelShape] = {
    "3b": ModelShape("llama-3.2-3b-shaped", 3072, 8192, 28, 24, 8, 128, 128256),
    "tiny": ModelShape("llama-tiny", 768, 2048, 4, 12, 4, 64, 32000),
}


def tensor_specs(m: ModelShape) -> list[tuple[str, list[int]]]:
    """(name, shape) of every stored tensor, in file order (Hugging Face Llama names)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    specs: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [m.vocab, m.hidden])]
    for i in range(m.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", [m.hidden]),
            (p + "self_attn.q_proj.weight", [q, m.hidden]),
            (p + "self_attn.k_proj.weight", [kv, m.hidden]),
            (p + "self_attn.v_proj.weight", [kv, m.hidden]),
            (p + "self_attn.o_proj.weight", [m.hidden, q]),
            (p + "post_attention_layernorm.weight", [m.hidden]),
            (p + "mlp.gate_proj.weight", [m.intermediate, m.hidden]),
            (p + "mlp.up_proj.weight", [m.intermediate, m.hidden]),
            (p + "mlp.down_proj.weight", [m.hidden, m.intermediate]),
        ]
    specs.append(("model.norm.weight", [m.hidden]))
    return specs


def param_count(m: ModelShape) -> int:
    return sum(math.prod(s) for _, s in tensor_specs(m))


# --- loaders: what each row calls, and which file it reads -------------------------------------


@dataclass(frozen=True)
class LoaderInfo:
    name: str
    kind: str  # "ours" | "ours-copy" (CPU only: the same loader forced to copy) | "peer"
    file: str  # "safetensors" | "flat" | "tensorizer"
    dist: str  # distribution whose version is recorded
    module: str  # module imported to probe availability
    api: str


LOADERS: list[LoaderInfo] = [
    LoaderInfo(
        "fastvllm",
        "ours",
        "flat",
        "fastvllm",
        "fastvllm.weights.loader",
        "fastvllm.weights.loader.load(path, device=dev, threads=T) -> (dict, LoadStats)",
    ),
    LoaderInfo(
        "fastvllm (copy)",
        "ours-copy",
        "flat",
        "fastvllm",
        "fastvllm.weights.loader",
        'fastvllm.weights.loader.load(path, device="cpu", threads=T, mode="copy"): private memory',
    ),
    LoaderInfo(
        "safetensors.load_file",
        "peer",
        "safetensors",
        "safetensors",
        "safetensors.torch",
        "safetensors.torch.load_file(path, device=dev)",
    ),
    LoaderInfo(
        "safetensors.safe_open",
        "peer",
        "safetensors",
        "safetensors",
        "safetensors",
        'safe_open(path, framework="pt", device=dev); {k: f.get_tensor(k) for k in f.keys()}',
    ),
    LoaderInfo(
        "fastsafetensors",
        "peer",
        "safetensors",
        "fastsafetensors",
        "fastsafetensors",
        "SafeTensorsFileLoader(None, dev, nogds=(dev=='cpu'), max_threads=T); add_filenames({0: [path]}); "
        "fb = copy_files_to_device(); {k: fb.get_tensor(k) for k in get_keys()}",
    ),
    LoaderInfo(
        "runai-model-streamer",
        "peer",
        "safetensors",
        "runai-model-streamer",
        "runai_model_streamer",
        "RUNAI_STREAMER_CONCURRENCY=T; with SafetensorsStreamer() as s: s.stream_file(path, device=dev); "
        "dict(s.get_tensors())",
    ),
    LoaderInfo(
        "tensorizer",
        "peer",
        "tensorizer",
        "tensorizer",
        "tensorizer",
        "TensorDeserializer(path, device=dev, num_readers=T, lazy_load=False); dict(d.items())",
    ),
    LoaderInfo(
        "instanttensor",
        "peer",
        "safetensors",
        "instanttensor",
        "instanttensor",
        'instanttensor.safe_open(path, framework="pt", device=dev); dict(f.tensors())',
    ),
]
BY_NAME = {li.name: li for li in LOADERS}
ALIASES = {
    "safetensors": ["safetensors.load_file", "safetensors.safe_open"],
    "runai": ["runai-model-streamer"],
    "runai_model_streamer": ["runai-model-streamer"],
}
FILE_NAMES = {"safetensors": "model.safetensors", "flat": "model.fvw", "tensorizer": "model.tensors"}


def select_loaders(peers: str) -> list[LoaderInfo]:
    """Ours plus the peers named in a comma list ('all' or '' = every peer, 'none' = ours only)."""
    words = [w.strip() for w in peers.split(",") if w.strip()]
    if not words or words == ["all"]:
        return list(LOADERS)
    names: list[str] = ["fastvllm", "fastvllm (copy)"]
    for w in words:
        if w == "none":
            continue
        got = ALIASES.get(w, [w])
        for n in got:
            if n not in BY_NAME:
                raise SystemExit(f"unknown peer {w!r}; known: {', '.join([*BY_NAME, *ALIASES])}")
            if n not in names:
                names.append(n)
    return [li for li in LOADERS if li.name in names]


# --- weights: generation, conversion, the stamp -------------------------------------------------


def make_tensor(seed: int, index: int, shape: list[int]) -> Any:
    """The index-th tensor of the model: seeded N(0, 0.02) in bf16, reproducible on any run."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def _bytes_of(t: Any) -> Any:
    import torch

    return t.detach().contiguous().view(-1).view(torch.uint8).numpy()


def write_safetensors(
    path: Path, specs: list[tuple[str, list[int]]], seed: int, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Stream a safetensors file tensor by tensor (memory stays at one tensor); returns digests."""
    import xxhash

    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": f"bench_weights seed={seed}"}}
    off = 0
    for name, shape in specs:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    out: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for i, (name, shape) in enumerate(specs):
            t = make_tensor(seed, i, shape)
            b = _bytes_of(t)
            f.write(memoryview(b))
            out.append(
                {
                    "name": name,
                    "shape": shape,
                    "dtype": "bfloat16",
                    "nbytes": int(b.nbytes),
                    "xxh3_64": xxhash.xxh3_64_hexdigest(b),
                }
            )
            if time.monotonic() - t0 > 10 or i == len(specs) - 1:
                say(f"  generated {i + 1}/{len(specs)} tensors")
                t0 = time.monotonic()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return out


def mmap_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a bf16 safetensors file as copy-on-write mmap views (no anonymous memory)."""
    import numpy as np
    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    whole = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    out: dict[str, Any] = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] != "BF16":
            raise ValueError(f"{path}: {name} is {h['dtype']}, expected BF16")
        b, e = h["data_offsets"]
        out[name] = whole[base + b : base + e].view(torch.bfloat16).view(h["shape"])
    return out


def stamp_path(workdir: Path, size: str) -> Path:
    return workdir / size / "stamp.json"


def read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def file_ok(d: Path, stamp: dict[str, Any] | None, kind: str) -> bool:
    """Is the `kind` file recorded in the stamp and present with its recorded size?"""
    if not stamp or kind not in stamp.get("files", {}):
        return False
    p = d / FILE_NAMES[kind]
    return p.is_file() and p.stat().st_size == stamp["files"][kind]["size"]


def prepare_weights(
    workdir: Path, size: str, seed: int, need: set[str], say: Callable[[str], None]
) -> dict[str, Any]:
    """Make (or reuse) the files under workdir/size; returns the stamp."""
    m = SIZES[size]
    d = workdir / size
    d.mkdir(parents=True, exist_ok=True)
    sp = stamp_path(workdir, size)
    stamp = read_stamp(sp)
    want = {"schema": SCHEMA, "model": asdict(m), "seed": seed}
    if stamp and any(stamp.get(k) != v for k, v in want.items()):
        stamp = None
    if not file_ok(d, stamp, "safetensors"):
        say(
            f"weights: generating {size} ({param_count(m) / 1e9:.2f}B params, "
            f"{param_count(m) * 2 / 1e9:.2f} GB bf16) into {d / FILE_NAMES['safetensors']}"
        )
        for kind in FILE_NAMES:
            (d / FILE_NAMES[kind]).unlink(missing_ok=True)
        t0 = time.perf_counter()
        tensors = write_safetensors(d / FILE_NAMES["safetensors"], tensor_specs(m), seed, say)
        stamp = {**want, "tensors": tensors, "total_bytes": sum(t["nbytes"] for t in tensors), "files": {}}
        stamp["files"]["safetensors"] = {
            "size": (d / FILE_NAMES["safetensors"]).stat().st_size,
            "seconds_to_make": round(time.perf_counter() - t0, 2),
        }
        _write_json(sp, stamp)
    else:
        say(f"weights: reusing {d / FILE_NAMES['safetensors']}")
    assert stamp is not None
    for kind in ("flat", "tensorizer"):
        if kind not in need:
            continue
        if file_ok(d, stamp, kind):
            say(f"weights: reusing {d / FILE_NAMES[kind]}")
            continue
        say(f"weights: converting to {kind} ({d / FILE_NAMES[kind]})")
        t0 = time.perf_counter()
        try:
            convert(d / FILE_NAMES["safetensors"], d / FILE_NAMES[kind], kind, stamp)
        except Exception as e:  # a peer that cannot convert is reported as skipped, not fatal
            stamp.setdefault("convert_errors", {})[kind] = one_line(e)
            say(f"weights: converting to {kind} failed: {one_line(e)}")
            continue
        stamp.setdefault("convert_errors", {}).pop(kind, None)
        stamp["files"][kind] = {
            "size": (d / FILE_NAMES[kind]).stat().st_size,
            "seconds_to_make": round(time.perf_counter() - t0, 2),
        }
        _write_json(sp, stamp)
    return stamp


def convert(src: Path, dst: Path, kind: str, stamp: dict[str, Any]) -> None:
    """Write `dst` in format `kind` from the safetensors file, through mmap views of it."""
    views = mmap_safetensors(src)
    tensors = {t["name"]: views[t["name"]] for t in stamp["tensors"]}
    if kind == "flat":
        from fastvllm.weights import fileformat

        fileformat.write(
            dst, tensors, meta={"source": "bench_weights", "model": stamp["model"], "seed": stamp["seed"]}
        )
    elif kind == "tensorizer":
        from tensorizer import TensorSerializer

        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        ser = TensorSerializer(str(tmp))
        ser.write_state_dict(tensors)
        ser.close()
        os.replace(tmp, dst)
    else:
        raise ValueError(f"unknown format {kind}")


# --- reading: the bound, and warming a file -----------------------------------------------------


def make_buffers(threads: int, chunk: int = READ_CHUNK) -> list[memoryview]:
    """One read buffer per thread, written once so their pages exist before anything is timed."""
    bufs = [memoryview(bytearray(chunk)) for _ in range(max(1, threads))]
    for b in bufs:
        b[::4096] = b"\1" * len(range(0, chunk, 4096))
    return bufs


def read_parallel(path: Path, threads: int, bufs: list[memoryview] | None = None) -> int:
    """Read the whole file with `threads` threads, preadv into one reused buffer per thread."""
    bufs = bufs or make_buffers(threads)
    chunk = bufs[0].nbytes
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work(buf: memoryview) -> int:
        done = 0
        while True:
            off = next(counter) * chunk
            if off >= size:
                return done
            want = min(chunk, size - off)
            got = 0
            while got < want:
                n = os.preadv(fd, [buf[got:want]], off + got)
                if n <= 0:
                    raise OSError(f"{path}: short read at {off + got}")
                got += n
            done += got

    try:
        with ThreadPoolExecutor(max_workers=len(bufs)) as pool:
            return sum(pool.map(work, bufs))
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    try:
        from fastvllm.prefetch import residency

        return round(residency.resident_fraction(path), 4)
    except Exception:
        return None


def drop_page_cache() -> bool:
    from fastvllm.runtime import system

    return system.drop_page_cache()


# --- the child: one timed load, checked ---------------------------------------------------------


def _device(dev: str) -> str:
    import torch

    if dev.startswith("cuda") and ":" not in dev:
        return f"cuda:{torch.cuda.current_device()}"
    return dev


def _sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _touch(tensors: dict[str, Any]) -> None:
    """Read one byte of every 4 KiB page of every CPU tensor (faults in what an mmap left lazy)."""
    import torch

    for t in tensors.values():
        if t.device.type == "cpu" and t.numel():
            b = t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else t.contiguous()
            b[::4096].sum()


def _load_fastvllm(
    path: str, dev: str, threads: int, mode: str = "auto"
) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from fastvllm.weights import fileformat, loader

    if hasattr(loader, "load"):
        kw: dict[str, Any] = {"mode": mode} if mode != "auto" else {}
        threads = threads or loader.DEFAULT_THREADS  # 0: the loader's tuned default
        tensors, stats = loader.load(path, device=dev, threads=threads, **kw)
        info = {"direct": getattr(stats, "direct", None), "mapped": getattr(stats, "mapped", False)}
        return tensors, {**info, "entry": "load"}
    # The loader before load() existed: allocate, then fill CPU tensors (copied over on CUDA).
    idx = fileformat.read_index(Path(path))
    out: dict[str, Any] = {}
    for e in idx.tensors:
        out[e.name] = out[e.alias_of] if e.alias_of else torch.empty(e.shape, dtype=getattr(torch, e.dtype))
    loader.load_into(Path(path), out, threads=threads)
    if dev != "cpu":
        out = {k: v.to(dev, non_blocking=True) for k, v in out.items()}
    return out, {"entry": "load_into (fallback)"}


def _load_st_file(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    return load_file(path, device=dev), {}


def _load_st_open(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=dev) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {}  # noqa: SIM118 (safe_open has no __iter__)


_KEEP: list[Any] = []  # loader objects that own the returned tensors' memory; closed after the check


def _load_fastsafetensors(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from fastsafetensors import SafeTensorsFileLoader

    nogds = dev == "cpu"
    ld = SafeTensorsFileLoader(None, dev, nogds=nogds, max_threads=threads)
    ld.add_filenames({0: [path]})
    fb = ld.copy_files_to_device()
    out = {k: fb.get_tensor(k) for k in ld.get_keys()}
    _KEEP.extend([fb, ld])
    return out, {"nogds": nogds, "max_threads": threads, "copier": getattr(ld.copier_class, "__name__", None)}


def _load_runai(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from runai_model_streamer import SafetensorsStreamer

    out: dict[str, Any] = {}
    with SafetensorsStreamer() as s:
        s.stream_file(path, device=dev)
        for name, t in s.get_tensors():
            out[name] = t if str(t.device) == dev else t.to(dev)
    return out, {"RUNAI_STREAMER_CONCURRENCY": os.environ.get("RUNAI_STREAMER_CONCURRENCY")}


def _load_tensorizer(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from tensorizer import TensorDeserializer

    d = TensorDeserializer(path, device=dev, num_readers=threads, lazy_load=False)
    out = dict(d.items())
    _KEEP.append(d)
    return out, {"num_readers": threads, "lazy_load": False}


def _load_instanttensor(path: str, dev: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from instanttensor import safe_open

    with safe_open(path, framework="pt", device=torch.device(dev)) as f:
        out = dict(f.tensors())
        backend = getattr(f, "backend", None)
    return out, {"backend": str(backend) if backend is not None else "auto"}


CHILD_LOADERS: dict[str, Callable[[str, str, int], tuple[dict[str, Any], dict[str, Any]]]] = {
    "fastvllm": _load_fastvllm,
    "fastvllm (copy)": lambda path, dev, threads: _load_fastvllm(path, dev, threads, mode="copy"),
    "safetensors.load_file": _load_st_file,
    "safetensors.safe_open": _load_st_open,
    "fastsafetensors": _load_fastsafetensors,
    "runai-model-streamer": _load_runai,
    "tensorizer": _load_tensorizer,
    "instanttensor": _load_instanttensor,
}


def check_tensors(tensors: dict[str, Any], stamp: dict[str, Any]) -> str | None:
    """None when every tensor is bit-exact; else what is wrong (one line)."""
    import torch
    import xxhash

    want = stamp["tensors"]
    names = {t["name"] for t in want}
    if set(tensors) != names:
        miss, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        return f"tensor names differ: missing {miss[:3]}, extra {extra[:3]}"
    for w in want:
        t = tensors[w["name"]]
        if list(t.shape) != w["shape"] or str(t.dtype) != f"torch.{w['dtype']}":
            return f"{w['name']}: got {t.dtype}{list(t.shape)}, expected {w['dtype']}{w['shape']}"
        if xxhash.xxh3_64_hexdigest(_bytes_of(t.cpu())) != w["xxh3_64"]:
            return f"{w['name']}: bytes differ from the generated weights (xxh3-64)"
    for i in sorted({0, len(want) // 2, len(want) - 1}):
        w = want[i]
        if not torch.equal(tensors[w["name"]].cpu(), make_tensor(stamp["seed"], i, w["shape"])):
            return f"{w['name']}: differs from the tensor regenerated from the seed"
    return None


def rss_anon() -> int | None:
    """This process's anonymous resident memory in bytes (private memory, not page-cache pages)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def child_load(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = spec["device"]
    if dev.startswith("cuda"):
        torch.cuda.init()
        dev = _device(dev)
        torch.empty(1, device=dev)  # context creation is not the loader's cost
    fn = CHILD_LOADERS[spec["loader"]]
    # Imports are not the load: every loader's module is imported before the clock starts.
    importlib.import_module(BY_NAME[spec["loader"]].module)
    stamp = json.loads(Path(spec["stamp"]).read_text())
    resident = resident_fraction(Path(spec["path"]))
    anon0 = rss_anon()
    t0 = time.perf_counter()
    tensors, info = fn(spec["path"], dev, spec["threads"])
    _sync(dev)
    if dev == "cpu":
        _touch(tensors)
    seconds = time.perf_counter() - t0
    anon1 = rss_anon()
    # On CPU: the share of the model that landed in private memory. Far below 1 means the tensors
    # are the page cache's own pages (an mmap): nothing was copied, so it is not the same work.
    private = None
    if dev == "cpu" and anon0 is not None and anon1 is not None:
        private = round((anon1 - anon0) / stamp["total_bytes"], 3)
    bad = check_tensors(tensors, stamp) if spec.get("check", True) else None
    for obj in _KEEP:
        close = getattr(obj, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
    res: dict[str, Any] = {
        "ok": bad is None,
        "seconds": seconds,
        "bytes": stamp["total_bytes"],
        "resident_before": resident,
        "private_fraction": private,
        "info": info,
    }
    if bad:
        res["wrong"] = bad
    return res


def child_read(spec: dict[str, Any]) -> dict[str, Any]:
    path = Path(spec["path"])
    resident = resident_fraction(path)
    bufs = make_buffers(spec["threads"])
    t0 = time.perf_counter()
    n = read_parallel(path, spec["threads"], bufs)
    return {"ok": True, "seconds": time.perf_counter() - t0, "bytes": n, "resident_before": resident}


def child_h2d(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = _device(spec["device"])
    src = torch.empty(spec["bytes"], dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(spec["bytes"], dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    vals = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        vals.append(spec["bytes"] / (time.perf_counter() - t0) / 1e9)
    return {"ok": True, "gbps": vals}


def child_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Which loaders import, and what the machine has (torch, GPU)."""
    import importlib

    import torch

    mods: dict[str, str | None] = {}
    for name in spec["loaders"]:
        try:
            importlib.import_module(BY_NAME[name].module)
            mods[name] = None
        except BaseException as e:
            mods[name] = one_line(e)
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {
        "ok": True,
        "import_errors": mods,
        "torch": torch.__version__,
        "gpu": gpu,
        "cuda_available": torch.cuda.is_available(),
    }


def child_main(raw: str) -> int:
    spec = json.loads(raw)
    ops = {"load": child_load, "read": child_read, "h2d": child_h2d, "probe": child_probe}
    try:
        res = ops[spec["op"]](spec)
    except BaseException as e:
        res = {"ok": False, "error": one_line(e), "trace": traceback.format_exc()[-2000:]}
    sys.stdout.flush()
    print(MARK + json.dumps(res), flush=True)
    return 0


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:400]


# --- the parent: runs children, aggregates, reports ---------------------------------------------


def run_child(spec: dict[str, Any], env: dict[str, str], timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Run one child in its own session; its last marked stdout line is the answer."""
    cmd = [sys.executable, "-m", "fastvllm.weights.bench", "--_one", json.dumps(spec)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"ok": False, "error": f"TimeoutExpired: no answer within {timeout:.0f} s"}
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
    why = tail[-1].strip() if tail else "no output"
    return {"ok": False, "error": f"child exited with status {p.returncode}: {why}"[:400]}


def median(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def bound_for(cond: str, read: dict[str, Any], h2d_gbps: float | None) -> float | None:
    """The bound of a condition: best read rate of that condition, capped by pinned H2D on CUDA."""
    r = read.get(cond, {}).get("max_gbps")
    if r is None:
        return None
    return min(r, h2d_gbps) if h2d_gbps is not None else r


def summarize(loaders: list[dict[str, Any]], bounds: dict[str, float | None]) -> dict[str, Any]:
    """Fill medians and percent of bound per loader and condition; ours against the fastest peer,
    and against the fastest peer that copied the weights into private memory (CPU: not an mmap)."""
    for ld in loaders:
        for cond, c in ld["conditions"].items():
            runs = [r for r in c.get("runs", []) if r.get("ok")]
            if c.get("status") != "ok" or not runs:
                continue
            c["median_gbps"] = round(median(r["gbps"] for r in runs) or 0.0, 4)
            c["median_seconds"] = round(median(r["seconds"] for r in runs) or 0.0, 4)
            b = bounds.get(cond)
            c["percent_of_bound"] = round(100 * c["median_gbps"] / b, 1) if b else None
            priv = [r["private_fraction"] for r in runs if r.get("private_fraction") is not None]
            if priv:
                c["private_fraction"] = round(median(priv) or 0.0, 3)
                c["zero_copy"] = bool(c["private_fraction"] < 0.5)
    ratio: dict[str, Any] = {}
    ours = next((ld for ld in loaders if ld["kind"] == "ours"), None)
    for cond in CONDITIONS:
        ours_g = ours["conditions"].get(cond, {}).get("median_gbps") if ours else None
        peers = [(ld["name"], ld["conditions"].get(cond, {})) for ld in loaders if ld["kind"] == "peer"]
        peers = [(n, c) for n, c in peers if c.get("median_gbps")]
        if not ours_g or not peers:
            ratio[cond] = None
            continue
        best = max(peers, key=lambda p: p[1]["median_gbps"])
        ratio[cond] = {
            "fastest_peer": best[0],
            "peer_gbps": best[1]["median_gbps"],
            "ours_gbps": ours_g,
            "ratio": round(ours_g / best[1]["median_gbps"], 2),
        }
        copying = [(n, c) for n, c in peers if not c.get("zero_copy")]
        if copying and len(copying) < len(peers):
            bc = max(copying, key=lambda p: p[1]["median_gbps"])
            ratio[cond]["fastest_copying_peer"] = bc[0]
            ratio[cond]["copying_peer_gbps"] = bc[1]["median_gbps"]
            ratio[cond]["ratio_to_copying"] = round(ours_g / bc[1]["median_gbps"], 2)
    return ratio


def machine_info(probe: dict[str, Any]) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions: dict[str, str | None] = {}
    for dist in [
        "torch",
        "safetensors",
        "fastsafetensors",
        "runai-model-streamer",
        "tensorizer",
        "instanttensor",
        "fastvllm",
        "numpy",
    ]:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": probe.get("gpu"),
        "torch": probe.get("torch"),
        "versions": versions,
    }


class Runner:
    """The benchmark's state while it runs: options, what each loader did so far."""

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.a = args
        self.say = say
        self.env = {**os.environ, "RUNAI_STREAMER_CONCURRENCY": str(args.threads), "PYTHONUNBUFFERED": "1"}

    def child(self, spec: dict[str, Any]) -> dict[str, Any]:
        return run_child(spec, self.env)

    def prepare(self, cond: str, path: Path, can_drop: bool) -> None:
        if cond == "cold":
            # In a VM, dropping the guest's cache leaves the host's: a file other loaders read a
            # moment ago comes back faster than one read long ago. Reading this file once before
            # the drop gives every loader's file the same host-side state.
            read_parallel(path, self.a.threads)
            drop_page_cache()
        else:
            if can_drop:
                drop_page_cache()  # only this file in the cache, so the destination memory fits
            read_parallel(path, self.a.threads)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    r = Runner(args, say)
    chosen = select_loaders(args.peers)
    if args.device.startswith("cuda"):  # on a GPU target our loader always copies: no second entry
        chosen = [li for li in chosen if li.kind != "ours-copy"]
    say(
        f"bench-weights: size={args.size} device={args.device} reps={args.reps} threads={args.threads} "
        f"loaders={', '.join(li.name for li in chosen)}"
    )
    probe = r.child({"op": "probe", "loaders": [li.name for li in chosen]})
    if not probe.get("ok"):
        raise SystemExit(f"probe failed: {probe.get('error')}")
    need = {li.file for li in chosen if probe["import_errors"].get(li.name) is None}
    stamp = prepare_weights(args.workdir, args.size, args.seed, need, say)
    d = args.workdir / args.size
    total = stamp["total_bytes"]
    can_drop = drop_page_cache()
    cold_reason = None if can_drop else "cannot drop the page cache (needs root and /proc/sys/vm/drop_caches)"
    if args.no_cold:
        cold_reason = "--no-cold"
    conds = [c for c in CONDITIONS if not (c == "cold" and cold_reason)]
    say(
        f"weights: {len(stamp['tensors'])} tensors, {total / 1e9:.3f} GB; page cache "
        f"{'can' if can_drop else 'CANNOT'} be dropped"
    )

    versions = machine_info({})["versions"]
    loaders: list[dict[str, Any]] = []
    for li in chosen:
        ld: dict[str, Any] = {
            "name": li.name,
            "kind": li.kind,
            "api": li.api,
            "file": str(d / FILE_NAMES[li.file]),
            "version": versions.get(li.dist),
            "status": "ok",
            "reason": None,
            "conditions": {},
        }
        err = probe["import_errors"].get(li.name)
        conv = stamp.get("convert_errors", {}).get(li.file)
        if err or conv or not file_ok(d, stamp, li.file):
            ld["status"] = "skipped"
            ld["reason"] = f"import failed: {err}" if err else f"converting its file failed: {conv}"
        for cond in CONDITIONS:
            if cond == "cold" and cold_reason:
                ld["conditions"][cond] = {"status": "not_measured", "reason": cold_reason, "runs": []}
            else:
                ld["conditions"][cond] = {
                    "status": "ok" if ld["status"] == "ok" else ld["status"],
                    "runs": [],
                }
        loaders.append(ld)

    read: dict[str, Any] = {c: {"runs": []} for c in CONDITIONS}
    h2d: dict[str, Any] | None = None
    if args.device.startswith("cuda"):
        say("bound: pinned host-to-device copy of 1 GiB")
        res = r.child({"op": "h2d", "device": args.device, "bytes": H2D_BYTES, "reps": 5})
        h2d = {"gbps": res.get("gbps"), "error": res.get("error")}
        if res.get("ok"):
            h2d["max_gbps"] = round(max(res["gbps"]), 3)
            h2d["median_gbps"] = round(statistics.median(res["gbps"]), 3)
            say(f"  h2d: max {h2d['max_gbps']:.2f} GB/s, median {h2d['median_gbps']:.2f} GB/s")
    bound_file = d / FILE_NAMES["safetensors"]
    t_start = time.monotonic()
    for rep in range(1, args.reps + 1):
        for cond in conds:
            r.prepare(cond, bound_file, can_drop)
            at = round(time.monotonic() - t_start, 1)
            res = r.child({"op": "read", "path": str(bound_file), "threads": args.threads})
            res.update(rep=rep, at_s=at)
            if res.get("ok"):
                res["gbps"] = res["bytes"] / res["seconds"] / 1e9
                say(
                    f"rep {rep}/{args.reps} {cond:4s} bound (parallel preadv, {args.threads} threads): "
                    f"{res['gbps']:.2f} GB/s (resident before: {res['resident_before']})"
                )
            else:
                say(f"rep {rep}/{args.reps} {cond:4s} bound: FAILED {res.get('error')}")
            read[cond]["runs"].append(res)
            # The order rotates from rep to rep, so a slow spell of the disk does not always hit the
            # same loaders (cold reads on a virtual disk vary a lot over minutes).
            pairs = list(zip(loaders, chosen, strict=True))
            k = (rep - 1) % len(pairs)
            for ld, li in pairs[k:] + pairs[:k]:
                c = ld["conditions"][cond]
                if c["status"] != "ok":
                    continue
                path = d / FILE_NAMES[li.file]
                r.prepare(cond, path, can_drop)
                spec = {
                    "op": "load",
                    "loader": li.name,
                    "path": str(path),
                    "device": args.device,
                    # Each loader runs as tuned: ours with its own default reader count
                    # (--our-threads overrides), the peers that take one with --threads.
                    "threads": (args.our_threads or 0) if li.kind == "ours" else args.threads,
                    "stamp": str(stamp_path(args.workdir, args.size)),
                }
                at = round(time.monotonic() - t_start, 1)
                res = r.child(spec)
                res.update(rep=rep, at_s=at)
                tag = f"rep {rep}/{args.reps} {cond:4s} {li.name:22s}"
                if res.get("ok"):
                    res["gbps"] = total / res["seconds"] / 1e9
                    c["runs"].append(res)
                    say(
                        f"{tag} {res['gbps']:7.2f} GB/s ({res['seconds']:.2f} s, resident before: "
                        f"{res['resident_before']})"
                    )
                elif res.get("wrong"):  # wrong bytes: reported as failed, never timed
                    ld["status"] = "failed"
                    ld["reason"] = f"wrong bytes ({cond}, rep {rep}): {res['wrong']}"
                    say(f"{tag} FAILED: {ld['reason']}")
                else:
                    ld["status"] = (
                        "skipped" if not any(x["runs"] for x in ld["conditions"].values()) else "failed"
                    )
                    ld["reason"] = f"cannot run ({cond}, rep {rep}): {res.get('error')}"
                    say(f"{tag} {ld['status'].upper()}: {ld['reason']}")
                if ld["status"] != "ok":
                    for cc in ld["conditions"].values():
                        if cc["status"] == "ok":
                            cc["status"] = ld["status"]
                            cc["reason"] = ld["reason"]
                            cc["runs"] = []  # a loader that returned wrong bytes is not timed at all
    for cond in CONDITIONS:
        ok = [x["gbps"] for x in read[cond]["runs"] if x.get("ok")]
        read[cond]["gbps"] = [round(g, 4) for g in ok]
        read[cond]["max_gbps"] = round(max(ok), 4) if ok else None
        read[cond]["median_gbps"] = round(statistics.median(ok), 4) if ok else None
        if cond == "cold" and cold_reason:
            read[cond]["reason"] = cold_reason
    h2d_bound = h2d.get("max_gbps") if h2d else None
    bounds = {c: bound_for(c, read, h2d_bound) for c in CONDITIONS}
    ratio = summarize(loaders, bounds)
    return {
        "benchmark": "weights",
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(probe),
        "config": {
            "size": args.size,
            "device": args.device,
            "reps": args.reps,
            "threads": args.threads,
            "our_threads": args.our_threads or "loader default",
            "model": stamp["model"],
            "params": total // 2,
            "total_bytes": total,
            "tensors": len(stamp["tensors"]),
            "seed": stamp["seed"],
            "workdir": str(d),
            "files": {k: {"path": str(d / FILE_NAMES[k]), **v} for k, v in stamp["files"].items()},
            "cold": cold_reason is None,
            "method": (
                "each (loader, condition, rep) in a fresh process, the loader's module imported before "
                "the clock starts; timed: the load call until every "
                "tensor is on the device (CUDA synchronised; CPU: one byte of every 4 KiB page read); "
                "cold: the loader's file read once (so that, in a VM, every file meets the same host-side"
                " cache), then the page cache dropped, before the process starts; warm: cache dropped, "
                "then the loader's file read once; bound: parallel preadv of the safetensors file with "
                "the same threads into reused 16 MiB buffers (max over reps), capped by pinned H2D (max "
                "of 5) on CUDA; loaders: median over reps, their order rotated each rep; every tensor "
                "checked by xxh3-64 and three bit for bit against the seed, outside the timed region; "
                "CPU: private_fraction = growth of the process's anonymous memory / model bytes "
                "(zero_copy when under 0.5: the tensors are mmap'd page-cache pages)"
            ),
        },
        "bounds": {"read": read, "h2d": h2d, "bound_gbps": bounds},
        "loaders": loaders,
        "skipped": [
            {"name": ld["name"], "status": ld["status"], "reason": ld["reason"]}
            for ld in loaders
            if ld["status"] != "ok"
        ],
        "ratio_ours_to_fastest_peer": ratio,
    }


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = doc["config"]
    b = doc["bounds"]["bound_gbps"]
    t = Table(
        title=f"Weight loaders, {cfg['size']} ({cfg['total_bytes'] / 1e9:.2f} GB bf16) → {cfg['device']}, "
        f"{cfg['threads']} threads, median of {cfg['reps']}"
    )
    for col, just in [
        ("loader", "left"),
        ("cold GB/s", "right"),
        ("% bound", "right"),
        ("warm GB/s", "right"),
        ("% bound", "right"),
        ("cold s", "right"),
        ("warm s", "right"),
        ("status", "left"),
    ]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]  # rich's Literal; these are its values
    t.add_row(
        "bound",
        _fmt(b.get("cold")),
        "100",
        _fmt(b.get("warm")),
        "100",
        "",
        "",
        "parallel preadv" + (" ∧ pinned H2D" if doc["bounds"]["h2d"] else ""),
        style="dim",
    )
    for ld in doc["loaders"]:
        c, w = ld["conditions"]["cold"], ld["conditions"]["warm"]
        name = f"[bold]{ld['name']}[/]" if ld["kind"].startswith("ours") else ld["name"]
        if c.get("zero_copy") or w.get("zero_copy"):
            name += " *"
        t.add_row(
            name,
            _fmt(c.get("median_gbps")),
            _fmt(c.get("percent_of_bound"), ".0f"),
            _fmt(w.get("median_gbps")),
            _fmt(w.get("percent_of_bound"), ".0f"),
            _fmt(c.get("median_seconds"), ".3f"),
            _fmt(w.get("median_seconds"), ".3f"),
            ld["status"],
        )
    con = Console(width=max(120, Console().width))
    con.print(t)
    for ld in doc["loaders"]:
        if ld["reason"]:
            con.print(f"{ld['name']} {ld['status']}: {ld['reason']}", markup=False)
    cold = doc["bounds"]["read"]["cold"].get("reason")
    if cold:
        con.print(f"cold page cache not measured: {cold}", markup=False)
    if any(c.get("zero_copy") for ld in doc["loaders"] for c in ld["conditions"].values()):
        con.print(
            "* zero-copy: the returned CPU tensors are mmap'd page-cache pages (under half of the model "
            "landed in private memory), so warm it maps rather than copies",
            markup=False,
        )
    for cond, r in doc["ratio_ours_to_fastest_peer"].items():
        if r:
            line = (
                f"{cond}: fastvllm {r['ours_gbps']:.2f} GB/s = {r['ratio']:.2f}x the fastest peer "
                f"({r['fastest_peer']}, {r['peer_gbps']:.2f} GB/s)"
            )
            if "fastest_copying_peer" in r:
                line += (
                    f", {r['ratio_to_copying']:.2f}x the fastest copying peer "
                    f"({r['fastest_copying_peer']}, {r['copying_peer_gbps']:.2f} GB/s)"
                )
            con.print(line)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    lds = doc["loaders"]
    fig, ax = plt.subplots(figsize=(max(8, 1.45 * len(lds)), 5))
    colors = {"cold": "#4c72b0", "warm": "#dd8452"}
    w = 0.38
    top = 0.0
    for j, cond in enumerate(CONDITIONS):
        xs, ys, hatches = [], [], []
        for i, ld in enumerate(lds):
            c = ld["conditions"][cond]
            if c.get("median_gbps") is not None:
                xs.append(i + (j - 0.5) * w)
                ys.append(c["median_gbps"])
                hatches.append("//" if c.get("zero_copy") else "")
        bars = ax.bar(xs, ys, w, label=f"{cond} page cache", color=colors[cond], edgecolor="white")
        for bar, h in zip(bars, hatches, strict=True):
            bar.set_hatch(h)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        top = max([top, *ys])
        bnd = doc["bounds"]["bound_gbps"].get(cond)
        if bnd:
            ax.axhline(bnd, ls="--", color=colors[cond], lw=1.2, label=f"{cond} bound {bnd:.2f} GB/s")
            top = max(top, bnd)
    trans = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, ld in enumerate(lds):
        if ld["status"] != "ok":
            ax.text(i, 0.5, ld["status"], ha="center", fontsize=9, color="gray", transform=trans)
    ax.set_xticks(range(len(lds)))
    ax.set_xticklabels([ld["name"].replace(".", ".\n", 1) for ld in lds], fontsize=8)
    if any(c.get("zero_copy") for ld in lds for c in ld["conditions"].values()):
        ax.text(
            0.01,
            0.98,
            "hatched: zero-copy mmap (tensors are page-cache pages, nothing copied)",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            color="dimgray",
        )
    ax.set_ylabel("GB/s (tensor bytes / load time)")
    m = doc["machine"]
    dev = (
        m["gpu"]["name"] if cfg["device"].startswith("cuda") and m.get("gpu") else f"CPU, {m['cores']} cores"
    )
    ax.set_title(
        f"Weight loading, {cfg['size']} model ({cfg['total_bytes'] / 1e9:.2f} GB) → {cfg['device']} "
        f"({dev}), median of {cfg['reps']}",
        fontsize=10,
    )
    vals = [
        c["median_gbps"] for ld in lds for c in ld["conditions"].values() if c.get("median_gbps") is not None
    ]
    if vals and max(vals) / max(min(vals), 1e-9) > 20:  # an mmap row dwarfs the rest: log scale
        ax.set_yscale("log")
        ax.set_ylim(min(vals) / 2, top * 3)
    else:
        ax.set_ylim(0, top * 1.3 if top else 1)
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="3b", help="3b (~6.4 GB bf16) or tiny (~100 MB)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="reader threads for the read bound and the peers that take a count",
    )
    p.add_argument(
        "--our-threads", type=int, default=None, help="fastvllm's reader threads (default: the loader's own)"
    )
    p.add_argument(
        "--peers",
        default="all",
        help="comma list: safetensors,fastsafetensors,runai,tensorizer,"
        "instanttensor (or the row names); 'none' = ours only",
    )
    p.add_argument("--out", type=Path, default=Path("results/weights"))
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--no-cold", action="store_true", help="warm page cache only")
    p.add_argument("--json", action="store_true", help="print the JSON only (progress goes to stderr)")
    p.add_argument("--_one", dest="one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is None:
        a.device = a.device or default_device()
        if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
            p.error("--device must be cpu or cuda")
        if a.reps < 1 or a.threads < 1:
            p.error("--reps and --threads must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.one is not None:
        return child_main(a.one)
    stream = sys.stderr if a.json else sys.stdout

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=stream, flush=True)

    doc = run(a, say)
    stem = f"weights-{a.device.split(':')[0]}-{a.size}"
    _write_json(a.out / f"{stem}.json", doc)
    say(f"wrote {a.out / (stem + '.json')}")
    try:
        plot(doc, a.out / f"{stem}.png")
        say(f"wrote {a.out / (stem + '.png')}")
    except Exception as e:  # e.g. no matplotlib on a GPU host: the JSON and the table still count
        say(f"no chart: {one_line(e)}")
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
