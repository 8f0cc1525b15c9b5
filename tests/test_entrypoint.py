"""`fastvllm entrypoint` (what a container runs) on a real vLLM server and the real criu
binary, without Docker: first run cold-starts and snapshots, second run restores with the
same tokens, a damaged snapshot is set aside with a cold start instead; SIGTERM stops the
server and exits 0 each time."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastvllm.runtime import manifest, proctree

from .conftest import FASTVLLM, PROMPTS, TEST_PORT, completions, needs_criu, servers_on_port

pytestmark = [pytest.mark.slow, needs_criu]
PORT = TEST_PORT + 7  # apart from the shared snapshot's port


@contextlib.contextmanager
def _entrypoint(model: Path, snapshots: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """Run the entrypoint until it says it is serving; SIGTERM it afterwards, even on failure."""
    proc = subprocess.Popen(
        [*FASTVLLM, "entrypoint", str(model), "--snapshots", str(snapshots), "--port", str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 900)
        assert ready, "the entrypoint did not report serving within 900 s"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the entrypoint exited: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        if proc.poll() is None:
            proc.kill()
        for pid in servers_on_port(PORT):
            proctree.stop_session(os.getsid(pid))


def test_entrypoint_cold_starts_then_restores_then_survives_a_damaged_snapshot(
    tiny_model: Path, tmp_path: Path
) -> None:
    snaps = tmp_path / "volume"
    with _entrypoint(tiny_model, snaps) as (proc, doc):
        assert doc["how"] == "cold-start" and doc["set_aside"] is None
        name = manifest.load(Path(str(doc["snapshot"]))).server.served_model_name
        before = completions(str(doc["url"]), name, PROMPTS)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not servers_on_port(PORT)

    with _entrypoint(tiny_model, snaps) as (proc, doc):
        assert doc["how"] == "restored"
        assert completions(str(doc["url"]), name, PROMPTS) == before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not servers_on_port(PORT)

    snap = Path(str(doc["snapshot"]))
    core = min(snap.glob("criu/core-*.img"), key=lambda p: p.stat().st_size)
    raw = bytearray(core.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    core.write_bytes(bytes(raw))
    with _entrypoint(tiny_model, snaps) as (proc, doc):
        assert doc["how"] == "cold-start"
        assert "checksum" in str(doc["set_aside"])
        assert [p for p in snaps.iterdir() if ".broken-" in p.name]
        assert completions(str(doc["url"]), name, PROMPTS) == before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not servers_on_port(PORT)
