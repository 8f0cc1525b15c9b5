"""The guard fastvllm puts in front of every vLLM server it launches (vLLM's own
`--middleware fastvllm.runtime.control_guard.ControlGuard`), inside the API server process.

Two jobs, both in one pure ASGI middleware (nothing heavy imported: it runs inside vLLM):

- **Control endpoints are fastvllm's alone.** fastvllm needs vLLM's development endpoints
  (`/collective_rpc`, `/sleep`, `/wake_up`, ...), which vLLM serves to anyone. Here only the
  public API (an allowlist: inference, health, metrics, docs) is open; every other path needs
  the server's secret token in the `X-Fastvllm-Token` header, and answers 403 without it. The
  token comes from the environment (`FASTVLLM_CONTROL_TOKEN`: /proc/PID/environ is readable
  by the server's owner only, unlike its command line) and is kept in the snapshot's 0600
  manifest and the 0600 instance record, because a restored server keeps it in its memory.
- **No answer before ready.** A readiness gate in the process's memory: while closed, every
  request without the token gets 503 with `Retry-After`, `/health` included, so a load
  balancer never reaches a half-restored server. fastvllm closes it before it releases the
  weights for a snapshot (so a restored tree starts closed: CRIU brings back the listening
  socket and this memory together) and opens it once the restore's canary has passed.
  Closing waits until the public requests in flight have finished (a streamed response counts
  until its last byte was sent), so releasing the weights never races a request.

`POST /fastvllm/gate?state=closed|open[&drain_timeout=S]` (token required) moves the gate and
answers `{"gate": ..., "in_flight": n}`; GET reads it. A close that cannot drain within the
timeout reopens the gate and answers 409: the caller must not go on to release anything.
"""

from __future__ import annotations

import enum
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastvllm.runtime import config

if TYPE_CHECKING:  # asyncio (~15 ms) only where the middleware runs: inside the server
    import asyncio

TOKEN_ENV = config.CONTROL_TOKEN.name
TOKEN_HEADER = "X-Fastvllm-Token"
GATE_PATH = "/fastvllm/gate"
MIDDLEWARE = "fastvllm.runtime.control_guard.ControlGuard"
DRAIN_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1

# What anyone may ask (while the gate is open): vLLM's inference APIs (OpenAI, Anthropic,
# Cohere, SageMaker, pooling, speech, token-in-token-out), health and load probes, metrics,
# tokenizer helpers and the API docs. Everything else vLLM serves (dev mode's /collective_rpc,
# /sleep, /wake_up, /reset_*_cache, /pause, weight updates, LoRA loading, profiling, elastic
# scaling, request aborts, server_info...) is control: token only. New vLLM paths are control
# until listed here.
PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/ping",
        "/version",
        "/load",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/tokenize",
        "/detokenize",
        "/invocations",
        "/pooling",
        "/classify",
        "/score",
        "/rerank",
        "/generative_scoring",
        "/v1/models",
        "/v1/completions",
        "/v1/completions/render",
        "/v1/completions/derender",
        "/v1/chat/completions",
        "/v1/chat/completions/batch",
        "/v1/chat/completions/render",
        "/v1/chat/completions/derender",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/messages/render",
        "/v1/embeddings",
        "/v1/score",
        "/v1/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/realtime",
        "/v1/systemone",
        "/v2/rerank",
        "/v2/embed",
        "/inference/v1/generate",
        "/cohere/v2/chat",
        "/cohere/v2/chat/render",
    }
)
# Paths under these (a response by id, a model by name, the metrics app, offline docs' files).
PUBLIC_PREFIXES = ("/v1/responses/", "/v1/models/", "/metrics/", "/static/")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Gate(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def new_token() -> str:
    """A fresh per-server secret (256 bits)."""
    return secrets.token_urlsafe(32)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _json_body(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class ControlGuard:
    """ASGI middleware: the token check for control paths and the readiness gate (see module
    docstring). vLLM instantiates it with the app (`app.add_middleware(ControlGuard)`), so the
    token is read from the environment; tests pass it directly."""

    def __init__(self, app: ASGIApp, token: str | None = None, gate: Gate = Gate.OPEN) -> None:
        token = config.CONTROL_TOKEN.get() if token is None else token
        if not token:  # fail closed: a guard without a secret would guard nothing
            raise RuntimeError(f"{TOKEN_ENV} is not set: fastvllm's control guard cannot start without it")
        self.app = app
        self._token = token.encode()
        self.gate = gate
        self.in_flight = 0  # public requests running (the token's own are fastvllm's)
        self._idle: asyncio.Event | None = None  # set when in_flight drops to 0 while closing

    def _has_token(self, scope: Scope) -> bool:
        want = TOKEN_HEADER.lower().encode()
        for name, value in scope.get("headers") or ():
            if name.lower() == want:
                return hmac.compare_digest(value, self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if self._has_token(scope):
            if path == GATE_PATH and scope["type"] == "http":
                await self._gate_endpoint(scope, send)
                return
            await self.app(scope, receive, send)
            return
        if not is_public(path):
            await _refuse(scope, send, 403, f"{path} is a control endpoint of this server (fastvllm)")
            return
        if self.gate is Gate.CLOSED:
            await _refuse(scope, send, 503, "the server is not ready yet", retry_after=RETRY_AFTER_S)
            return
        # No await between the gate's check and the count: a close sees every request it let in.
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)  # returns once a streamed body is sent or abandoned
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def _gate_endpoint(self, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        if method == "GET":
            await _respond(send, 200, {"gate": self.gate.value, "in_flight": self.in_flight})
            return
        if method != "POST":
            await _respond(send, 405, {"error": "use GET or POST"})
            return
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        state = (query.get("state") or [""])[0]
        try:
            want = Gate(state)
            drain = float((query.get("drain_timeout") or [str(DRAIN_TIMEOUT_S)])[0])
        except ValueError:
            await _respond(send, 400, {"error": "state must be 'open' or 'closed'; drain_timeout seconds"})
            return
        if want is Gate.OPEN:
            self.gate = Gate.OPEN
            await _respond(send, 200, {"gate": "open", "in_flight": self.in_flight})
            return
        was = self.gate
        self.gate = Gate.CLOSED
        if not await self._drain(drain):
            self.gate = was  # the caller must not release anything: serve on as before
            await _respond(
                send,
                409,
                {
                    "error": f"{self.in_flight} client requests still running after {drain:g} s",
                    "gate": self.gate.value,
                    "in_flight": self.in_flight,
                },
            )
            return
        await _respond(send, 200, {"gate": "closed", "in_flight": 0})

    async def _drain(self, timeout: float) -> bool:
        """Wait until no public request runs (the gate is closed, so none starts)."""
        import asyncio

        deadline = time.monotonic() + max(timeout, 0.0)
        while self.in_flight > 0:
            self._idle = asyncio.Event()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except TimeoutError:
                return self.in_flight == 0
            finally:
                self._idle = None
        return True


async def _respond(
    send: Send, status: int, doc: dict[str, object], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = _json_body(doc)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(
    scope: Scope, send: Send, status: int, message: str, retry_after: int | None = None
) -> None:
    if scope["type"] == "websocket":  # closing before accepting refuses the handshake (HTTP 403)
        await send({"type": "websocket.close", "code": 1013 if status == 503 else 1008})
        return
    extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
    await _respond(send, status, {"error": message}, extra)
