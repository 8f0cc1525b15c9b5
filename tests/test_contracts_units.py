"""Typed contracts (issue 24): the modes as enums that still read and serialise as their
strings, one result type per API call, the worker-extension RPC's arguments and replies, and
the router's migration record. Nothing here starts a process."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from fastvllm.runtime import config, manifest, worker_rpc
from fastvllm.runtime.errors import NotASnapshotError, ServerError, UsageError
from fastvllm.runtime.modes import CriuRestoreMode, LoadMode, SnapshotKind
from fastvllm.scheduler.router import CatchUpRound, Migration, MigrationOutcome, Stream
from fastvllm.weights import loader


def test_modes_read_and_serialise_as_their_strings() -> None:
    assert CriuRestoreMode.MMAP == "mmap" and CriuRestoreMode("copy") is CriuRestoreMode.COPY
    assert f"{CriuRestoreMode.LAZY}" == "lazy" and LoadMode.MAP == "map"
    assert json.dumps({"criu_restore": CriuRestoreMode.MMAP, "kind": SnapshotKind.PROCESS}) == (
        '{"criu_restore": "mmap", "kind": "process"}'
    )


def test_the_resident_client_knows_the_same_criu_modes() -> None:
    from fastvllm import resident, resident_client

    assert resident_client.CRIU_MODES == tuple(CriuRestoreMode) == resident.CRIU_MODES


def _manifest(where: Path, doc: dict[str, object]) -> Path:
    where.mkdir()
    (where / manifest.MANIFEST).write_text(json.dumps({"format_version": manifest.FORMAT_VERSION, **doc}))
    return where


def test_the_manifest_says_which_kind_of_snapshot(tmp_path: Path) -> None:
    assert manifest.kind(_manifest(tmp_path / "v", {})) is SnapshotKind.VLLM
    assert manifest.kind(_manifest(tmp_path / "p", {"kind": "process"})) is SnapshotKind.PROCESS
    with pytest.raises(NotASnapshotError):
        manifest.kind(_manifest(tmp_path / "x", {"kind": "teapot"}))


def test_restore_returns_one_type_and_points_process_snapshots_elsewhere(tmp_path: Path) -> None:
    from fastvllm.restore.pipeline import RestoreResult
    from fastvllm.restore.process import ProcessRestoreResult

    from fastvllm import api

    assert inspect.signature(api.restore).return_annotation in (RestoreResult, "RestoreResult")
    assert inspect.signature(api.restore_process).return_annotation in (
        ProcessRestoreResult,
        "ProcessRestoreResult",
    )
    snap = _manifest(tmp_path / "p", {"kind": "process"})
    assert api.snapshot_kind(snap) is SnapshotKind.PROCESS
    assert api.snapshot_kind(tmp_path / "nothing") is SnapshotKind.VLLM  # restore's checks say why
    with pytest.raises(UsageError) as e:
        api.restore(snap)
    assert "restore_process" in (e.value.hint or "")


def test_worker_replies_parse_typed_and_keep_what_they_do_not_know() -> None:
    got = worker_rpc.parse(
        worker_rpc.Reloaded, [{"bytes": 10, "seconds": 0.5, "gbps": 0.02, "direct": False, "later": 1}]
    )
    assert got[0].bytes == 10 and got[0].rank == 0 and got[0].extra == {"later": 1}
    assert got[0].as_dict()["later"] == 1  # sent on as it came
    older = worker_rpc.DumpedWeights.from_dict(
        {"path": "/s/w.fvw", "bytes": 1, "tensors": 2, "data_xxh3_128": "ab", "seconds": 0.1}
    )
    assert older.rank == 0 and older.world_size == 1 and older.pid is None  # before ranks existed
    with pytest.raises(ServerError):
        worker_rpc.DumpedWeights.from_dict({"path": "/s/w.fvw"})
    with pytest.raises(ServerError):
        worker_rpc.WeightBytes.from_dict(["not", "an", "object"])
    counts = worker_rpc.totals([worker_rpc.WeightBytes(1, 2, 3), worker_rpc.WeightBytes(10, 20, 0)])
    assert counts == {"weight_bytes": 11, "kv_bytes": 22, "opaque_weight_bytes": 3}


def test_reload_arguments_cross_as_the_strings_the_worker_takes() -> None:
    from fastvllm.weights.extension import WorkerExtension

    # An older worker (restored from an older snapshot) knows `path` and `verify` only.
    assert worker_rpc.ReloadArgs("/s/w.fvw").as_kwargs() == {"path": "/s/w.fvw"}
    args = worker_rpc.ReloadArgs("/s/w.fvw", verify=True, threads=4, chunk_mib=16)
    sent = args.as_kwargs()
    assert all(isinstance(v, str) for v in sent.values())
    assert set(sent) <= set(inspect.signature(WorkerExtension.fastvllm_reload).parameters)
    assert worker_rpc.ReloadArgs.from_kwargs(**sent) == args
    assert args.loader_kwargs() == {"verify": True, "threads": 4, "chunk": 16 << 20}
    # the restore's settings for how the loader's threads share the cores cross only when set
    tuned = worker_rpc.ReloadArgs("/s/w.fvw", copy_wait="block", reader_nice=5, only="reads", reads="mapped")
    sent = tuned.as_kwargs()
    assert sent == {
        "path": "/s/w.fvw",
        "copy_wait": "block",
        "reader_nice": "5",
        "only": "reads",
        "reads": "mapped",
    }
    assert set(sent) <= set(inspect.signature(WorkerExtension.fastvllm_reload).parameters)
    assert worker_rpc.ReloadArgs.from_kwargs(**sent) == tuned
    # the worker builds the loader's tuning from them; each value is one the loader knows
    assert tuned.loader_kwargs() == {"verify": False}
    assert config.CopyWait(tuned.copy_wait) is config.CopyWait.BLOCK
    assert loader.PipelineHalf(tuned.only) is loader.PipelineHalf.READS
    assert config.LoaderReads(tuned.reads) is config.LoaderReads.MAPPED
    assert {*tuned.loader_kwargs(), "tuning"} <= set(inspect.signature(loader.load_into).parameters)
    for method in worker_rpc.Method:
        if method is not worker_rpc.Method.VLLM_RELOAD_WEIGHTS:
            assert callable(getattr(WorkerExtension, method.value)), method


def test_a_migration_record_shows_what_is_known_so_far() -> None:
    rec = Migration("s1", "http://a", "http://b")
    assert rec.as_dict() == {"session": "s1", "from": "http://a", "to": "http://b", "rounds": []}
    rec.rounds.append(CatchUpRound(tokens=40, seconds=0.2, behind=3))
    rec.switch_because = "caught up"
    rec.last_source_token_at, rec.first_target_token_at = 10.0, 10.05
    rec.pause_s = rec.first_target_token_at - rec.last_source_token_at
    rec.outcome = MigrationOutcome.SWITCHED
    doc = json.loads(json.dumps(rec.as_dict()))
    assert doc["rounds"] == [{"tokens": 40, "seconds": 0.2, "behind": 3}]
    assert doc["outcome"] == "switched" and doc["switch_because"] == "caught up"
    assert "mean_token_gap_s" in doc and doc["mean_token_gap_s"] is None  # with the pause, even null
    assert "pause_parts_s" not in doc and "catch_up_s" not in doc
    stream = Stream("s1", "m", "http://a", 16, migrations=[rec])
    assert stream.as_dict()["migrations"] == [rec.as_dict()]
