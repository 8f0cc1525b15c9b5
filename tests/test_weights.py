"""The flat weight file and the loader: bit-exact round trips, and clear errors before any
tensor is written. Pure logic on CPU tensors, no vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastvllm.runtime import config
from fastvllm.runtime.errors import IntegrityError, UsageError
from fastvllm.weights import fileformat, loader

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8, torch.int32, torch.bool]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype in (torch.int8, torch.uint8, torch.int32):
        return torch.randint(-128 if dtype != torch.uint8 else 0, 127, shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randn(shape, generator=g).to(dtype)


def _model(g: torch.Generator) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(DTYPES):
        t[f"w{i}"] = _rand((37, 129), dt, g)  # odd shapes, not page multiples
    t["big"] = _rand((1024, 1100), torch.bfloat16, g)
    t["transposed"] = _rand((64, 48), torch.float32, g).t()  # non-contiguous
    t["empty"] = torch.empty((0, 16), dtype=torch.float16)
    t["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    t["embed"] = _rand((100, 32), torch.bfloat16, g)
    t["lm_head"] = t["embed"]  # tied
    return t


def _blank_like(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in src.items():
        if k == "lm_head":
            out[k] = out["embed"]
        elif k == "transposed":
            out[k] = torch.zeros((64, 48), dtype=v.dtype).t()
        else:
            out[k] = torch.zeros_like(v)
    return out


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    src = _model(g)
    path = tmp_path / "w.fvw"
    idx = fileformat.write(path, src)
    assert idx.data_offset % fileformat.ALIGN == 0
    assert all(e.offset % fileformat.ALIGN == 0 for e in idx.tensors)
    assert idx.by_name()["lm_head"].alias_of == "embed"
    dst = _blank_like(src)
    stats = loader.load_into(path, dst, threads=3, chunk=64 << 10, verify=True)
    assert stats.tensors == len(src)
    for k in src:
        a, b = src[k].contiguous(), dst[k].contiguous()
        assert a.shape == b.shape and a.dtype == b.dtype, k
        assert bytes(a.view(-1).view(torch.uint8).numpy()) == bytes(b.view(-1).view(torch.uint8).numpy()), k
        assert dst[k].stride() == src[k].stride()
    assert dst["lm_head"].data_ptr() == dst["embed"].data_ptr()
    assert fileformat.verify(path).data_xxh3_128 == idx.data_xxh3_128


def test_shape_mismatch_fails_before_writing(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    src = {"a": _rand((8, 8), torch.float32, g), "b": _rand((4,), torch.float32, g)}
    fileformat.write(tmp_path / "w", src)
    dst = {"a": torch.zeros(8, 8), "b": torch.zeros(5)}
    with pytest.raises(UsageError, match=r"weight b: file has float32\[4\], model has float32\[5\]"):
        loader.load_into(tmp_path / "w", dst)
    assert not dst["a"].any()  # nothing was written


def test_other_model_fails(tmp_path: Path) -> None:
    fileformat.write(tmp_path / "w", {"a": torch.ones(4)})
    with pytest.raises(UsageError, match="does not match this model"):
        loader.load_into(tmp_path / "w", {"x": torch.zeros(4)})


def test_truncated_file_fails_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "w"
    fileformat.write(path, {"a": torch.ones(5000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    dst = {"a": torch.zeros(5000)}
    with pytest.raises(IntegrityError, match="truncated"):
        loader.load_into(path, dst)
    assert not dst["a"].any()


def test_flipped_byte_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "w"
    idx = fileformat.write(path, {"a": torch.ones(5000)})
    data = bytearray(path.read_bytes())
    data[idx.data_offset + 10] ^= 0x40
    path.write_bytes(bytes(data))
    dst = {"a": torch.zeros(5000)}
    with pytest.raises(IntegrityError, match="checksum"):
        loader.load_into(path, dst, verify=True)
    assert not dst["a"].any()  # checked before the first byte was written
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        fileformat.verify(path)


def test_not_a_weight_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello world, this is not it" * 10)
    with pytest.raises(UsageError, match="not a fastvllm weight file"):
        fileformat.read_index(tmp_path / "x")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


def test_o_direct_into_page_aligned_tensors(tmp_path: Path) -> None:
    """Forced O_DIRECT: aligned destinations take direct reads, odd tails go buffered."""
    g = torch.Generator().manual_seed(3)
    src = {"a": _rand((3000, 777), torch.bfloat16, g), "b": _rand((5,), torch.float32, g)}
    path = tmp_path / "w.fvw"
    fileformat.write(path, src)
    raw = torch.empty(src["a"].numel() * 2 + 8192, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 4096
    a = raw[start : start + src["a"].numel() * 2].view(torch.bfloat16).view(3000, 777)
    assert a.data_ptr() % 4096 == 0
    dst = {"a": a, "b": torch.zeros(5)}
    stats = loader.load_into(path, dst, direct=True, chunk=1 << 20, threads=2)
    assert stats.direct
    assert _same(dst["a"], src["a"]) and _same(dst["b"], src["b"])


@pytest.mark.parametrize("mode", ["copy", "map"])
def test_load_allocates_the_model(tmp_path: Path, mode: str) -> None:
    src = _model(torch.Generator().manual_seed(4))
    fileformat.write(tmp_path / "w", src)
    out, stats = loader.load(tmp_path / "w", "cpu", threads=2, chunk=8192, mode=mode)
    assert set(out) == set(src) and stats.bytes > 0
    assert stats.mapped == (mode == "map")
    assert all(_same(out[k], src[k]) for k in src)
    assert out["lm_head"] is out["embed"]


def test_mapped_tensors_are_copy_on_write(tmp_path: Path) -> None:
    src = _model(torch.Generator().manual_seed(8))
    path = tmp_path / "w"
    fileformat.write(path, src)
    before = path.read_bytes()
    out, _ = loader.load(path, "cpu", mode="map", verify=True)
    out["big"].fill_(1.0)  # a write copies the page; the file and other loads keep the weights
    assert path.read_bytes() == before
    again, _ = loader.load(path, "cpu")
    assert _same(again["big"], src["big"])


def test_mapped_load_checks_before_handing_out(tmp_path: Path) -> None:
    src = _model(torch.Generator().manual_seed(9))
    path = tmp_path / "w"
    idx = fileformat.write(path, src)
    raw = bytearray(path.read_bytes())
    raw[idx.data_offset + idx.by_name()["big"].offset + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="big"):
        loader.load(path, "cpu", mode="map", verify=True)
    with pytest.raises(UsageError, match="mode"):
        loader.load(path, "cuda:0", mode="map")


def test_spans_cover_every_byte_once(tmp_path: Path) -> None:
    src = _model(torch.Generator().manual_seed(5))
    idx = fileformat.write(tmp_path / "w", src)
    chunk = 64 << 10
    spans = loader.plan_spans(idx, {e.name: e.name for e in idx.tensors}, chunk)
    got: dict[str, int] = {}
    for s in spans:
        assert s.length <= chunk and s.file_off % 4096 == 0 and s.length % 4096 == 0
        for p in s.pieces:
            assert p.span_off + p.n <= s.length
            got[p.dst] = got.get(p.dst, 0) + p.n
    want = {e.name: e.nbytes for e in idx.tensors if e.alias_of is None and e.nbytes}
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the pinned double-buffer path)"
)
def test_gpu_round_trip_double_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _model(torch.Generator().manual_seed(6))
    path = tmp_path / "w"
    fileformat.write(path, src)
    for pin, direct in (("register", False), ("register", True), ("torch", False)):
        monkeypatch.setenv("FASTVLLM_PIN", pin)
        out, stats = loader.load(path, "cuda", threads=3, chunk=64 << 10, buffers=2, direct=direct)
        assert stats.device == "cuda"
        assert all(out[k].is_cuda and _same(out[k], src[k]) for k in src)
        assert out["lm_head"] is out["embed"]
    dst = {k: v.cuda() for k, v in _blank_like(src).items()}
    dst["lm_head"] = dst["embed"]
    loader.load_into(path, dst, chunk=64 << 10, buffers=2, verify=True)
    assert all(_same(dst[k], src[k]) for k in src)
    dst = {k: v.cuda() for k, v in _blank_like(src).items()}
    dst["lm_head"] = dst["embed"]
    mapped = loader.CopyTuning(reads=config.LoaderReads.MAPPED)
    loader.load_into(path, dst, chunk=64 << 10, buffers=2, direct=False, tuning=mapped)
    assert all(_same(dst[k], src[k]) for k in src)


def test_mapped_reads_copy_the_file_and_stop_at_its_end(tmp_path: Path) -> None:
    """The GPU readers' mapped source (FASTVLLM_LOADER_READS=mapped) copies the bytes a span
    names, and refuses a span past the file's end instead of faulting on it."""
    path = tmp_path / "w"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    m = loader._MappedFile(path)
    try:
        dst = torch.zeros(4096, dtype=torch.uint8)
        m.copy(dst.data_ptr(), 8192, 4096)
        assert bytes(dst.numpy()) == data[8192:12288]
        with pytest.raises(IntegrityError, match="ended early"):
            m.copy(dst.data_ptr(), len(data) - 100, 4096)
    finally:
        m.close()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    loader._MappedFile(empty).close()


