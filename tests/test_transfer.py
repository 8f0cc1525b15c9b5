"""Copying a snapshot between hosts (`scheduler.transfer`) over a real TCP connection on this
machine, and the controller choosing a host without the snapshot. The snapshot here is a
directory with a manifest and files of the shapes a real one has (page images, a sparse
/dev/shm copy, a weight file); nothing is restored, so no vLLM or CRIU is needed."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from fastvllm.runtime import manifest, shm, verified
from fastvllm.runtime.errors import IntegrityError, UsageError
from fastvllm.scheduler import transfer

from .test_units import _sample_manifest

SHM_SIZE = 64 << 20


def _snapshot(d: Path) -> Path:
    (d / "criu").mkdir(parents=True)
    (d / "shm").mkdir()
    (d / "weights").mkdir()
    (d / "logs").mkdir()
    (d / "criu" / "pages-1.img").write_bytes(os.urandom(3 << 20) + b"tail")
    (d / "weights" / "model.fvw").write_bytes(os.urandom(1 << 20))
    (d / "logs" / "server.log").write_text("not copied")
    with open(d / "shm" / "psm_1", "wb") as f:  # 64 MiB with 12 KiB of data, like vLLM's queues
        f.truncate(SHM_SIZE)
        f.seek(1 << 20)
        f.write(os.urandom(8192))
        f.seek(SHM_SIZE - 4096)
        f.write(os.urandom(4096))
    m = _sample_manifest()
    m.files = manifest.collect_files(d)
    m.write(d)
    return d


def _no_staging(root: Path) -> None:
    assert not [p for p in root.iterdir() if ".partial-" in p.name]


def test_copy_keeps_bytes_and_holes_and_is_trusted_on_arrival(tmp_path: Path) -> None:
    src = _snapshot(tmp_path / "a" / "snap")
    (tmp_path / "b").mkdir()
    s = transfer.Sender(src)
    got: list[int] = []
    out = transfer.receive(("127.0.0.1", s.port), tmp_path / "b" / "snap", on_bytes=got.append)
    s.thread.join(10)
    assert s.error is None
    m = manifest.load(out)
    for e in m.files:
        assert (out / e.path).read_bytes() == (src / e.path).read_bytes(), e.path
    assert not (out / "logs").exists()  # logs stay with their host
    assert os.stat(out / "shm" / "psm_1").st_blocks * 512 < 1 << 20  # the holes stayed holes
    assert sum(got) == s.sent < 5 << 20  # only the data runs crossed the wire
    assert verified.unchanged(out, m.files) == {e.path for e in m.files}  # checked on arrival
    _no_staging(tmp_path / "b")


def test_a_damaged_source_is_never_published(tmp_path: Path) -> None:
    src = _snapshot(tmp_path / "a" / "snap")
    data = bytearray((src / "criu" / "pages-1.img").read_bytes())
    data[777] ^= 1
    (src / "criu" / "pages-1.img").write_bytes(bytes(data))
    (tmp_path / "b").mkdir()
    s = transfer.Sender(src)
    with pytest.raises(IntegrityError, match=r"pages-1\.img does not match its checksum"):
        transfer.receive(("127.0.0.1", s.port), tmp_path / "b" / "snap")
    assert list((tmp_path / "b").iterdir()) == []


def _fake_sender(header: list[dict[str, object]], payload: bytes) -> int:
    """A peer that sends `header` and `payload`, then hangs up."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            h = json.dumps(header).encode()
            conn.sendall(struct.pack("<Q", len(h)) + h + payload)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def test_a_copy_cut_off_midway_leaves_nothing(tmp_path: Path) -> None:
    port = _fake_sender(
        [{"path": "manifest.json", "size": 1000, "mode": 0o600, "runs": [[0, 1000]]}], b"x" * 10
    )
    with pytest.raises(transfer.TransferError, match="closed the connection mid-copy"):
        transfer.receive(("127.0.0.1", port), tmp_path / "snap")
    assert list(tmp_path.iterdir()) == []


