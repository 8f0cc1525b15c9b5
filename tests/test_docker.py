"""The image from Dockerfile.criu on a real Docker engine (dockerd is started when none runs;
the base image is made offline with debootstrap and cached, the image build uses Docker's
layer cache): the first container cold-starts vLLM and snapshots it onto a volume, the next
ones restore it with the same tokens, two restore the same snapshot at once (each in its own
PID and network namespace), `fastvllm restore --container` does it from the host, and a
damaged snapshot is set aside with a cold start instead of a crash loop.

The tests run in order on one volume (module scope): each later one needs the snapshot the
first one took.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastvllm.runtime import manifest
from fastvllm.runtime.errors import EnvironmentNotReadyError

from fastvllm import container as ctr

from .conftest import FASTVLLM, PROMPTS, completions, needs_criu

# The first test builds the image when Docker's cache does not have it (8 min here under load).
pytestmark = [pytest.mark.slow, needs_criu, pytest.mark.timeout(2400)]
PORT = 8000  # inside each container: every container has its own network namespace
PREFIX = "fastvllm-test"


def _no_engine() -> str | None:
    try:
        from fastvllm import docker_image
    except ImportError as e:
        return f"the Docker SDK for Python is missing ({e}); run scripts/setup.sh"
    try:
        return docker_image.why_no_daemon()
    except Exception as e:
        return str(e)


@dataclass
class Engine:
    dc: Any
    image: str
    build: dict[str, float]
    started: list[Any]  # containers this module started (removed at teardown)

    def run(self, volume: Path, *args: str) -> Any:
        cmd = ctr.entrypoint_command("tiny", port=PORT) if not args else list(args)
        c = ctr.start(self.dc, self.image, volume, cmd, name=f"{PREFIX}-{uuid.uuid4().hex[:8]}")
        self.started.append(c)
        return c


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    reason = _no_engine()
    if reason:
        pytest.skip(f"no Docker engine can start here: {reason}")
    from fastvllm import docker_image

    try:
        daemon = docker_image.ensure_daemon()
    except EnvironmentNotReadyError as e:  # dockerd is installed but would not start here
        pytest.skip(f"no Docker engine can start here: {e.one_line()}: {e.detail or ''}")
    eng = None
    try:
        dc = docker_image.client()
        base_s = docker_image.ensure_base_image(dc)
        build_s = docker_image.build_image(dc)
        eng = Engine(dc, docker_image.CPU_IMAGE, {"base_s": base_s, "build_s": build_s}, [])
        yield eng
    finally:
        if eng is not None:
            for c in eng.started:
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            for c in eng.dc.containers.list(all=True, filters={"label": ctr.LABEL}):
                if c.name.startswith(PREFIX):
                    with contextlib.suppress(Exception):
                        c.remove(force=True)
        daemon.stop()


@dataclass
class First:
    volume: Path
    doc: dict[str, Any]
    snapshot: Path  # on the host
    model_name: str
    before: list[list[int]]
    exit_code: int


def _stop(c: Any) -> int:
    """docker stop (SIGTERM, then SIGKILL after 60 s); the container's exit code."""
    c.stop(timeout=60)
    return int(c.wait(timeout=120)["StatusCode"])


def _host_path(volume: Path, doc: dict[str, Any]) -> Path:
    return volume / Path(str(doc["snapshot"])).relative_to(ctr.SNAPSHOTS_MOUNT)