def test_store_shares_one_file_per_model(tmp_path: Path) -> None:
    from fastvllm.weights import store

    src = _model(torch.Generator().manual_seed(7))
    a, b = tmp_path / "snap-a" / "model.fvw", tmp_path / "snap-b" / "model.fvw"
    for p in (a, b):
        p.parent.mkdir()
        fileformat.write(p, src)
    first, second = store.share(a, tmp_path / "store"), store.share(b, tmp_path / "store")
    assert first.key == second.key and first.store_path == second.store_path
    assert not first.deduplicated and second.deduplicated
    assert a.stat().st_ino == b.stat().st_ino == first.store_path.stat().st_ino  # type: ignore[union-attr]
    assert store.unused(tmp_path / "store") == []
    a.unlink()
    b.unlink()
    assert store.unused(tmp_path / "store") == [first.store_path]
    other = tmp_path / "other.fvw"
    fileformat.write(other, {"x": torch.ones(3)})
    assert store.share(other, tmp_path / "store").key != first.key


def test_residency_sees_evicted_and_read_files(tmp_path: Path) -> None:
    import os

    from fastvllm.prefetch import residency

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the page cache
        cold = residency.sampled_fraction(path, samples=64), residency.resident_fraction(path)
        path.read_bytes()
        warm = residency.sampled_fraction(path, samples=64), residency.resident_fraction(path)
    finally:
        os.close(fd)
    if cold[1] == 1.0:
        pytest.skip("the page cache could not be evicted here (tmpfs-like filesystem)")
    assert cold[0] < 0.5 and cold[1] < 0.5, cold
    assert warm == (1.0, 1.0)


