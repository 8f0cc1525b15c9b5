"""Pure logic of tensor-parallel snapshots and of restores onto other devices (issue 25): each
rank's weight file, the CPU workers' core binding, the manifest's record of the devices, the
refusals of a host that cannot take them back, and the arguments of a restore onto other
GPUs (--gpus). No vLLM, no CRIU, no GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastvllm.restore import pipeline as restore_pipeline
from fastvllm.runtime import cuda_checkpoint, devices, manifest, vllm_server
from fastvllm.runtime.devices import DeviceKind, Devices, Gpu
from fastvllm.runtime.errors import IdentityMismatchError, UsageError
from fastvllm.weights import fileformat

H100 = "NVIDIA H100 80GB HBM3"
U0 = "GPU-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6"
U1 = "GPU-8f4022ba-e0cb-1298-286e-225c953a7feb"
U2 = "GPU-5449fdd5-fb83-f4ed-37a3-ea1057d82160"


def gpus(n: int, model: str = H100, driver: str = "580.95.05") -> list[Gpu]:
    return [Gpu(i, (U0, U1, U2)[i], model, driver) for i in range(n)]


def tp2_snapshot(driver: str = "580.95.05") -> Devices:
    return Devices(DeviceKind.CUDA, H100, driver, 2, [U0, U1], 2)


# --- each rank's weight file ---------------------------------------------------------------


def test_rank_zero_keeps_the_single_worker_name() -> None:
    p = Path("/s/weights/model.fvw")
    assert fileformat.rank_path(p, 0) == p
    assert fileformat.rank_path(p, 1) == Path("/s/weights/model.rank1.fvw")
    assert len({fileformat.rank_path(p, r) for r in range(8)}) == 8


def test_a_worker_refuses_another_ranks_shard() -> None:
    from fastvllm.weights.extension import check_rank

    idx = fileformat.Index([], 4096, 4096, "0", {"rank": 0, "world_size": 2})
    check_rank(idx, {"rank": 0, "world_size": 2, "tensor_parallel_size": 2}, Path("w"))
    with pytest.raises(UsageError, match="rank 0, this worker has rank 1"):
        check_rank(idx, {"rank": 1, "world_size": 2, "tensor_parallel_size": 2}, Path("w"))
    with pytest.raises(UsageError, match="world_size 2"):
        check_rank(idx, {"rank": 0, "world_size": 1, "tensor_parallel_size": 1}, Path("w"))
    old = fileformat.Index([], 4096, 4096, "0", {"writer": "x"})  # written before ranks were recorded
    check_rank(old, {"rank": 0, "world_size": 1, "tensor_parallel_size": 1}, Path("w"))


def test_manifest_lists_every_ranks_weight_file() -> None:
    m = _manifest(weights_file="weights/model.fvw")
    assert m.all_weight_files() == ["weights/model.fvw"]
    m.weights_files = ["weights/model.fvw", "weights/model.rank1.fvw"]
    back = manifest.Manifest.from_dict(json.loads(m.to_json()))
    assert back.all_weight_files() == m.weights_files
    assert _manifest(weights_file=None).all_weight_files() == []
    # an older manifest, without the parallel fields
    raw = json.loads(_manifest().to_json())
    for k in ("weights_files", "tensor_parallel_size", "world_size", "devices"):
        raw.pop(k)
    old = manifest.Manifest.from_dict(raw)
    assert (old.tensor_parallel_size, old.world_size, old.devices) == (1, 1, {})


def test_restore_reads_the_weight_files_in_rank_order(tmp_path: Path) -> None:
    from fastvllm.restore import order

    m = _manifest(weights_file="weights/model.fvw")
    m.weights_files = ["weights/model.fvw", "weights/model.rank1.fvw"]
    m.files = [
        manifest.FileEntry("weights/model.rank1.fvw", 1, "x"),
        manifest.FileEntry("zzz", 1, "x"),
        manifest.FileEntry("weights/model.fvw", 1, "x"),
    ]
    got = [e.path for e in order.restore_order(tmp_path, m)]
    assert got == ["weights/model.fvw", "weights/model.rank1.fvw", "zzz"]


def _manifest(weights_file: str | None = "weights/model.fvw") -> manifest.Manifest:
    return manifest.Manifest(
        identity=manifest.HostIdentity("4.2", "6.18", "3.11", "0.32"),
        model=manifest.ModelIdentity("/m", "h", "s", 1),
        server=manifest.ServerSpec("/m", "tiny", "127.0.0.1", 8000, [], {}, "/log"),
        canary=manifest.Canary("p", 1, [1], "x"),
        weights_file=weights_file,
    )


# --- the CPU workers' cores ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ([], (1, 1)),
        (["--tensor-parallel-size", "2"], (2, 1)),
        (["--tensor-parallel-size=4", "--dtype", "float32"], (4, 1)),
        (["-tp", "2", "-pp", "2"], (2, 2)),
        (["--pipeline-parallel-size=3"], (1, 3)),
    ],
)
def test_parallel_sizes_from_vllms_arguments(args: list[str], want: tuple[int, int]) -> None:
    assert vllm_server.parallel_sizes(args) == want


def test_parallel_size_that_is_no_number_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a number"):
        vllm_server.parallel_sizes(["--tensor-parallel-size", "two"])


def _host(monkeypatch: pytest.MonkeyPatch, cpus: int, nodes: int) -> None:
    monkeypatch.setattr(vllm_server.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    monkeypatch.setattr(vllm_server, "numa_nodes", lambda: nodes)


def test_cpu_workers_get_a_share_of_the_cores_each(monkeypatch: pytest.MonkeyPatch) -> None:
    _host(monkeypatch, cpus=2, nodes=1)
    tp2 = ["--tensor-parallel-size", "2"]
    assert vllm_server.cpu_parallel_bind(tp2, {}) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert vllm_server.cpu_parallel_bind(tp2, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"
    }
    assert vllm_server.cpu_parallel_bind(tp2, {"VLLM_CPU_OMP_THREADS_BIND": "1|0"}) == {}  # the user's
    assert vllm_server.cpu_parallel_bind([], {}) == {}  # one worker: vLLM's own choice
    _host(monkeypatch, cpus=8, nodes=1)
    assert vllm_server.cpu_parallel_bind(["-tp", "2", "-pp", "2"], {}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3|4,5|6,7"
    }
    _host(monkeypatch, cpus=8, nodes=2)  # a node per worker: vLLM's `auto` binds them by node
    assert vllm_server.cpu_parallel_bind(tp2, {}) == {}


def test_too_few_cores_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _host(monkeypatch, cpus=1, nodes=1)
    with pytest.raises(UsageError) as e:
        vllm_server.cpu_parallel_bind(["--tensor-parallel-size", "2"], {})
    assert "VLLM_CPU_OMP_THREADS_BIND" in e.value.one_line() and "\n" not in e.value.one_line()


def test_launch_env_binds_the_workers_on_a_cpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _host(monkeypatch, cpus=2, nodes=1)
    monkeypatch.setattr(vllm_server, "cuda_present", lambda: False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    spec = vllm_server.LaunchSpec("/m", extra_args=["--tensor-parallel-size", "2"])
    assert spec.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert spec.recorded_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    mine = vllm_server.LaunchSpec(
        "/m", extra_args=["-tp", "2"], env_overrides={"VLLM_CPU_OMP_THREADS_BIND": "0|0"}
    )
    assert mine.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0|0"


# --- the devices a snapshot records, and the host's that must match --------------------------


def test_nvidia_smi_listing_is_parsed() -> None:
    text = f"0, {U0}, {H100}, 580.95.05\n1, {U1}, {H100}, 580.95.05\n\n"
    assert devices.parse_gpu_list(text) == gpus(2)


def test_snapshot_records_the_gpus_its_workers_used() -> None:
    three = gpus(3)
    d = devices.of_tree(three, 2, {}, on_gpu=True)
    assert d == Devices(DeviceKind.CUDA, H100, "580.95.05", 2, [U0, U1], 3)
    d = devices.of_tree(three, 1, {"CUDA_VISIBLE_DEVICES": "2"}, on_gpu=True)
    assert d.uuids == [U2] and d.count == 1
    d = devices.of_tree(three, 2, {"CUDA_VISIBLE_DEVICES": f"{U1[:12]},0"}, on_gpu=True)
    assert d.uuids == [U1, U0]
    assert devices.of_tree([], 2, {}, on_gpu=False).as_dict() == {"kind": "cpu"}
    assert Devices.from_dict(d.as_dict()) == d
    assert Devices.from_dict({}) is None


@pytest.mark.parametrize(
    ("here", "needle"),
    [
        ([], "this host has no GPU"),
        (gpus(1), "GPUs: the snapshot used 2, this host has 1"),
        (gpus(2, model="NVIDIA A100-SXM4-80GB"), "GPU model: snapshot"),
        (gpus(2, driver="575.57.08"), "GPU driver: snapshot 580.95.05, here 575.57.08"),
    ],
)
def test_restore_refused_where_the_devices_differ(here: list[Gpu], needle: str) -> None:
    with pytest.raises(IdentityMismatchError) as e:
        devices.check(tp2_snapshot(), here)
    line = e.value.one_line()
    assert needle in line and "\n" not in line


def test_restore_allowed_where_the_devices_match() -> None:
    devices.check(tp2_snapshot(), gpus(2))
    devices.check(tp2_snapshot(), gpus(3))  # more GPUs than it needs
    devices.check(Devices(DeviceKind.CPU), [])  # a CPU snapshot needs none
    devices.check(Devices(DeviceKind.CPU), gpus(1))
    devices.check(None, [])  # an older snapshot recorded nothing


# --- restore onto other GPUs (--gpus) ----------------------------------------------------


def test_gpus_option_pairs_the_snapshots_gpus_with_the_named_ones() -> None:
    one = Devices(DeviceKind.CUDA, H100, "580.95.05", 1, [U0], 3)
    assert devices.gpu_pairs(one, "1", gpus(3)) == [(U0, U1)]
    assert devices.gpu_pairs(one, U2, gpus(3)) == [(U0, U2)]
    assert devices.gpu_pairs(tp2_snapshot(), "2,1", gpus(3)) == [(U0, U2), (U1, U1)]
    assert devices.device_map([(U0, U1)]) == f"{U0}={U1}"


@pytest.mark.parametrize(
    ("snap", "spec", "here", "error", "needle"),
    [
        (tp2_snapshot(), "1", [], UsageError, "this host has no GPU"),
        (Devices(DeviceKind.CPU), "0", gpus(1), UsageError, "ran on the CPU"),
        (None, "0", gpus(1), UsageError, "does not record"),
        (tp2_snapshot(), "1", gpus(3), UsageError, "names 1 GPU(s), the snapshot used 2"),
        (tp2_snapshot(), "1,1", gpus(3), UsageError, "twice"),
        (tp2_snapshot(), "1,7", gpus(3), UsageError, "no GPU '7'"),
        (tp2_snapshot(), "", gpus(3), UsageError, "names no GPU"),
        (tp2_snapshot(), "0,1", gpus(2, model="NVIDIA L4"), IdentityMismatchError, "is a NVIDIA L4"),
        (tp2_snapshot("570.1"), "1,0", gpus(2, driver="570.1"), UsageError, "needs 580 or later"),
    ],
)
def test_gpus_option_refusals_are_one_line(
    snap: Devices | None, spec: str, here: list[Gpu], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as e:
        devices.gpu_pairs(snap, spec, here)
    line = e.value.one_line()  # type: ignore[attr-defined]
    assert needle in line and "\n" not in line


def test_driver_versions_that_can_remap() -> None:
    assert devices.driver_can_remap("580.65.06") and devices.driver_can_remap("595.1")
    assert not devices.driver_can_remap("575.57.08") and not devices.driver_can_remap("n/a")


def test_uuid_bytes() -> None:
    assert devices.uuid_bytes(U0) == bytes.fromhex(U0[4:].replace("-", ""))
    for bad in ("GPU-1234", "GPU-zzzzzzzz-ebcd-ac27-6b3e-bec2a19724e6"):
        with pytest.raises(UsageError):
            devices.uuid_bytes(bad)


class _Uuid:
    bytes = b""


class _FakeDriver:
    """The two structs of cuda.bindings.driver that the restore's arguments use."""

    class CUcheckpointGpuPair:
        def __init__(self) -> None:
            self.oldUuid, self.newUuid = _Uuid(), _Uuid()

    class CUcheckpointRestoreArgs:
        def __init__(self) -> None:
            self.gpuPairs: list[Any] = []
            self.gpuPairsCount = 0