def test_a_sender_naming_a_file_outside_the_snapshot_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    port = _fake_sender([{"path": "../escaped", "size": 1, "mode": 0o600, "runs": [[0, 1]]}], b"x")
    with pytest.raises(IntegrityError, match="outside the snapshot"):
        transfer.receive(("127.0.0.1", port), tmp_path / "in" / "snap")
    assert not (tmp_path / "escaped").exists()
    assert list((tmp_path / "in").iterdir()) == []


def test_receive_refuses_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        transfer.receive(("127.0.0.1", 1), tmp_path / "snap")


def test_controller_places_on_a_host_without_the_snapshot_and_copies_it_there(tmp_path: Path) -> None:
    from fastvllm.scheduler.agent import NodeAgent, scan
    from fastvllm.scheduler.controller import Controller, LocalClient

    _snapshot(tmp_path / "a" / "snap")
    (tmp_path / "b").mkdir()
    model = manifest.load(tmp_path / "a" / "snap").server.served_model_name
    a, b = NodeAgent("a", tmp_path / "a", slots=0), NodeAgent("b", tmp_path / "b", slots=1)
    try:
        c = Controller({"a": LocalClient(a), "b": LocalClient(b)}, fetch=False)
        c.measure_network()
        with pytest.raises(UsageError, match=r"every host that could restore .* is full"):
            c.place(model)  # a, the only holder, has no free slot
        d = c.place(model, fetch=True)
        assert (d.best.kind, d.best.host) == ("restore", "b"), d
        copied = c.copy_snapshot(model, "b")
        assert copied["from"] == "a" and Path(str(copied["path"])) == tmp_path / "b" / "snap"
        assert [s.model for s in scan(tmp_path / "b")] == [model]
        with pytest.raises(UsageError, match="no live host other than a holds a snapshot of nothing"):
            c.copy_snapshot("nothing", "a")
    finally:
        a.close()
        b.close()


def test_an_agent_counts_a_snapshots_data_not_its_holes(tmp_path: Path) -> None:
    """Placement charges bytes at disk speed: the sparse /dev/shm copy's holes are never read
    (nor copied), so they must not count, resident or not."""
    from fastvllm.prefetch import warm
    from fastvllm.scheduler.agent import scan

    snap = _snapshot(tmp_path / "snap")
    files = [snap / e.path for e in manifest.load(snap).files]
    modes = (snap / "shm" / shm.MODES_FILE).stat().st_size  # the /dev/shm originals' modes
    data = (3 << 20) + 4 + (1 << 20) + 8192 + 4096 + modes
    warm.evict(files)
    (cold,) = scan(tmp_path)
    assert cold.bytes == data < SHM_SIZE
    assert cold.resident_bytes < data // 2
    warm.warm(files)
    (hot,) = scan(tmp_path)
    assert hot.bytes == data and hot.resident_bytes == data


def test_a_copy_missing_a_file_or_carrying_a_stranger_is_never_published(tmp_path: Path) -> None:
    """The manifest comes first and decides: a file it lists that never arrives, or one it does
    not list, fails the copy before anything is published."""
    src = _snapshot(tmp_path / "a" / "snap")
    man = (src / manifest.MANIFEST).read_bytes()
    first = {"path": manifest.MANIFEST, "size": len(man), "mode": 0o600, "runs": [[0, len(man)]]}
    (tmp_path / "b").mkdir()
    port = _fake_sender([first], man)
    with pytest.raises(IntegrityError, match=r"the copy lacks .*, which the snapshot needs"):
        transfer.receive(("127.0.0.1", port), tmp_path / "b" / "snap")
    stranger = {"path": "criu/extra.img", "size": 4, "mode": 0o600, "runs": [[0, 4]]}
    port = _fake_sender([first, stranger], man + b"evil")
    with pytest.raises(IntegrityError, match=r"criu/extra\.img is not the file its manifest lists"):
        transfer.receive(("127.0.0.1", port), tmp_path / "b" / "snap")
    assert list((tmp_path / "b").iterdir()) == []
