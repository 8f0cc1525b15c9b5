"""An OpenAI-compatible router in front of the serving instances, with live migration.

Clients talk to the router as to one vLLM server (`/v1/completions`, `/v1/models`). Plain
requests go to the instance of the model running the fewest streams (round robin among
equals) and are retried on another one when an instance cannot be reached (its host died).
Streamed completions are sessions that can be moved to another instance while they run
(ServerlessLLM's live migration, by tokens):

1. the router always asks the instance for token ids (`return_token_ids`), so it knows the
   prompt's ids and every token generated so far;
2. to migrate, it sends prompt + generated ids to the target with `max_tokens=1`: a
   prefill that leaves them in the target's prefix cache; the source keeps generating and
   the client keeps receiving, so rounds repeat until few new tokens are left to catch up
   (or until the rounds stop gaining, or the stream has fewer tokens left than a round falls
   behind: then the switch comes at once and the gap is re-prefilled inside the pause);
3. then it stops reading the source (closing the stream aborts the request there) and asks
   the target to continue from prompt + every token the client has received: the stream
   goes on from the target without a gap or a repeated token. Greedy decoding gives the same
   tokens as an unmigrated run; the pause at the switch is measured.

A drain migrates every session off an instance (or a host) and stops routing to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CATCH_UP_TOKENS = 2  # switch once the target is at most this many tokens behind
MAX_ROUNDS = 8
SESSION_HEADER = "x-fastvllm-session"  # a streamed response names its session (for migrate)
# A request header for tests and benchmarks: migrate this stream once N tokens have come. A
# small CPU model streams faster than any outside trigger can react (docs/decisions/migration.md).
MIGRATE_AFTER_HEADER = "x-fastvllm-migrate-after"


class Backends(Protocol):
    """Where the router finds instances: the controller (embedded or through Ray) or a list."""

    def instances(self) -> list[dict[str, str]]: ...  # {"url", "model", "host"}

    def failed(self, url: str) -> None: ...


@dataclass
class StaticBackends:
    """A fixed list of instances (tests, or a router in front of servers started by hand)."""

    items: list[dict[str, str]]

    def instances(self) -> list[dict[str, str]]:
        return list(self.items)

    def failed(self, url: str) -> None:
        self.items = [i for i in self.items if i["url"] != url]


class MigrationOutcome(StrEnum):
    """How a migration ended (an error inside its task is recorded as "error: ..." instead)."""

    SWITCHED = "switched"
    TARGET_FAILED = "target failed"
    FINISHED_ON_SOURCE = "finished on the source before the switch"


@dataclass
class CatchUpRound:
    """One re-prefill of the session's tokens on the target while the source streams on."""

    tokens: int  # prompt + generated tokens sent to the target
    seconds: float
    behind: int  # tokens the source generated meanwhile


@dataclass
class Migration:
    """One migration of a streamed session: its catch-up rounds, the switch and the pause. It
    fills in as the migration goes; `as_dict` (what the router serves) leaves out what is not
    known yet, so a client polling it sees `outcome` only once there is one. Times are
    time.perf_counter() values of the router's process."""

    session: str
    source: str  # "from" in the JSON
    to: str
    rounds: list[CatchUpRound] = field(default_factory=list)
    switch_because: str | None = None  # caught up, stalled, stream ending, max rounds
    outcome: str | None = None  # a MigrationOutcome, or "error: ..."
    last_source_token_at: float | None = None
    tokens_at_switch: int | None = None
    target_request_at: float | None = None
    target_headers_at: float | None = None
    first_target_token_at: float | None = None
    catch_up_s: float | None = None
    pause_s: float | None = None  # last token from the source to the first from the target
    pause_parts_s: dict[str, float] | None = None  # to_request, to_headers, to_first_token
    mean_token_gap_s: float | None = None  # with pause_s (null where the source sent one chunk)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session": self.session,
            "from": self.source,
            "to": self.to,
            "rounds": [asdict(r) for r in self.rounds],
        }
        for f in fields(self)[4:]:
            value = getattr(self, f.name)
            if value is not None or (f.name == "mean_token_gap_s" and self.pause_s is not None):
                out[f.name] = value
        return out