@pytest.fixture(scope="module")
def first(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> First:
    """The first container on an empty volume: cold start, snapshot, serve; then SIGTERM."""
    volume = tmp_path_factory.mktemp("volume")
    c = engine.run(volume)
    doc = ctr.wait_serving(c)
    snap = _host_path(volume, doc)
    name = manifest.load(snap).server.served_model_name
    before = completions(ctr.address(c, PORT), name, PROMPTS)
    return First(volume, doc, snap, name, before, _stop(c))


def test_first_container_cold_starts_snapshots_and_stops_on_sigterm(first: First) -> None:
    assert first.doc["how"] == "cold-start"
    assert first.doc["set_aside"] is None
    m = manifest.load(first.snapshot)
    assert m.identity.image, "the snapshot records the image's identity"
    assert first.snapshot.name.endswith(tuple("0123456789abcdef"))
    assert all(len(t) == 20 for t in first.before)
    assert first.exit_code == 0


def test_second_container_restores_with_identical_tokens(engine: Engine, first: First) -> None:
    c = engine.run(first.volume)
    doc = ctr.wait_serving(c)
    assert doc["how"] == "restored", doc["set_aside"]
    assert completions(ctr.address(c, PORT), first.model_name, PROMPTS) == first.before
    assert _stop(c) == 0


def test_two_containers_restore_one_snapshot_at_once_from_the_host(engine: Engine, first: First) -> None:
    """`fastvllm restore --container`'s API, twice at the same time: the same PIDs and the same
    port, each in its own container; both serve the recorded tokens."""
    names = [f"{PREFIX}-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(ctr.restore, engine.image, first.snapshot, name=n, dc=engine.dc) for n in names
        ]
        results = []
        for f in futures:
            with contextlib.suppress(Exception):
                results.append(f.result())
    engine.started += [engine.dc.containers.get(n) for n in names if _exists(engine, n)]
    assert len(results) == 2, "both restores must report serving"
    assert {r.how for r in results} == {"restored"}, [r.set_aside for r in results]
    assert results[0].url != results[1].url
    for r in results:
        assert r.prefetch.get("bytes", 0) > 0, r.prefetch
        assert completions(r.url, first.model_name, PROMPTS) == first.before
    assert [_stop(engine.dc.containers.get(n)) for n in names] == [0, 0]


def _exists(engine: Engine, name: str) -> bool:
    import docker

    try:
        engine.dc.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


def test_restore_container_cli(engine: Engine, first: First) -> None:
    name = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(
        [
            *FASTVLLM,
            "restore",
            str(first.snapshot),
            "--container",
            engine.image,
            "--container-name",
            name,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if _exists(engine, name):
        engine.started.append(engine.dc.containers.get(name))
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["how"] == "restored" and doc["container"] == name
    assert completions(str(doc["url"]), first.model_name, PROMPTS) == first.before
    assert _stop(engine.dc.containers.get(name)) == 0


def test_restore_container_refuses_a_host_snapshot(engine: Engine, tmp_path: Path, first: First) -> None:
    """A snapshot without an image identity (taken on a host) is refused in one line."""
    fake = tmp_path / "host-snap"
    fake.mkdir()
    doc = json.loads((first.snapshot / manifest.MANIFEST).read_text())
    doc["identity"]["image"] = ""
    (fake / manifest.MANIFEST).write_text(json.dumps(doc))
    r = subprocess.run(
        [*FASTVLLM, "restore", str(fake), "--container", engine.image],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    assert "not taken in a container" in r.stderr + r.stdout


def test_damaged_snapshot_is_set_aside_and_a_cold_start_follows(engine: Engine, first: First) -> None:
    core = min(first.snapshot.glob("criu/core-*.img"), key=lambda p: p.stat().st_size)
    raw = bytearray(core.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    core.write_bytes(bytes(raw))
    c = engine.run(first.volume)
    doc = ctr.wait_serving(c)
    assert doc["how"] == "cold-start"
    assert "checksum" in str(doc["set_aside"])
    assert [p for p in first.volume.iterdir() if ".broken-" in p.name]
    assert completions(ctr.address(c, PORT), first.model_name, PROMPTS) == first.before
    assert _stop(c) == 0
    assert manifest.load(first.snapshot).identity.image  # a fresh snapshot took its place


def test_sigterm_during_a_cold_start_leaves_no_snapshot_and_exits(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """docker stop while the first container is still starting vLLM: the entrypoint (PID 1)
    unwinds through the snapshot pipeline's cleanup and exits 143 well before Docker's SIGKILL,
    leaving neither a snapshot nor its staging directory on the volume."""
    import time

    volume = tmp_path_factory.mktemp("volume-sigterm")
    c = engine.run(volume)
    deadline = time.monotonic() + 600
    while not any(".partial-" in p.name for p in volume.iterdir()):  # vLLM is being launched
        assert time.monotonic() < deadline, "the entrypoint never started a snapshot"
        c.reload()
        assert c.status == "running", ctr.logs_tail(c)
        time.sleep(0.2)
    c.stop(timeout=120)
    assert int(c.wait(timeout=180)["StatusCode"]) == 143, ctr.logs_tail(c)
    assert "stopped by SIGTERM" in ctr.logs_tail(c)
    assert [p.name for p in volume.iterdir() if not p.name.startswith(".cache-")] == []