def test_cuda_restore_arguments_carry_every_pair() -> None:
    assert cuda_checkpoint.restore_args(_FakeDriver, []) is None  # same GPUs: no arguments
    args = cuda_checkpoint.restore_args(_FakeDriver, [(U0, U1), (U1, U0)])
    assert args.gpuPairsCount == 2
    assert [(p.oldUuid.bytes, p.newUuid.bytes) for p in args.gpuPairs] == [
        (devices.uuid_bytes(U0), devices.uuid_bytes(U1)),
        (devices.uuid_bytes(U1), devices.uuid_bytes(U0)),
    ]


def test_restore_checks_devices_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = _manifest()
    cpu.devices = {"kind": "cpu"}
    monkeypatch.setattr(devices, "list_gpus", lambda: [])
    assert restore_pipeline._check_devices(cpu, None) == []
    with pytest.raises(UsageError, match="this host has no GPU"):
        restore_pipeline._check_devices(cpu, "1")
    gpu = _manifest()
    gpu.devices = tp2_snapshot().as_dict()
    with pytest.raises(IdentityMismatchError, match="this host has no GPU"):
        restore_pipeline._check_devices(gpu, None)
    monkeypatch.setattr(devices, "list_gpus", lambda: gpus(3))
    assert restore_pipeline._check_devices(gpu, None) == []
    monkeypatch.setattr(cuda_checkpoint, "can_remap", lambda: True)
    assert restore_pipeline._check_devices(gpu, "1,2") == [(U0, U1), (U1, U2)]
    monkeypatch.setattr(cuda_checkpoint, "can_remap", lambda: False)
    with pytest.raises(UsageError, match="cuda-python"):
        restore_pipeline._check_devices(gpu, "1,2")