@dataclass
class Stream:
    id: str
    model: str
    backend: str
    max_tokens: int
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # when each chunk reached the client
    finished: bool = False
    migrate_to: str | None = None
    switch: asyncio.Event = field(default_factory=asyncio.Event)
    switched: asyncio.Event = field(default_factory=lambda: _set_event())  # set: no switch pending
    migrations: list[Migration] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "model": self.model,
            "backend": self.backend,
            "prompt_tokens": len(self.prompt_ids),
            "generated": len(self.generated),  # received from the instance (the client may lag)
            "max_tokens": self.max_tokens,
            "upstream_finished": self.finished,
            "migrations": [m.as_dict() for m in self.migrations],
        }


def _set_event() -> asyncio.Event:
    ev = asyncio.Event()
    ev.set()
    return ev


class MigrationError(Exception):
    pass


# what a backend that died (host gone, server killed) looks like from here
_BACKEND_GONE = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)


class Router:
    def __init__(self, backends: Backends, *, timeout: float = 600.0) -> None:
        self.backends = backends
        self.streams: dict[str, Stream] = {}
        self.draining: set[str] = set()
        self.failovers = 0  # streams resumed elsewhere because their instance died
        self.recent: list[Migration] = []  # the last 100 migrations, finished or not
        self._tasks: set[asyncio.Task[None]] = set()
        self._rr = itertools.count()
        self._timeout = timeout
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/fastvllm/sessions", self.sessions, methods=["GET"]),
                Route("/fastvllm/migrate", self.migrate_endpoint, methods=["POST"]),
                Route("/fastvllm/drain", self.drain_endpoint, methods=["POST"]),
                Route("/fastvllm/undrain", self.undrain_endpoint, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )
        self._client: httpx.AsyncClient | None = None
        self._sync: httpx.Client | None = None  # catch-up rounds, off the event loop

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
        return self._client

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    # -- routing ------------------------------------------------------------------------

    async def _candidates(self, model: str, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        insts = await run_in_threadpool(self.backends.instances)
        urls = [i["url"] for i in insts if i["model"] == model and i["url"] not in self.draining | exclude]
        if not urls:
            return []
        k = next(self._rr) % len(urls)
        order = urls[k:] + urls[:k]
        # Long streams pile up where plain round robin happens to send them when short requests
        # interleave; the fewest running streams first spreads them (stable sort: rotation
        # breaks ties). No await between here and the caller registering its stream, so two
        # streams arriving together see each other.
        running: dict[str, int] = {}
        for s in self.streams.values():
            if not s.finished:
                running[s.backend] = running.get(s.backend, 0) + 1
        return sorted(order, key=lambda u: running.get(u, 0))

    async def _failed(self, url: str) -> None:
        await run_in_threadpool(self.backends.failed, url)

    async def health(self, _: Request) -> Response:
        return Response(status_code=200)

    async def models(self, _: Request) -> JSONResponse:
        insts = await run_in_threadpool(self.backends.instances)
        names = sorted({i["model"] for i in insts})
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        model = body.get("model")
        if not isinstance(model, str):
            return _error(400, "the request names no model")
        if body.get("stream"):
            prompt = body.get("prompt")
            if not (
                isinstance(prompt, str)
                or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
            ):
                return _error(
                    400, "a streamed request through the router takes one prompt (text or token ids)"
                )
            if int(body.get("n", 1)) != 1:
                return _error(400, "a streamed request through the router takes n=1")
            urls = await self._candidates(model)
            if not urls:
                return _error(404, f"no instance serves {model}")
            s = Stream(f"cmpl-{uuid.uuid4().hex[:16]}", model, urls[0], int(body.get("max_tokens") or 16))
            self.streams[s.id] = s
            after = request.headers.get(MIGRATE_AFTER_HEADER)
            if after:  # keep a reference: the loop holds tasks weakly
                task = asyncio.create_task(self._migrate_after(s, int(after)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return StreamingResponse(
                self._stream(s, body), media_type="text/event-stream", headers={SESSION_HEADER: s.id}
            )
        tried: set[str] = set()
        while True:
            urls = await self._candidates(model, tried)
            if not urls:
                return _error(503 if tried else 404, f"no reachable instance serves {model}")
            url = urls[0]
            try:
                r = await self.client.post(f"{url}/v1/completions", json=body)
            except _BACKEND_GONE:
                tried.add(url)  # its host died: try another instance; greedy requests are idempotent
                await self._failed(url)
                continue
            return Response(r.content, status_code=r.status_code, media_type="application/json")

    # -- streams and migration ----------------------------------------------------------

    async def _stream(self, s: Stream, body: dict[str, Any]) -> AsyncIterator[bytes]:
        segment = 0
        tried: set[str] = set()
        try:
            while True:
                req = dict(body, stream=True, return_token_ids=True)
                if segment:  # continue from every token the client already has
                    req["prompt"] = s.prompt_ids + s.generated
                    req["max_tokens"] = s.max_tokens - len(s.generated)
                switching = False
                try:
                    async for item in self._segment(s, req, segment):
                        if item is None:
                            switching = True
                        else:
                            yield item
                except _BACKEND_GONE:
                    # The instance died (its host went): resume from the client's tokens on
                    # another one, as a migration would, unless nothing else serves the model.
                    tried.add(s.backend)
                    self.failovers += 1
                    await self._failed(s.backend)
                    if s.migrate_to and s.migrate_to not in tried:
                        switching = True  # a switch was asked for and the source died first
                    else:
                        if not s.switched.is_set():  # the new target died before its first token
                            s.migrations[-1].outcome = MigrationOutcome.TARGET_FAILED
                            s.switched.set()
                        urls = await self._candidates(s.model, tried)
                        if not urls:
                            msg = f"no reachable instance serves {s.model}"
                            yield _sse({"error": {"message": msg, "code": 503}})
                            break
                        s.backend, s.migrate_to = urls[0], None
                        s.switch.clear()
                        if s.prompt_ids:  # else nothing reached the client yet: start again
                            segment += 1
                        continue
                if not switching:
                    break
                assert s.migrate_to is not None
                last = s.token_times[-1] if s.token_times else time.perf_counter()
                s.migrations[-1].last_source_token_at = last
                s.migrations[-1].tokens_at_switch = len(s.generated)
                s.backend, s.migrate_to = s.migrate_to, None
                s.switch.clear()
                segment += 1
            yield b"data: [DONE]\n\n"
        finally:
            s.finished = True
            s.switched.set()  # a migration waiting on this stream must not wait forever
            # A migration still in a catch-up round when the stream ended never switched: say
            # so now, not when its round comes back (a client asking right after the end of its
            # stream found no outcome). One whose target already sent a token has switched;
            # `migrate` records that.
            rec = s.migrations[-1] if s.migrations else None
            if rec is not None and rec.outcome is None and rec.first_target_token_at is None:
                rec.outcome = MigrationOutcome.FINISHED_ON_SOURCE
            self.streams.pop(s.id, None)

    async def _segment(self, s: Stream, req: dict[str, Any], segment: int) -> AsyncIterator[bytes | None]:
        """Stream one backend's part of a session: SSE chunks for the client, then None when
        a migration asks to switch (leaving closes the stream: the backend aborts it)."""
        sent = time.perf_counter()
        async with self.client.stream("POST", f"{s.backend}/v1/completions", json=req) as r:
            if segment and not s.switched.is_set():  # where the pause goes: see `migrate`
                s.migrations[-1].target_request_at = sent
                s.migrations[-1].target_headers_at = time.perf_counter()
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                yield _sse({"error": {"message": text, "code": r.status_code}})
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                chunk["id"] = s.id
                for ch in chunk.get("choices", []):
                    if segment == 0 and ch.get("prompt_token_ids"):
                        s.prompt_ids = list(ch["prompt_token_ids"])
                    elif segment:
                        ch.pop("prompt_token_ids", None)
                    s.generated.extend(ch.get("token_ids") or [])
                    if ch.get("finish_reason"):
                        s.finished = True
                yield _sse(chunk)
                # buffered lines do not wait on I/O: without a yield to the event loop here a
                # fast stream starved the migrate request until it had ended
                await asyncio.sleep(0)
                now = time.perf_counter()
                s.token_times.append(now)
                if segment and not s.switched.is_set():  # the first token from the target
                    s.migrations[-1].first_target_token_at = now
                    s.switched.set()
                if s.switch.is_set() and not s.finished:
                    yield None
                    return

    def _prefill(self, target: str, body: dict[str, Any]) -> httpx.Response:
        if self._sync is None:
            self._sync = httpx.Client(timeout=self._timeout)
        return self._sync.post(f"{target}/v1/completions", json=body)

    async def _migrate_after(self, s: Stream, n: int) -> None:
        """The MIGRATE_AFTER_HEADER hook: migrate once n tokens have come from the source."""
        while len(s.generated) < n and not s.finished:
            await asyncio.sleep(0.001)
        try:
            await self.migrate(s.id)
        except Exception as e:  # kept with the session's record instead of lost in the task
            if s.migrations and s.migrations[-1].outcome is None:
                s.migrations[-1].outcome = f"error: {e!r}"

    async def migrate(self, session: str, target: str | None = None, *, urgent: bool = False) -> Migration:
        """Move a streamed session to `target` (another instance of its model when None) and
        return what it cost: catch-up rounds, re-prefilled tokens and the pause at the switch.
        `urgent` (a drain): getting off the source matters more than the pause, so the switch
        comes as soon as a round fails to gain, the first round included, and the re-prefill
        of the gap left goes into the pause; otherwise catch-up goes on while rounds gain."""
        s = self.streams.get(session)
        if s is None or s.finished:
            raise MigrationError(f"no running session {session}")
        if target is None:
            urls = await self._candidates(s.model, {s.backend})
            if not urls:
                raise MigrationError(f"no other instance serves {s.model}")
            target = urls[0]
        if target == s.backend:
            raise MigrationError("the target is the session's own instance")
        while not s.prompt_ids and not s.finished:  # the first chunk carries the prompt's ids
            await asyncio.sleep(0.005)
        rec = Migration(s.id, s.backend, target)
        s.migrations.append(rec)
        self.recent.append(rec)
        del self.recent[:-100]
        t0 = time.perf_counter()
        while not s.finished:
            n = len(s.generated)
            t = time.perf_counter()
            body = {"model": s.model, "prompt": s.prompt_ids + s.generated[:n], "max_tokens": 1}
            # on a thread: a fast stream keeps this event loop busy, and the round's reply
            # must not wait in line behind its chunks
            r = await run_in_threadpool(self._prefill, target, body | {"temperature": 0.0})
            if r.status_code != 200:
                raise MigrationError(f"target {target} refused the re-prefill: {r.text[:200]}")
            behind = len(s.generated) - n
            rec.rounds.append(CatchUpRound(len(s.prompt_ids) + n, time.perf_counter() - t, behind))
            rounds = rec.rounds
            # Switch when close enough. Otherwise go on while rounds gain on the source: each
            # round re-prefills only what the last one left (the rest is in the target's prefix
            # cache), and prefill outruns decode. Give up and switch with the gap still open
            # only when two rounds in a row did not gain (a target slower than the source), or
            # after MAX_ROUNDS; the final prefill then covers the rest, inside the pause. The
            # first round is never judged: it can be slow for reasons that do not repeat (the
            # target's first request on a busy host), and switching after it with hundreds of
            # tokens behind puts their re-prefill inside the pause. A drain (`urgent`) keeps that
            # old rule: under heavy load its streams would otherwise often end before leaving
            # the host. And whatever the round: when fewer tokens are left to generate than the
            # last round fell behind, the next round would most likely outlast the stream and
            # the migration would come to nothing (on busy cores prefill barely outruns
            # decode): switch now and pay the gap in the pause (docs/decisions/migration.md).
            ending = s.max_tokens - len(s.generated) <= behind
            if urgent:
                closed = rounds[-2].behind if len(rounds) > 1 else n
                stalled = behind >= closed
            else:
                last = [r.behind for r in rounds[-3:]]
                stalled = len(last) == 3 and last[2] >= last[1] >= last[0]
            why = (
                "caught up"
                if behind <= CATCH_UP_TOKENS
                else "stalled"
                if stalled
                else "stream ending"
                if ending
                else "max rounds"
                if len(rounds) >= MAX_ROUNDS
                else ""
            )
            if why:
                rec.switch_because = why
                break
        if s.finished:
            if rec.outcome is None:
                rec.outcome = MigrationOutcome.FINISHED_ON_SOURCE
            s.switched.set()
            return rec
        s.switched.clear()
        s.migrate_to = target
        s.switch.set()
        await s.switched.wait()
        if rec.outcome is not None:  # the target failed at the switch; the stream went on elsewhere
            return rec
        rec.catch_up_s = time.perf_counter() - t0
        first, last_src = rec.first_target_token_at, rec.last_source_token_at
        if first is not None and last_src is not None:
            rec.pause_s = first - last_src
            sent, headers = rec.target_request_at, rec.target_headers_at
            if sent is not None and headers is not None:  # the pause in parts: closing the
                # source, the target's response headers, its first token
                rec.pause_parts_s = {
                    "to_request": sent - last_src,
                    "to_headers": headers - sent,
                    "to_first_token": first - headers,
                }
            # chunks arrive in bursts on a busy host (a median gap can be 0): the mean interval
            # between the source's chunks is the fair yardstick for the pause
            src = [t for t in s.token_times if t <= last_src]
            rec.mean_token_gap_s = (src[-1] - src[0]) / (len(src) - 1) if len(src) > 1 else None
            rec.outcome = MigrationOutcome.SWITCHED
        else:
            rec.outcome = MigrationOutcome.FINISHED_ON_SOURCE
        return rec

    async def drain(self, *, backend: str | None = None, host: str | None = None) -> list[dict[str, Any]]:
        """Stop routing to `backend` (or every instance on `host`) and migrate its sessions."""
        insts = await run_in_threadpool(self.backends.instances)
        urls = {backend} if backend else {i["url"] for i in insts if i.get("host") == host}
        if not urls or None in urls:
            raise MigrationError(f"nothing to drain: no instance {backend or 'on host ' + str(host)}")
        self.draining |= urls
        moving = [s for s in self.streams.values() if s.backend in urls and not s.finished]
        got = await asyncio.gather(*(self.migrate(s.id, urgent=True) for s in moving), return_exceptions=True)
        return [g.as_dict() if isinstance(g, Migration) else {"error": str(g)} for g in got]

    async def sessions(self, _: Request) -> JSONResponse:
        sessions = [s.as_dict() for s in self.streams.values()]
        return JSONResponse(
            {
                "sessions": sessions,
                "failovers": self.failovers,
                "recent_migrations": [m.as_dict() for m in self.recent],
            }
        )

    async def migrate_endpoint(self, request: Request) -> JSONResponse:
        body = await request.json()
        try:
            return JSONResponse((await self.migrate(str(body.get("session")), body.get("to"))).as_dict())
        except MigrationError as e:
            return _error(409, str(e))

    async def undrain_endpoint(self, request: Request) -> JSONResponse:
        """Route to drained instances again (all of them, or one `backend`)."""
        body = await request.json() if await request.body() else {}
        if body.get("backend"):
            self.draining.discard(body["backend"])
        else:
            self.draining.clear()
        return JSONResponse({"drained": sorted(self.draining)})

    async def drain_endpoint(self, request: Request) -> JSONResponse:
        body = await request.json()
        try:
            got = await self.drain(backend=body.get("backend"), host=body.get("host"))
        except MigrationError as e:
            return _error(409, str(e))
        return JSONResponse({"drained": sorted(self.draining), "migrations": got})


def _sse(doc: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(doc)}\n\n".encode()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


class Served:
    """A router served by uvicorn on a background thread (embedded runtime, tests, Ray actor)."""

    def __init__(self, router: Router, host: str, port: int) -> None:
        import uvicorn

        self.router = router
        self.url = f"http://{host}:{port}"
        cfg = uvicorn.Config(router.app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name="fastvllm-router", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the router could not listen on {host}:{port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def controller_backends(
    routes: Callable[[], list[dict[str, str]]], failed: Callable[[str], None]
) -> Backends:
    """Adapt two callables (e.g. a controller's, local or through Ray) to `Backends`."""

    class _B:
        def instances(self) -> list[dict[str, str]]:
            return routes()

        def failed(self, url: str) -> None:
            with contextlib.suppress(Exception):
                failed(url)

    return _B()


def main(argv: list[str] | None = None) -> None:
    """A standalone router over fixed instances, e.g. two servers started by hand:
    python -m fastvllm.scheduler.router --port 8100 --instance http://127.0.0.1:8000=MODEL ..."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--instance", action="append", default=[], help="URL=MODEL (repeatable)")
    a = ap.parse_args(argv)
    items = []
    for spec in a.instance:
        url, _, model = spec.partition("=")
        items.append({"url": url, "model": model, "host": url.rsplit("//", 1)[-1]})
    served = Served(Router(StaticBackends(items)), a.host, a.port)
    print(f"router at {served.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    served.stop()


if __name__ == "__main__":
    main()
