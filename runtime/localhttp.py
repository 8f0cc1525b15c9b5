"""A small HTTP/1.1 client for the servers fastvllm runs on this host, on a plain socket.

Why not httpx: the servers speak plain HTTP on a local port, and fastvllm's requests to them
are a handful of small JSON calls (health, gate, canary, sleep/wake RPCs). httpx and what it
pulls in (click, rich, certifi, h11, anyio) took ~50 ms to import, on the path of every
`fastvllm restore`; the stdlib's http.client still took ~20 ms (it imports ssl, which loads
OpenSSL, and the email package to parse headers), so this module writes its requests and reads
the answers itself: a status line, headers, and a body by Content-Length, chunked, or up to
the close. A Client keeps its connection alive between requests (the health poll reuses one
socket) and reconnects once when the server closed an idle one. The timeout is per operation
(connect, each send and receive), as httpx's is.
"""

from __future__ import annotations

import json as _json
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any


class HTTPError(Exception):
    """A request that got no usable answer: refused, reset, timed out, or not HTTP."""


class HTTPStatusError(HTTPError):
    """`raise_for_status` on an answer of 400 or more."""


@dataclass
class Response:
    status_code: int
    reason: str
    content: bytes
    url: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; a ValueError when it is not."""
        return _json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            kind = "Client" if self.status_code < 500 else "Server"
            raise HTTPStatusError(f"{kind} error '{self.status_code} {self.reason}' for url '{self.url}'")


class _Disconnected(ConnectionResetError):
    """The server closed the connection before a byte of its answer (http.client's
    RemoteDisconnected)."""


class _NotHTTP(Exception):
    """An answer that is not HTTP/1.x, or cut short."""


# What a connection the server closed while idle looks like on the next request.
_STALE = (_Disconnected, ConnectionResetError, BrokenPipeError)
_MAX_HEAD = 1 << 16  # a status line and headers longer than this are not a server of ours
_NO_BODY = (204, 304)


class _Conn:
    """One connection: its socket, and what was received past the answer read last."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return chunk

    def head(self) -> bytes:
        """The status line and headers (without the blank line after them)."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise _NotHTTP("answer headers too long")
            if not self._more():
                if self.buf:
                    raise _NotHTTP("connection closed in the middle of the answer's headers")
                raise _Disconnected("Server disconnected without sending a response.")
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        return head

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise _NotHTTP(f"connection closed {n - len(self.buf)} bytes short of the answer")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD or not self._more():
                raise _NotHTTP("bad chunk in the answer")
        out, self.buf = self.buf[:end], self.buf[end + 2 :]
        return out

    def rest(self) -> bytes:
        """Everything up to the close (an answer without a length)."""
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out

    def chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            try:
                size = int(self.line().split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _NotHTTP("bad chunk size in the answer") from None
            if size == 0:
                while self.line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            self.exactly(2)  # the CRLF after each chunk

    def close(self) -> None:
        self.sock.close()


def _read_answer(conn: _Conn, method: str) -> tuple[int, str, bytes, bool]:
    """(status, reason, body, whether the server closes the connection after it)."""
    while True:
        lines = conn.head().decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _NotHTTP(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(code)
        headers = {}
        for raw in lines[1:]:
            name, _, value = raw.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 100:  # (an interim answer to Expect: 100-continue, which we never send)
            break
    conn_opts = headers.get("connection", "").lower()
    close = "close" in conn_opts or (version == "HTTP/1.0" and "keep-alive" not in conn_opts)
    if method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
        return status, reason, b"", close
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return status, reason, conn.chunked(), close
    length = headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise _NotHTTP(f"bad Content-Length {length!r}") from None
        return status, reason, conn.exactly(n), close
    return status, reason, conn.rest(), True


class Client:
    """Requests to one server, `host`:`port`, over one kept-alive connection; every request
    carries `headers`. Paths are given from the root (`/health`)."""

    def __init__(self, host: str, port: int, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = dict(headers or {})
        self._conn: _Conn | None = None

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def request(self, method: str, path: str, body: bytes | None = None, json: Any = None) -> Response:
        """Send one request and read the whole answer. Connection failures, timeouts and
        answers that are not HTTP raise HTTPError; any status is returned as it is."""
        headers = dict(self.headers)
        if json is not None:
            body = _json.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        reused = self._conn is not None
        try:
            return self._send(method, path, body, headers)
        except _STALE as e:
            self.close()
            if not reused:
                raise HTTPError(_describe(e)) from e
        except (OSError, _NotHTTP) as e:
            self.close()
            raise HTTPError(_describe(e)) from e
        try:  # the kept-alive connection had been closed by the server: once more, on a new one
            return self._send(method, path, body, headers)
        except (OSError, _NotHTTP) as e:
            self.close()
            raise HTTPError(_describe(e)) from e

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        if self._conn is None:
            self._conn = _Conn(self.host, self.port, self.timeout)
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{self.port}", "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        self._conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        status, reason, content, close = _read_answer(self._conn, method)
        if close:
            self.close()
        return Response(status, reason, content, self.url(path))

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, json: Any = None) -> Response:
        return self.request("POST", path, json=json)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _describe(e: BaseException) -> str:
    """The error as one short phrase, like httpx's messages (`timed out`, `[Errno 111] ...`)."""
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, _Disconnected):
        return "Server disconnected without sending a response."
    return str(e) or type(e).__name__


def get(host: str, port: int, path: str, timeout: float) -> Response:
    """One GET on a fresh connection (a probe)."""
    with Client(host, port, timeout) as c:
        return c.get(path)
