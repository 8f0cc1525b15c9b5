"""runtime/localhttp.py, the stdlib client fastvllm talks to its servers with: one kept-alive
connection, the control token on every request, JSON bodies, and the errors vllm_server turns
into ServerError. Against a real HTTP/1.1 server (http.server) on a free port of this host."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from fastvllm.runtime import control_guard, localhttp


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    seen: ClassVar[list[tuple[str, str, str, int, bytes]]] = []  # (method, path, token, client port, body)

    def _answer(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record(b"")
        self._answer(404 if self.path == "/missing" else 200, {"path": self.path})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        self._answer(200, {"got": json.loads(body) if body else None})

    def _record(self, body: bytes) -> None:
        token = self.headers.get(control_guard.TOKEN_HEADER, "")
        self.seen.append((self.command, self.path, token, self.client_address[1], body))

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=30)


def test_requests_share_one_connection_and_carry_the_token(server: ThreadingHTTPServer) -> None:
    port = server.server_address[1]
    with localhttp.Client("127.0.0.1", port, 10.0, {control_guard.TOKEN_HEADER: "secret"}) as c:
        r1 = c.get("/health")
        r2 = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r1.status_code == 200 and r1.json() == {"path": "/health"}
    assert r2.json() == {"got": {"prompt": "x", "max_tokens": 2}}
    assert r1.url == f"http://127.0.0.1:{port}/health"
    (m1, _, tok1, port1, _), (m2, _, tok2, port2, _) = _Handler.seen
    assert (m1, m2, tok1, tok2) == ("GET", "POST", "secret", "secret")
    assert port1 == port2  # one connection, kept alive


def test_a_connection_the_server_closed_is_opened_again(server: ThreadingHTTPServer) -> None:
    with localhttp.Client("127.0.0.1", server.server_address[1], 10.0) as c:
        assert c.get("/close").status_code == 200
        assert c.get("/health").status_code == 200
    assert _Handler.seen[0][3] != _Handler.seen[1][3]


def test_statuses_are_answers_and_raise_for_status_says_which(server: ThreadingHTTPServer) -> None:
    with localhttp.Client("127.0.0.1", server.server_address[1], 10.0) as c:
        r = c.get("/missing")
    assert r.status_code == 404 and "missing" in r.text
    with pytest.raises(localhttp.HTTPStatusError, match="404"):
        r.raise_for_status()


def test_no_server_and_no_answer_are_http_errors() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(localhttp.HTTPError, match="refused"):
        localhttp.get("127.0.0.1", port, "/health", timeout=5.0)
    with socket.socket() as mute:  # accepts, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        with pytest.raises(localhttp.HTTPError, match="timed out"):
            localhttp.get("127.0.0.1", mute.getsockname()[1], "/health", timeout=0.5)


def _one_answer(raw: bytes) -> tuple[socket.socket, threading.Thread]:
    """A server that reads one request and writes `raw` back, then closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(raw)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n",
         b"hello world"),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close", b"until the close"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)  # fmt: skip
def test_chunked_unsized_and_empty_answers_are_read_whole(raw: bytes, body: bytes) -> None:
    srv, t = _one_answer(raw)
    try:
        r = localhttp.get("127.0.0.1", srv.getsockname()[1], "/x", timeout=10.0)
    finally:
        t.join(timeout=30)
        srv.close()
    assert r.content == body


@pytest.mark.parametrize(
    "raw",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b"HTTP/1.1 200"],
)
def test_answers_that_are_not_http_or_cut_short_are_http_errors(raw: bytes) -> None:
    srv, t = _one_answer(raw)
    try:
        with pytest.raises(localhttp.HTTPError):
            localhttp.get("127.0.0.1", srv.getsockname()[1], "/x", timeout=10.0)
    finally:
        t.join(timeout=30)
        srv.close()
