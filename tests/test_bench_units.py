"""The benchmark harness (runtime.bench_harness) and the parts of `fastvllm bench` that need no
vLLM: the separate client that waits for the first completion answered 200."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastvllm.runtime import bench_harness as harness

from fastvllm import benchmark

HANG_GUARD_S = 60.0


def test_column_median_and_shape() -> None:
    c = harness.Column("restore", "fastvllm restore")
    for v in (3.0, 1.0, 2.0, 10.0):
        c.add(v, rep=int(v))
    assert c.median == 2.5
    doc = c.as_dict()
    assert doc == {
        "label": "fastvllm restore",
        "unit": "s",
        "median": 2.5,
        "min": 1.0,
        "max": 10.0,
        "runs": [3.0, 1.0, 2.0, 10.0],
        "details": [{"rep": 3}, {"rep": 1}, {"rep": 2}, {"rep": 10}],
    }
    empty = harness.Column("agent", skipped="no agent here").as_dict()
    assert empty["median"] is None and empty["runs"] == [] and empty["skipped"] == "no agent here"
    assert "details" not in empty
    assert harness.median([]) is None and harness.median([4, 1, 3]) == 3


def test_repeat_runs_each_rep_in_order() -> None:
    said: list[str] = []
    c = harness.repeat(3, lambda i: float(i) * 2, harness.Column("x"), said.append)
    assert c.runs == [0.0, 2.0, 4.0] and c.median == 2.0 and len(said) == 3


def test_document_json_and_chart(tmp_path: Path) -> None:
    a, b = harness.Column("cold", "cold start"), harness.Column("skipped", skipped="why")
    for v in (30.0, 40.0, 35.0):
        a.add(v)
    doc = harness.document("demo", [a, b], {"reps": 3}, note="extra")
    assert doc["benchmark"] == "demo" and doc["params"] == {"reps": 3} and doc["note"] == "extra"
    assert set(doc["columns"]) == {"cold", "skipped"} and doc["columns"]["cold"]["median"] == 35.0
    assert doc["host"]["cpus"] and "machine" in doc["host"]
    path = harness.write_json(doc, tmp_path / "out" / "demo.json")
    assert json.loads(path.read_text()) == doc
    png = harness.bar_chart(doc, tmp_path / "out" / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_processes_lists_dicts() -> None:
    for p in harness.busy_processes(threshold_pct=0.0, sample_s=0.05):
        assert {"pid", "name", "cpu_pct"} <= set(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Gate:
    """A stand-in for a restored server: refuses (503) until `refusals` requests were refused."""

    def __init__(self, refusals: int, text: str) -> None:
        self.left, self.text = refusals, text
        self.bodies: list[dict[str, object]] = []
        self.lock = threading.Lock()


def _server(port: int, gate: _Gate) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with gate.lock:
                gate.bodies.append(body)
                refuse = gate.left > 0
                gate.left -= refuse
            payload = json.dumps({"choices": [{"text": gate.text}]}).encode()
            self.send_response(503 if refuse else 200)
            self.send_header("Content-Length", str(0 if refuse else len(payload)))
            self.end_headers()
            if not refuse:
                self.wfile.write(payload)

        def log_message(self, *_a: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


@pytest.fixture
def serve() -> Iterator[list[ThreadingHTTPServer]]:
    started: list[ThreadingHTTPServer] = []
    yield started
    for s in started:
        s.shutdown()
        s.server_close()


def _target(port: int, canary: str) -> benchmark.Target:
    return benchmark.Target(Path("/nonexistent"), "127.0.0.1", port, "m", "p", 4, canary)


def test_first_answer_waits_through_refusals(serve: list[ThreadingHTTPServer]) -> None:
    """Connections refused (nothing listens yet), then 503s (the gate closed), then the first
    200: its time and text are what the client reports, and every refusal is counted."""
    port = _free_port()
    t = _target(port, " the canary")
    client = t.client()
    client.start()
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while client.answer.refused_connections < 2:  # it is knocking on a closed port
            assert time.monotonic() < deadline and client.is_alive()
            time.sleep(0.01)
        gate = _Gate(3, " the canary")
        s = _server(port, gate)
        serve.append(s)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        t0 = time.perf_counter()
        a = client.result(HANG_GUARD_S)
    finally:
        client.stop()
    assert a.error == "" and a.status == 200 and a.at is not None and a.at >= t0
    assert a.text == " the canary" and a.refusals == {503: 3} and a.refused_connections >= 2
    assert a.requests == a.refused_connections + 4
    assert gate.bodies[-1] == {"model": "m", "prompt": "p", "max_tokens": 4, "temperature": 0.0}
    t.check(a, "test")  # the canary's text: no error


def test_first_answer_must_be_the_canary(serve: list[ThreadingHTTPServer]) -> None:
    port = _free_port()
    s = _server(port, _Gate(0, "something else"))
    serve.append(s)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    t = _target(port, "the canary")
    client = t.client()
    client.start()
    a = client.result(HANG_GUARD_S)
    assert a.at is not None and a.refusals == {}
    with pytest.raises(Exception, match="not the canary"):
        t.check(a, "test")


def test_first_answer_gives_up_at_its_deadline() -> None:
    client = benchmark.FirstAnswer("127.0.0.1", _free_port(), {}, deadline_s=0.2)
    client.start()
    a = client.result(HANG_GUARD_S)
    assert a.at is None and "no answer 200" in a.error and a.refused_connections > 0
    with pytest.raises(Exception, match="no answer 200"):
        _target(1, "x").check(a, "test")


def test_json_tail_and_no_hot_set(tmp_path: Path) -> None:
    assert benchmark._json_tail('noise\n{"pid": 12, "x": {"y": 1}}\n') == {"pid": 12, "x": {"y": 1}}
    assert benchmark._json_tail("no json here") == {}
    from fastvllm.restore import hotset

    hot = hotset.path_of(tmp_path)
    hot.parent.mkdir()
    hot.write_text('{"version": 0}')
    with benchmark.no_hot_set(tmp_path):
        assert not hot.exists()
        hot.write_text("learned by the restore")  # a first restore learns its own
    assert hot.read_text() == '{"version": 0}'


def test_a_failed_command_ends_the_wait_for_its_first_answer() -> None:
    """A restore command that exits nonzero stops its client at once (no deadline's wait)."""
    import subprocess
    import sys

    client = benchmark.FirstAnswer("127.0.0.1", _free_port(), {})
    client.start()
    p = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], text=True)
    t0 = time.monotonic()
    a = benchmark._answer_or_exit(client, p)
    p.wait()
    assert a.at is None and not client.is_alive()
    assert time.monotonic() - t0 < benchmark.CLIENT_DEADLINE_S / 2  # a hang guard, not a timing claim


def test_the_client_asks_more_tokens_than_the_canary_and_checks_its_start() -> None:
    """The client's request is USER_REQUEST_TOKENS long whatever the canary's length (the
    user-wait figures stay comparable); its answer must begin with the canary's text, a canary
    cut inside a character included."""
    t = _target(1, " the canary")
    long = benchmark.Answer(at=1.0, text=" the canary and more", status=200)
    assert t.check(long, "test")
    cut = benchmark.Target(Path("/nonexistent"), "127.0.0.1", 1, "m", "p", 4, " caf\ufffd")
    assert cut.check(benchmark.Answer(at=1.0, text=" café au lait", status=200), "test")
    assert not t.check(benchmark.Answer(at=1.0, text=" another", status=200), "test", exact=False)
