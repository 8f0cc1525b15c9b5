"""`fastvllm bench`: what a user waits for a server, from a vLLM cold start and from a restore.

Every restore column is timed from the user's side: a separate client (`FirstAnswer`, a
thread with its own connections) sends small completion requests to the snapshot's address in
a tight loop while the restore runs; the clock runs from spawning the command (`fastvllm
restore DIR`, the installed console script) or creating the container (`docker run`), to the
first request answered 200, and that answer's text must be the snapshot's canary. Until the
restored server's readiness gate opens, every request is refused (no connection, or 503).
The in-process figure (`api.restore`'s own time to first completion, inside a process that
has already imported fastvllm) is a column too, never the headline.

Columns, each `--reps` times (medians, every run listed), page cache warm and cold (cold:
`system.drop_page_cache()`, which drops fastvllm's own files and the interpreter's too):

- vLLM cold start: launch to the first completion (cold page cache; vLLM's compile caches
  stay warm, as on a host that has run vLLM before);
- in-process: `api.restore(...).time_to_first_completion_s`;
- the command: `fastvllm restore DIR` to the first 200 (the snapshot's hot set was learned
  when it was taken);
- the command, first restore of the snapshot on a host without a hot set (its `local/hot.json`
  set aside for the run: what every first restore waited before snapshots learned it);
- through the resident agent (`fastvllm agent`), when this installation has one;
- the container: `docker run` of the image's entrypoint restoring a snapshot it took, when a
  Docker engine answers and the image is there.

    fastvllm bench --reps 5 --out results/coldstart/DATE-user-wait
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastvllm.runtime import bench_harness as harness

# The client's request: the canary's prompt, 24 greedy tokens. Every user-wait figure is timed
# with it (the canary had 24 tokens before it was shortened), so figures stay comparable.
USER_REQUEST_TOKENS = 24
REFUSAL_PAUSE_S = 0.005  # between two refused requests: the client must not take the restore's CPU
CLIENT_DEADLINE_S = 300.0
CONTAINER_IMAGE = "fastvllm-test-cpu:latest"  # scripts/docker_image.py builds it from Dockerfile.criu
CONTAINER_PORT = 8000
STOP_GRACE_S = 2.0  # a restored server gets this long to exit before SIGKILL (not timed)


def _BenchError(message: str) -> Exception:
    """A run that did not give a figure: one line, the fastvllm error kind the CLI reports."""
    from fastvllm.runtime.errors import ServerError

    return ServerError(f"bench: {message}", hint="see the server's log in the snapshot's logs/ folder")


@dataclass
class Answer:
    """What the client saw: when the first 200 came (perf_counter), its text, and the refusals
    before it (connections refused or reset, and answers other than 200, by status)."""

    at: float | None = None
    text: str = ""
    status: int = 0
    refused_connections: int = 0
    refusals: dict[int, int] = field(default_factory=dict)
    error: str = ""

    @property
    def requests(self) -> int:
        return self.refused_connections + sum(self.refusals.values()) + (1 if self.at is not None else 0)


class FirstAnswer(threading.Thread):
    """A client apart from the restore: POSTs a small /v1/completions request to host:port, one
    connection per request, again and again until one is answered 200 (or `stop()`, or its
    deadline). The answer is what a user's first successful request gets."""

    def __init__(
        self,
        host: str,
        port: int,
        body: dict[str, Any],
        *,
        deadline_s: float = CLIENT_DEADLINE_S,
        pause_s: float = REFUSAL_PAUSE_S,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(name="fastvllm-bench-client", daemon=True)
        self.host, self.port = host, port
        self.payload = json.dumps(body).encode()
        self.deadline_s, self.pause_s, self.timeout_s = deadline_s, pause_s, timeout_s
        self.answer = Answer()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        end = time.monotonic() + self.deadline_s
        a = self.answer
        while not self._halt.is_set():
            if time.monotonic() > end:
                a.error = f"no answer 200 within {self.deadline_s:.0f} s"
                return
            try:
                status, body = self._post()
            except (OSError, http.client.HTTPException):
                a.refused_connections += 1
                self._halt.wait(self.pause_s)
                continue
            if status == 200:
                a.at, a.status = time.perf_counter(), status
                try:
                    a.text = str(json.loads(body)["choices"][0]["text"])
                except (ValueError, LookupError, TypeError) as e:
                    a.error = f"answer 200 without a completion: {e}"
                return
            a.refusals[status] = a.refusals.get(status, 0) + 1
            self._halt.wait(self.pause_s)

    def _post(self) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request(
                "POST",
                "/v1/completions",
                self.payload,
                {"Content-Type": "application/json", "Connection": "close"},
            )
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def result(self, timeout: float) -> Answer:
        """Wait for the first 200 (at most `timeout` s more) and return what was seen."""
        self.join(timeout)
        if self.is_alive():
            self.stop()
            self.join(5.0)
            self.answer.error = self.answer.error or f"no answer 200 within {timeout:.0f} s"
        return self.answer


# --- what the restores need to know of the snapshot -----------------------------------------


@dataclass(frozen=True)
class Target:
    """A snapshot, and how a client reaches it and checks its answer."""

    path: Path
    host: str
    port: int
    model: str
    prompt: str
    max_tokens: int
    canary_text: str

    @classmethod
    def of(cls, path: Path) -> Target:
        from fastvllm.runtime import manifest, vllm_server

        m = manifest.load(path)
        return cls(
            path,
            vllm_server.connect_host(m.server.host),
            m.server.port,
            m.server.served_model_name,
            m.canary.prompt,
            max(USER_REQUEST_TOKENS, m.canary.max_tokens),
            m.canary.text,
        )

    def body(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0.0}

    def client(self, host: str | None = None, port: int | None = None) -> FirstAnswer:
        return FirstAnswer(host or self.host, port or self.port, self.body())

    def check(self, a: Answer, what: str, *, exact: bool = True) -> bool:
        """Did the client get an answer, and does it begin with the canary's text (the client
        asks USER_REQUEST_TOKENS tokens, the canary may have fewer)? Without `exact` a
        different text is reported, not an error: on a GPU the same prompt asked a second time
        (the restore's canary asked it first) may be computed through vLLM's prefix cache, and
        a model of random bf16 weights, whose logits nearly tie, then drifts after a few tokens.
        The restore's own canary, and the e2e test's token and logprob comparison, are the proof."""
        if a.at is None:
            raise _BenchError(f"{what}: {a.error or 'no answer'}")
        # a canary cut inside a character ends in U+FFFD where the longer answer has the character
        same = a.text.startswith(self.canary_text.rstrip("\ufffd"))
        if not same and exact:
            raise _BenchError(f"{what}: the first answer {a.text!r} is not the canary {self.canary_text!r}")
        return same


def _cold(cold: bool) -> bool:
    from fastvllm.runtime import system

    return system.drop_page_cache() if cold else False


def _stop_server(pid: int) -> None:
    """Stop a restored server and wait until every process of it is gone: the next restore
    needs its PIDs and port."""
    from fastvllm.runtime import instances, proctree

    tree = proctree.session_pids(pid) or [pid]
    with contextlib.suppress(Exception):
        instances.stop(pid, grace=STOP_GRACE_S)
    proctree.wait_gone(tree, 60.0, reaped=True)


# --- one run of each kind --------------------------------------------------------------------


def cold_start_once(model: str, port: int, log: Path) -> float:
    """Launch → healthy → first completion, as a user of plain vLLM waits for it."""
    from fastvllm.runtime import instances, proctree, system, vllm_server

    system.ensure_io_uring_disabled()  # same launch conditions as a snapshotted server
    proctree.adopt_orphans()
    spec = vllm_server.LaunchSpec(model, port)
    t0 = time.perf_counter()
    server = vllm_server.launch(spec, log)
    try:
        vllm_server.wait_healthy(server, 900.0, alive=lambda: proctree.alive(server.pid))
        name = vllm_server.served_model_name(server)
        vllm_server.complete(server, name, vllm_server.CANARY_PROMPT, 8)
        return time.perf_counter() - t0
    finally:
        tree = proctree.session_pids(server.pid)
        instances.stop(server.pid)
        if server.proc is not None:
            server.proc.wait()
        proctree.wait_gone(tree, 30.0, reaped=True)


def in_process_once(t: Target, cold: bool) -> tuple[float, dict[str, Any]]:
    """`api.restore` in this process: its own time to the first completion."""
    from fastvllm import api

    dropped = _cold(cold)
    r = api.restore(t.path)
    try:
        ra = r.readahead or {}
        detail = {
            "page_cache_dropped": dropped,
            "phases": {k: round(v, 4) for k, v in r.timeline.durations().items()},
            "hot_set_read_bytes": ra.get("hot_bytes", 0),
            "files_hashed": ra.get("hashed_files", 0),
        }
        return r.time_to_first_completion_s, detail
    finally:
        _stop_server(r.server.pid)


def fastvllm_command() -> list[str]:
    """The installed console script beside this interpreter (what a user types), else the
    module run by this interpreter."""
    exe = Path(sys.executable).parent / "fastvllm"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fastvllm.cli"]


def split_user_wait(spawned: float, answered: float, doc: dict[str, Any]) -> dict[str, float]:
    """Where a user's wait went, from the command's JSON: `command_start_s` from the spawn to
    the restore's first phase (the interpreter, imports, or the agent's hand-over), then the
    restore's own time to its first completion, then `after_gate_s` until the client's answer
    (its own completion). Both clocks are the host's monotonic one; {} for a command too old
    to say."""
    origin, ttfc = doc.get("timeline_origin_s"), doc.get("time_to_first_completion_s")
    if not isinstance(origin, (int, float)) or not isinstance(ttfc, (int, float)):
        return {}
    return {
        "command_start_s": round(origin - spawned, 4),
        "after_gate_s": round(answered - origin - ttfc, 4),
    }


def command_once(
    t: Target,
    cold: bool,
    cmd: list[str] | None = None,
    *,
    agent: bool = False,
    extra: list[str] | None = None,
    keep_result: bool = False,
    exact_text: bool = True,
) -> tuple[float, dict[str, Any]]:
    """Spawn `fastvllm restore DIR --json` and time it to the first 200 its client gets; the
    command's own figure (its in-process time to first completion) and exit go in the details.
    Without `agent` the command restores itself even where a resident agent runs (FASTVLLM_AGENT=0)."""
    dropped = _cold(cold)
    client = t.client()
    client.start()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [*(cmd or fastvllm_command()), "restore", str(t.path), "--json", *(extra or [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FASTVLLM_AGENT": "1" if agent else "0"},
    )
    pid = 0
    try:
        a = _answer_or_exit(client, p)
        out, err = p.communicate(timeout=CLIENT_DEADLINE_S)
        exited = time.perf_counter() - t0
        doc = _json_tail(out)
        pid = int(doc.get("pid") or 0)
        if p.returncode != 0:
            raise _BenchError(f"fastvllm restore exited {p.returncode}: {err.strip()[-500:]}")
        same = t.check(a, "fastvllm restore", exact=exact_text)
        assert a.at is not None
        return a.at - t0, {
            "page_cache_dropped": dropped,
            "command_exited_s": round(exited, 4),
            "in_process_s": doc.get("time_to_first_completion_s"),
            **split_user_wait(t0, a.at, doc),
            "answer_is_canary": same,
            **({"result": doc} if keep_result else {}),
            "refused_connections": a.refused_connections,
            "refusals": a.refusals,
        }
    finally:
        client.stop()
        if p.poll() is None:
            p.kill()
            p.wait()
        if pid:
            _stop_server(pid)
        else:
            _stop_by_port(t)


def _answer_or_exit(client: FirstAnswer, p: subprocess.Popen[str]) -> Answer:
    """The client's first 200, without waiting out its deadline for a command that failed."""
    end = time.monotonic() + CLIENT_DEADLINE_S
    while client.is_alive() and time.monotonic() < end:
        if p.poll() not in (None, 0):
            client.stop()
        client.join(0.02)
    return client.result(1.0)


def _json_tail(out: str) -> dict[str, Any]:
    """The JSON document the command printed (the last one, should anything precede it)."""
    start = out.find("{")
    while start >= 0:
        try:
            doc = json.loads(out[start:])
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            start = out.find("{", start + 1)
    return {}


def _stop_by_port(t: Target) -> None:
    """A failed command may leave a server it restored: stop what fastvllm knows on the port."""
    from fastvllm.runtime import instances

    for inst in instances.running():
        if inst.port == t.port:
            _stop_server(inst.pid)


def _hot_bytes(t: Target) -> int:
    from fastvllm.restore import hotset
    from fastvllm.runtime import manifest

    hot = hotset.load(t.path, {f.path: f.size for f in manifest.load(t.path).files})
    return hot.bytes if hot is not None else 0


@contextlib.contextmanager
def no_hot_set(path: Path) -> Any:
    """The snapshot without its hot set for the block (a first restore on a host where it was not
    learned): `local/hot.json` is set aside, and put back after (the restore learns its own)."""
    from fastvllm.restore import hotset

    hot = hotset.path_of(path)
    saved = hot.read_bytes() if hot.is_file() else None
    hot.unlink(missing_ok=True)
    try:
        yield
    finally:
        if saved is None:
            hot.unlink(missing_ok=True)
        else:
            tmp = hot.with_name(f".{hot.name}.bench")
            tmp.write_bytes(saved)
            os.replace(tmp, hot)


# --- the resident agent ----------------------------------------------------------------------


def agent_available(cmd: list[str] | None = None) -> str:
    """'' when this installation has `fastvllm agent`, else why the column is skipped."""
    try:
        r = subprocess.run(
            [*(cmd or fastvllm_command()), "agent", "--help"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"'fastvllm agent --help' failed: {e}"
    return "" if r.returncode == 0 else "this installation has no 'fastvllm agent' command"


@contextlib.contextmanager
def agent_running(
    cmd: list[str] | None = None, ready_s: float = 120.0, extra: list[str] | None = None
) -> Any:
    """`fastvllm agent` (with `extra` arguments) started for the block and stopped by its PID
    after. It is ready once `fastvllm agent status` answers 0 (where the agent has no such
    command: once its process has run `ready_s`/20 seconds without exiting)."""
    base = cmd or fastvllm_command()
    if subprocess.run([*base, "agent", "status"], capture_output=True, timeout=60).returncode == 0:
        yield None  # one runs already (its owner stops it)
        return
    p = subprocess.Popen(
        [*base, "agent", *(extra or [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + ready_s
        while True:
            if p.poll() is not None:
                why = (p.stderr.read() if p.stderr else "")[-500:]
                raise _BenchError(f"fastvllm agent exited {p.returncode}: {why}")
            r = subprocess.run([*base, "agent", "status"], capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            if time.monotonic() > end:
                why = r.stderr.strip()[-300:]
                raise _BenchError(f"fastvllm agent not ready within {ready_s:.0f} s: {why}")
            time.sleep(0.2)
        yield p
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --- the container ---------------------------------------------------------------------------


def container_available(image: str = CONTAINER_IMAGE) -> tuple[Any, str]:
    """(a Docker client, '') when an engine answers and `image` is there, else (None, why not)."""
    from fastvllm import container as ctr

    try:
        dc = ctr.docker_client(timeout=120)
    except Exception as e:
        return None, f"no Docker engine answers ({getattr(e, 'message', e)}; start dockerd)"
    try:
        dc.images.get(image)
    except Exception:
        return None, f"image {image} is not built (python -m fastvllm.scripts.docker_image)"
    return dc, ""


def container_snapshot(dc: Any, image: str, volume: Path) -> Path:
    """A snapshot taken by the image's own entrypoint (a first container cold-starts the tiny
    model and snapshots it onto `volume`), which containers of the image can restore."""
    from fastvllm import container as ctr

    c = ctr.start(dc, image, volume, ctr.entrypoint_command("tiny", port=CONTAINER_PORT), name=_cname())
    try:
        doc = ctr.wait_serving(c)
    finally:
        with contextlib.suppress(Exception):
            c.stop(timeout=60)
        c.remove(force=True)
    return volume / Path(str(doc["snapshot"])).relative_to(ctr.SNAPSHOTS_MOUNT)


def _cname() -> str:
    return f"fastvllm-bench-{os.getpid()}-{time.monotonic_ns() % 10**8}"


def container_once(dc: Any, image: str, t: Target, cold: bool) -> tuple[float, dict[str, Any]]:
    """From creating the container (the SDK's `docker run`: create + start) whose entrypoint
    restores the snapshot, to the first 200 a client on the host gets from it."""
    from fastvllm import container as ctr
    from fastvllm.runtime import manifest

    m = manifest.load(t.path)
    cmd = ctr.entrypoint_command(
        m.server.model, host=m.server.host, port=m.server.port, name=t.path.name, vllm_args=m.server.vllm_args
    )
    dropped = _cold(cold)
    t0 = time.perf_counter()
    c = ctr.start(dc, image, t.path.parent, cmd, name=_cname())
    try:
        url = ""
        while not url:  # the container has an address once it runs
            try:
                url = ctr.address(c, m.server.port)
            except Exception:
                if time.perf_counter() - t0 > 120:
                    raise
                time.sleep(0.01)
        host, _, port = url.removeprefix("http://").rpartition(":")
        client = t.client(host, int(port))
        client.start()
        a = client.result(CLIENT_DEADLINE_S)
        t.check(a, "container")
        assert a.at is not None
        return a.at - t0, {"page_cache_dropped": dropped, "refusals": a.refusals}
    finally:
        c.remove(force=True)


# --- the whole benchmark ---------------------------------------------------------------------


@dataclass
class Plan:
    model: str = "tiny"
    reps: int = 5
    out: Path = Path("results/coldstart")
    port: int = 8000
    quiet: bool = False
    agent: bool = True
    container: bool = True
    cold_starts: bool = True
    columns: frozenset[str] = frozenset()  # the columns to time (select_columns); empty: all


def select_columns(spec: str) -> frozenset[str]:
    """`--columns`: column names (COLUMNS) or groups, comma-separated; a group is a name's
    start (`agent` = agent_cold and agent_warm, `command`, `in_process`, `container`, `vllm`)
    or a page-cache state (`cold`, `warm`: the *_cold or *_warm columns). '' or 'all': all."""
    got: set[str] = set()
    for word in (w.strip() for w in spec.split(",")):
        if word in ("", "all"):
            continue
        match = {c for c in COLUMNS if c == word or c.startswith(f"{word}_") or c.endswith(f"_{word}")}
        if not match:
            from fastvllm.runtime.errors import UsageError

            raise UsageError(
                f"--columns: no column {word!r}", hint=f"pick from {', '.join(COLUMNS)} (or a prefix of them)"
            )
        got |= match
    return frozenset(got)


def wanted(plan: Plan, column: str) -> bool:
    return not plan.columns or column in plan.columns


def run(plan: Plan) -> dict[str, Any]:
    """Every column, `plan.reps` times; writes coldstart.json and coldstart.png to `plan.out`."""
    from fastvllm import api
    from fastvllm.runtime.tiny_model import resolve_model

    say: Callable[[str], None] = (lambda _m: None) if plan.quiet else (lambda m: print(m, flush=True))
    model_path = resolve_model(plan.model)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-bench-"))
    busy_before = harness.busy_processes()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    cols = _columns()
    extra: dict[str, Any] = {}
    try:
        if plan.cold_starts and wanted(plan, "vllm_cold_start"):
            for i in range(plan.reps):
                log = work / f"cold-{i}.log"
                _timed(cols["vllm_cold_start"], partial(_cold_start, model_path, plan.port, log), say)
        for c in cols.values():  # the rest say why they have no runs (the agent's and Docker's below)
            if not wanted(plan, c.name):
                c.skipped = "not in --columns"
        if not plan.cold_starts:
            cols["vllm_cold_start"].skipped = "--no-cold-starts"
        say("taking the snapshot (it learns its hot set in a trial restore) ...")
        snap = api.snapshot(model_path, work / "snapshot", port=plan.port)
        extra["snapshot"] = {
            "hot_set_bytes": _hot_bytes(Target.of(snap.path)),
            "image_bytes": snap.manifest.image_bytes,
            "phases": {k: round(v, 4) for k, v in snap.timeline.durations().items()},
            "trial_restore": getattr(snap, "trial", None),
        }
        t = Target.of(snap.path)
        _restore_columns(plan, t, cols, say)
        _container_columns(plan, work, cols, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = harness.document(
        "coldstart",
        list(cols.values()),
        {"model": model_path, "reps": plan.reps, "port": plan.port},
        started_utc=started,
        loadavg_before=[round(x, 2) for x in load_before],
        busy_before=busy_before,
        busy_after=harness.busy_processes(),
        **extra,
    )
    doc.update(_summary(doc))
    harness.write_json(doc, plan.out / "coldstart.json")
    png = plan.out / "coldstart.png"
    harness.bar_chart(doc, png, title=_title(doc), xlabel="seconds to the first completion")
    say(_report(doc, plan.out))
    return doc


def _cold_start(model: str, port: int, log: Path) -> tuple[float, dict[str, Any]]:
    dropped = _cold(True)
    return cold_start_once(model, port, log), {"page_cache_dropped": dropped}


COLUMNS = {
    "vllm_cold_start": "vLLM cold start (launch to first completion)",
    "command_warm": "fastvllm restore, warm",
    "command_cold": "fastvllm restore, cold",
    "command_cold_first": "fastvllm restore, cold, no hot set (first restore)",
    "in_process_warm": "in-process api.restore, warm",
    "in_process_cold": "in-process api.restore, cold",
    "agent_warm": "through fastvllm agent, warm",
    "agent_cold": "through fastvllm agent, cold",
    "container_warm": "docker run, warm",
    "container_cold": "docker run, cold",
}


def _columns() -> dict[str, harness.Column]:
    return {k: harness.Column(k, label) for k, label in COLUMNS.items()}


Say = Callable[[str], None]


def _timed(col: harness.Column, fn: Callable[[], tuple[float, dict[str, Any]]], say: Say) -> None:
    value, detail = fn()
    col.add(value, **detail)
    say(f"{col.label} {len(col.runs)}: {value:.3f} s")


def _restore_columns(plan: Plan, t: Target, cols: dict[str, harness.Column], say: Say) -> None:
    """The host's restore columns, interleaved rep by rep (a drift in the machine's load then
    touches every column alike): cold ones first, then warm ones after one untimed restore."""
    why_no_agent = agent_available() if plan.agent else "--no-agent"
    if why_no_agent:
        cols["agent_warm"].skipped = cols["agent_cold"].skipped = why_no_agent
        say(f"no agent column: {why_no_agent}")
    on = partial(wanted, plan)
    for cold in (True, False):
        tag = "cold" if cold else "warm"
        if not cold and (on("in_process_warm") or on("command_warm")):
            command_once(t, False)  # the warm runs find what a restore reads in the page cache
        for _ in range(plan.reps):
            if on(f"in_process_{tag}"):
                _timed(cols[f"in_process_{tag}"], partial(in_process_once, t, cold), say)
            if on(f"command_{tag}"):
                _timed(cols[f"command_{tag}"], partial(command_once, t, cold), say)
            if cold and on("command_cold_first"):
                with no_hot_set(t.path):
                    _timed(cols["command_cold_first"], partial(command_once, t, True), say)
                    # what that first restore learned, beside the set the snapshot learned
                    cols["command_cold_first"].details[-1]["hot_set_learned_bytes"] = _hot_bytes(t)
    if not why_no_agent and (on("agent_cold") or on("agent_warm")):
        with agent_running():
            for cold in (True, False):
                tag = "cold" if cold else "warm"
                if not on(f"agent_{tag}"):
                    continue
                if not cold:
                    command_once(t, False, agent=True)  # untimed, as above
                for _ in range(plan.reps):
                    _timed(cols[f"agent_{tag}"], partial(command_once, t, cold, agent=True), say)


def _container_columns(plan: Plan, work: Path, cols: dict[str, harness.Column], say: Say) -> None:
    if not plan.container:
        dc, why = None, "--no-container"
    elif not (wanted(plan, "container_cold") or wanted(plan, "container_warm")):
        dc, why = None, "not in --columns"
    else:
        dc, why = container_available()
    if dc is None:
        cols["container_warm"].skipped = cols["container_cold"].skipped = why
        say(f"no container column: {why}")
        return
    say("taking the container's snapshot with a first container ...")
    snap = container_snapshot(dc, CONTAINER_IMAGE, work / "volume")
    t = Target.of(snap)
    # The entrypoint's snapshot is taken --leave-running (it serves on), so it learned no hot
    # set: one untimed cold restore learns it, as the host's snapshot did when it was taken.
    container_once(dc, CONTAINER_IMAGE, t, True)
    for cold in (True, False):
        col = cols[f"container_{'cold' if cold else 'warm'}"]
        for _ in range(plan.reps if wanted(plan, col.name) else 0):
            _timed(col, partial(container_once, dc, CONTAINER_IMAGE, t, cold), say)


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures the README's headline and older readers of coldstart.json use."""
    med = {k: c["median"] for k, c in doc["columns"].items()}
    cold, user = med.get("vllm_cold_start"), med.get("command_cold")
    out: dict[str, Any] = {"median_s": med}
    if cold and user:
        out["speedup_user_cold"] = round(cold / user, 1)
    return out


def _title(doc: dict[str, Any]) -> str:
    s = doc.get("speedup_user_cold")
    model = Path(doc["params"]["model"]).name
    return f"{model}: time to the first completion, {doc['date']}" + (f" ({s}x, cold)" if s else "")


def _report(doc: dict[str, Any], out: Path) -> str:
    lines = ["", "| column | median | runs |", "| --- | ---: | --- |"]
    for c in doc["columns"].values():
        if c["runs"]:
            runs = ", ".join(f"{v:.2f}" for v in c["runs"])
            lines.append(f"| {c['label']} | {c['median']:.2f} s | {runs} |")
        else:
            lines.append(f"| {c['label']} | — | skipped: {c.get('skipped', '')} |")
    lines.append(f"\n{out / 'coldstart.json'}, {out / 'coldstart.png'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/coldstart"))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-agent", action="store_true")
    ap.add_argument("--no-container", action="store_true")
    ap.add_argument("--no-cold-starts", action="store_true")
    ap.add_argument("--columns", default="", help=select_columns.__doc__)
    a = ap.parse_args(argv)
    cols = select_columns(a.columns)
    on = (not a.no_agent, not a.no_container, not a.no_cold_starts)
    run(Plan(a.model, a.reps, a.out, a.port, False, *on, cols))
    return 0
