"""A small HTTP/1.1 client for the servers fastvllm runs on this host (stdlib http.client).

Why not httpx: the servers speak plain HTTP on a local port, and fastvllm's requests to them
are a handful of small JSON calls (health, gate, canary, sleep/wake RPCs). httpx and what it
pulls in (click, rich, certifi, h11, anyio) took ~50 ms to import, on the path of every
`fastvllm restore`; this module imports in about a millisecond. A Client keeps its
connection alive between requests (the health poll reuses one socket) and reconnects once
when the server closed an idle one. The timeout is per operation (connect, each send and
receive), as httpx's is.
"""

from __future__ import annotations

import http.client
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


# What a connection the server closed while idle looks like on the next request.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class Client:
    """Requests to one server, `host`:`port`, over one kept-alive connection; every request
    carries `headers`. Paths are given from the root (`/health`)."""

    def __init__(self, host: str, port: int, timeout: float, headers: dict[str, str] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = dict(headers or {})
        self._conn: http.client.HTTPConnection | None = None

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
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise HTTPError(_describe(e)) from e
        try:  # the kept-alive connection had been closed by the server: once more, on a new one
            return self._send(method, path, body, headers)
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise HTTPError(_describe(e)) from e

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._conn.request(method, path, body=body, headers=headers)
        r = self._conn.getresponse()
        content = r.read()
        if r.will_close:
            self.close()
        return Response(r.status, r.reason, content, self.url(path))

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
    if isinstance(e, http.client.RemoteDisconnected):
        return "Server disconnected without sending a response."
    return str(e) or type(e).__name__


def get(host: str, port: int, path: str, timeout: float) -> Response:
    """One GET on a fresh connection (a probe)."""
    with Client(host, port, timeout) as c:
        return c.get(path)