def test_cli_refuses_gpus_with_a_process_snapshot(tmp_path: Path) -> None:
    import fastvllm

    m = manifest.ProcessManifest(manifest.HostIdentity("4.2", "6.18", "3.11", "0.32"), 1, [1], ["x"])
    m.write(tmp_path)
    with pytest.raises(UsageError, match="plain process snapshot"):
        fastvllm.restore(tmp_path, gpus="1")


# --- which rank failed ----------------------------------------------------------------------


def test_blame_names_the_ranks_that_died_or_that_the_error_names() -> None:
    from fastvllm.runtime import ranks

    pids = [101, 102]
    assert ranks.blame("x", [101]) == ""  # one worker: nothing to tell apart
    assert ranks.blame("x", pids, alive=lambda p: p != 102) == "worker rank 1 (PID 102) had died"
    assert ranks.blame("x", pids, alive=lambda p: False) == "worker ranks 0 (PID 101), 1 (PID 102) had died"
    assert (
        ranks.blame("x", pids, alive=lambda p: False, first=[(1, 102)])
        == "worker rank 1 (PID 102) died first"
    )
    said = ranks.blame("CUDA restore of PID 102 failed (X)", pids, alive=lambda p: True)
    assert said == "worker rank 1 (PID 102) is the one that failed"
    assert ranks.blame("the server failed", pids, alive=lambda p: True) == ""


