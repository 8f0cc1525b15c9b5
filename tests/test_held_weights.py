"""Weights held in pinned memory by the agent (weights/held.py): what is held is the file's data
region, checked; what travels over the agent's socket is that memory's descriptor, to its
owner's processes; a stale or missing copy says why, so the worker reads the file instead.

The pinned memory itself is the CUDA driver's (runtime/shared_pinned.py, GPU hosts only: its
load is measured by the GPU bench); here a memfd holds the bytes, which exercises the same
filling, checking and descriptor passing."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from fastvllm.runtime import shared_pinned
from fastvllm.runtime.errors import IntegrityError, PinnedMemoryError, UsageError
from fastvllm.weights import fileformat, held


class _Memfd:
    """Shareable memory with an address and a descriptor, as SharedPinned has."""

    def __init__(self, n: int) -> None:
        self.fd = os.memfd_create("held-test")
        os.ftruncate(self.fd, n)
        self._mm = mmap.mmap(self.fd, n)
        self._anchor: Any = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(self._anchor)
        self.nbytes = n
        self.closed = False

    def close(self) -> None:
        self._anchor = None
        self._mm.close()
        os.close(self.fd)
        self.closed = True


# Small pieces, so that the test's file spans several and its tensors straddle them.
_PIECE = 24 << 10


def _weights(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t = {"a": torch.randn((300, 77), generator=g), "b": torch.randn(5000, generator=g).to(torch.bfloat16)}
    fileformat.write(path, t)
    return t


@pytest.fixture(autouse=True)
def _nothing_held_after() -> Any:
    yield
    held.announce(None)
    held.release_all()


def test_the_held_copy_is_the_files_data_region(tmp_path: Path) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    made: list[_Memfd] = []

    def make(n: int) -> _Memfd:
        made.append(_Memfd(n))
        return made[-1]

    h = held.hold(path, make=make, piece_bytes=_PIECE)
    idx = fileformat.read_index(path)
    data = path.read_bytes()[idx.data_offset : idx.file_size]
    assert h.data_bytes == len(data) and len(made) == -(-len(data) // _PIECE) > 2
    assert b"".join(ctypes.string_at(m.address, m.nbytes) for m in made) == data
    assert held.lookup(path) is h and held.held_files()[0]["bytes"] == len(data)
    assert held.socket_for(path) == ""  # held, but no socket announced: a restore asks no one
    held.announce(tmp_path / "agent.sock")
    assert held.socket_for(path) == str(tmp_path / "agent.sock")
    # the file changes: the copy is stale, dropped and its memory freed
    os.utime(path, ns=(1, 1))
    assert held.lookup(path) is None and all(m.closed for m in made)


def test_a_corrupt_file_is_not_held(tmp_path: Path) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    idx = fileformat.read_index(path)
    raw = bytearray(path.read_bytes())
    raw[idx.data_offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    made: list[_Memfd] = []

    def make(n: int) -> _Memfd:
        made.append(_Memfd(n))
        return made[-1]

    with pytest.raises(IntegrityError, match="does not match its checksum"):
        held.hold(path, make=make)
    assert not made and held.lookup(path) is None  # checked before any memory was pinned


def test_a_worker_gets_the_memory_by_descriptor_or_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    h = held.hold(path, make=_Memfd, piece_bytes=_PIECE)
    with held.serving(tmp_path / "a.sock") as sock:
        fds, meta = held.fetch(sock, str(path))
        try:
            idx = fileformat.read_index(path)
            held.check_meta(meta, path, idx)  # the same file, unchanged
            got = b""
            for fd, size in zip(fds, meta["piece_sizes"], strict=True):
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                    got += mm[:]
            assert got == path.read_bytes()[idx.data_offset : idx.file_size]
        finally:
            for fd in fds:
                os.close(fd)
        assert len(fds) == len(h.pieces) > 2
        with pytest.raises(held.NotHeld, match="layout differs"):
            held.check_meta({**meta, "piece_sizes": meta["piece_sizes"][:-1]}, path, idx)
        with pytest.raises(held.NotHeld, match="does not hold"):
            held.fetch(sock, str(tmp_path / "other.fvw"))
        meta["identity"] = [0]
        with pytest.raises(held.NotHeld, match="another version"):
            held.check_meta(meta, path, fileformat.read_index(path))
        # the file changed since it was held: the agent drops its copy and says it holds none
        os.utime(path, ns=(1, 1))
        with pytest.raises(held.NotHeld, match="does not hold"):
            held.fetch(sock, str(path))
        assert all(m.closed for m in h.pieces)  # type: ignore[attr-defined]  # the memfd stand-in
    assert not (tmp_path / "a.sock").exists()  # the socket goes with the block
    with pytest.raises(held.NotHeld, match="did not answer"):
        held.fetch(str(tmp_path / "a.sock"), str(path))


def test_holding_needs_a_gpu_host(tmp_path: Path) -> None:
    """On a host without the CUDA driver, `fastvllm agent --hold` refuses at start, saying why."""
    from fastvllm import resident

    if shared_pinned.unavailable() is None:
        pytest.skip("this host can hold weights (a GPU host): the refusal is for hosts without one")
    with pytest.raises(UsageError, match="cannot hold weights on this host"):
        resident.hold_weights([tmp_path], lambda _line: None)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the CUDA driver's pinned memory)"
)
def test_a_load_out_of_held_pinned_memory_is_bit_exact(tmp_path: Path) -> None:
    """On a GPU host: the weights held in the driver's shared pinned memory, fetched over a
    socket, mapped for the device and copied into CUDA tensors, bit for bit."""
    path = tmp_path / "w.fvw"
    src = _weights(path)
    if why := shared_pinned.unavailable():
        pytest.skip(f"this GPU host cannot share pinned memory: {why}")
    held.hold(path, piece_bytes=_PIECE)  # several pieces, tensors straddling them
    dst = {k: torch.zeros_like(v, device="cuda") for k, v in src.items()}
    idx = fileformat.read_index(path)
    with held.serving(tmp_path / "a.sock") as sock:
        got = held.load_into(sock, path, dst, idx)
    assert got.bytes == sum(v.numel() * v.element_size() for v in src.values())
    assert all(torch.equal(dst[k].cpu().view(torch.uint8), src[k].view(torch.uint8)) for k in src)


def test_a_large_file_is_held_in_as_many_pieces_as_one_message_passes() -> None:
    assert held.piece_size(5 << 30) == held.PIECE_BYTES
    big = 200 << 30  # 800 pieces of 256 MiB: too many descriptors for one message
    p = held.piece_size(big)
    assert p % (8 << 20) == 0 and -(-big // p) <= 250
    assert held.piece_size(250 * held.PIECE_BYTES) == held.PIECE_BYTES  # exactly 250 pieces
    assert -(-(250 * held.PIECE_BYTES + 1) // held.piece_size(250 * held.PIECE_BYTES + 1)) <= 250


def test_copies_are_split_where_tensors_straddle_pieces() -> None:
    """The worker's copies out of a 42-byte region in pieces of 10 (the last one short): a
    tensor ending on a boundary, one starting on one, one across three pieces, an empty one,
    one ending the region."""
    got = held.segments([(0, 1000, 10), (10, 2000, 25), (35, 3000, 0), (35, 4000, 7)], 10, 42)
    assert got == [
        [(0, 1000, 10)],
        [(0, 2000, 10)],
        [(0, 2010, 10)],
        [(0, 2020, 5), (5, 4000, 5)],
        [(0, 4005, 2)],
    ]
    with pytest.raises(held.NotHeld, match="outside the held"):
        held.segments([(38, 1, 5)], 10, 42)  # past the region's end
    with pytest.raises(held.NotHeld, match="outside the held"):
        held.segments([(-4, 1, 2)], 10, 42)  # a damaged index's negative offset
    assert held.segments([], 10, 0) == [[]]  # an empty region: one piece, nothing to copy


def test_a_layout_the_index_does_not_describe_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    idx = fileformat.read_index(path)
    h = held.hold(path, make=_Memfd, piece_bytes=_PIECE)
    meta = h.meta()
    held.check_meta(meta, path, idx)
    bad = [
        {"piece_sizes": [*meta["piece_sizes"][:-1], 1]},  # the last piece too small
        {"piece_bytes": 0},
        {"piece_bytes": None},
        {"piece_sizes": [str(z) for z in meta["piece_sizes"]]},
        {"piece_sizes": 3},
    ]
    for change in bad:
        with pytest.raises(held.NotHeld, match="layout differs"):
            held.check_meta({**meta, **change}, path, idx)


def test_an_answer_without_one_descriptor_per_piece_is_refused_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    h = held.hold(path, make=_Memfd, piece_bytes=_PIECE)
    whole = h.meta()
    monkeypatch.setattr(held.Held, "meta", lambda self: {**whole, "piece_sizes": whole["piece_sizes"] + [1]})
    before = len(os.listdir("/proc/self/fd"))
    with (
        held.serving(tmp_path / "a.sock") as sock,
        pytest.raises(held.NotHeld, match="one piece per descriptor"),
    ):
        held.fetch(sock, str(path))
    assert len(os.listdir("/proc/self/fd")) == before  # the descriptors received were closed


def test_memory_made_before_a_failure_is_released(tmp_path: Path) -> None:
    path = tmp_path / "w.fvw"
    _weights(path)
    made: list[_Memfd] = []

    def make(n: int) -> _Memfd:
        if len(made) == 2:
            raise PinnedMemoryError("out of pinned memory")
        made.append(_Memfd(n))
        return made[-1]

    with pytest.raises(PinnedMemoryError):
        held.hold(path, make=make, piece_bytes=_PIECE)
    assert len(made) == 2 and all(m.closed for m in made) and held.lookup(path) is None


def test_the_open_file_limit_is_raised_for_the_held_descriptors_or_the_hold_refused() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        held.make_room_for(10)  # fits already: nothing changes
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(PinnedMemoryError, match="descriptors open"):
                held.make_room_for(hard)
            if soft < hard:
                held.make_room_for(soft)  # more than the soft limit leaves room for: raised
                assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_holding_reports_each_steps_bytes(tmp_path: Path) -> None:
    """Holding a large model takes minutes: each step (checking, pinning, reading) reports its
    running total, up to all of its bytes."""
    path = tmp_path / "w.fvw"
    _weights(path)
    seen: list[tuple[held.Step, int, int]] = []
    h = held.hold(path, make=_Memfd, piece_bytes=_PIECE, progress=lambda *a: seen.append(a))
    steps = [s for s, _, _ in seen]
    assert steps == sorted(steps, key=list(held.Step).index)  # in order, one after the other
    for step in held.Step:  # (threads report as they finish: not always in order of their totals)
        mine = [(d, t) for s, d, t in seen if s is step]
        assert mine and max(d for d, _ in mine) == mine[0][1]
    assert max(t for s, _, t in seen if s is held.Step.READING) == h.data_bytes