def test_o_direct_reads_what_is_cached_from_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold load (O_DIRECT) of a file whose head is already in the page cache, as a restore's
    read-ahead leaves it: the head's ranges are read from the page cache, the rest from the
    disk, and the tensors come out exact either way."""
    import os

    from fastvllm.prefetch import residency

    g = torch.Generator().manual_seed(5)
    src = {"a": _rand((2048, 1024), torch.float32, g), "b": _rand((1024, 1024), torch.float32, g)}
    path = tmp_path / "w.fvw"
    fileformat.write(path, src)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, size // 2, 0, os.POSIX_FADV_DONTNEED)  # the tail leaves the cache
    finally:
        os.close(fd)
    pages = residency.page_map(path)
    if pages.count(0) == 0:
        pytest.skip("the page cache could not be evicted here (tmpfs-like filesystem)")
    assert residency.all_cached(pages, 0, 64 << 10) and not residency.all_cached(pages, 0, size)
    assert not residency.all_cached(pages, size - 4096, 4096)
    assert not residency.all_cached(pages, size, 4096)  # past the end: not cached
    kinds: list[str] = []
    real = loader._read_exact

    def spy(fd_: int, buf: memoryview, off: int, p: Path) -> None:
        kinds.append("direct" if os.O_DIRECT & _flags(fd_) else "cached")
        real(fd_, buf, off, p)

    monkeypatch.setattr(loader, "_read_exact", spy)
    raw = torch.empty(size + 8192, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 4096
    flat = raw[start : start + src["a"].numel() * 4 + src["b"].numel() * 4]
    dst = {
        "a": flat[: src["a"].numel() * 4].view(torch.float32).view(2048, 1024),
        "b": flat[src["a"].numel() * 4 :].view(torch.float32).view(1024, 1024),
    }
    stats = loader.load_into(path, dst, direct=True, chunk=1 << 20, threads=2)
    assert stats.direct and _same(dst["a"], src["a"]) and _same(dst["b"], src["b"])
    assert "cached" in kinds and "direct" in kinds


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