def test_watch_keeps_the_rank_that_died_first() -> None:
    import subprocess
    import time

    from fastvllm.runtime import ranks

    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        with ranks.Watch([p.pid for p in procs], poll_s=0.005) as watch:
            procs[1].kill()
            procs[1].wait()
            deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
            while not watch.first and time.monotonic() < deadline:
                time.sleep(0.01)
        assert watch.first == [(1, procs[1].pid)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_canary_that_differs_names_the_rank_whose_weights_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fastvllm.runtime import worker_rpc
    from fastvllm.runtime.errors import CanaryMismatchError

    me = os.getpid()  # a live PID per rank: no rank died
    m = _manifest()
    m.worker_pids = [me, me]
    r = SimpleNamespace(m=m, path=Path("/snap"))
    checked: list[Path] = []

    def check(_server: object, path: Path, timeout: float = 120.0) -> list[worker_rpc.WeightCheck]:
        checked.append(path)
        return [worker_rpc.WeightCheck(0, me, [], 0), worker_rpc.WeightCheck(1, me, ["w"], 3)]

    monkeypatch.setattr(worker_rpc, "check_weights", check)
    with pytest.raises(CanaryMismatchError) as e, restore_pipeline._naming_ranks(r, None):  # type: ignore[arg-type]
        raise CanaryMismatchError("the restored server's canary differs; it was stopped", hint="x")
    assert e.value.message.endswith(
        f"worker rank 1 (PID {me}) holds weights that differ from its weight file"
    )
    assert checked == [Path("/snap/weights/model.fvw")]
    # another failure with every rank alive and none named: the message is left as it was
    with pytest.raises(UsageError) as e2, restore_pipeline._naming_ranks(r, None):  # type: ignore[arg-type]
        raise UsageError("something else", hint="x")
    assert e2.value.message == "something else"


def test_cpu_workers_kv_caches_must_fit_together() -> None:
    tp2 = ["--tensor-parallel-size", "2"]
    vllm_server.check_cpu_parallel_memory(tp2, {}, available_gib=20)  # 1 GiB each: fastvllm's default
    vllm_server.check_cpu_parallel_memory(tp2, {"VLLM_CPU_KVCACHE_SPACE": "8"}, available_gib=20)
    vllm_server.check_cpu_parallel_memory([], {"VLLM_CPU_KVCACHE_SPACE": "0"}, available_gib=20)  # one worker
    for kv, needle in (("0", "VLLM_CPU_KVCACHE_SPACE=0"), ("12", "12 GiB per worker x 2")):
        with pytest.raises(UsageError) as e:
            vllm_server.check_cpu_parallel_memory(tp2, {"VLLM_CPU_KVCACHE_SPACE": kv}, available_gib=20)
        line = e.value.one_line()
        assert needle in line and "VLLM_CPU_KVCACHE_SPACE" in line and "\n" not in line
