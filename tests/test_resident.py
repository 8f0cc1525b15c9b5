"""`fastvllm agent` (fastvllm/resident.py) and its client (fastvllm/resident_client.py).

Unit tests: the client's argument parsing and settings, the agent's request checks. Agent
tests run a real `fastvllm agent` process (no vLLM): its socket is private, a stale socket is
replaced, a second agent is refused naming the first's PID, a peer of another uid is refused,
SIGTERM removes the socket and exits 143. The slow test restores the shared snapshot through
the agent (the client as its own process, as the launcher runs it), checks the canary's tokens,
cancels a restore mid-way (no process of the tree left, the agent serves on) and restores
again. Every agent and server is stopped by PID in teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastvllm.runtime import config, manifest, proctree

from fastvllm import resident, resident_client

from .conftest import PROMPTS, completions, needs_criu, servers_on_port

CLIENT = "import sys; from fastvllm import resident_client as c; r = c.forward(sys.argv[1:]); sys.exit(99 if r is None else r)"  # noqa: E501
NO_AGENT = 99  # what the client process exits with when forward() returned None


# --- the client, on its own ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["/s"], {"dir": "/s"}),
        (["/s", "--json", "--no-verify"], {"dir": "/s", "json": True, "verify": False}),
        (["--reverify", "/s", "--keep-affinity"], {"dir": "/s", "reverify": True, "keep_affinity": True}),
        (["/s", "--no-prefetch", "--prefetch"], {"dir": "/s", "prefetch": True}),
        (
            ["/s", "--prefetch-threads", "4", "--timeout=2.5"],
            {"dir": "/s", "prefetch_threads": 4, "timeout": 2.5},
        ),
        (["/s", "--criu-restore", "MMAP"], {"dir": "/s", "criu_restore": "mmap"}),
        (["--", "/s"], {"dir": "/s"}),
    ],
)
def test_the_client_parses_the_restore_options_the_agent_takes(args: list[str], want: dict[str, Any]) -> None:
    assert resident_client.parse_restore(args) == want


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["/s", "--container", "img"],
        ["/s", "--container-name=x"],
        ["/a", "/b"],
        ["/s", "--timeout", "0"],
        ["/s", "--timeout", "nan"],
        ["/s", "--prefetch-threads", "-1"],
        ["/s", "--prefetch-threads", "two"],
        ["/s", "--criu-restore", "fast"],
        ["/s", "--timeout"],
        ["/s", "--verbose"],
    ],
)
def test_anything_else_goes_to_the_full_cli(args: list[str]) -> None:
    assert resident_client.parse_restore(args) is None


def test_a_relative_dir_is_sent_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resident_client.parse_restore(["snap"]) == {"dir": str(tmp_path / "snap")}


@pytest.mark.parametrize("run_dir", ["", "/x/run", "~/r"])
@pytest.mark.parametrize("agent", ["", "0", "1", "off", "Yes"])
def test_the_client_reads_its_settings_as_config_does(
    monkeypatch: pytest.MonkeyPatch, run_dir: str, agent: str
) -> None:
    """The client reads FASTVLLM_RUN_DIR and FASTVLLM_AGENT itself (it imports nothing of
    fastvllm's): the same answers as runtime/config.py's declarations."""
    monkeypatch.setenv("FASTVLLM_RUN_DIR", run_dir)
    monkeypatch.setenv("FASTVLLM_AGENT", agent)
    assert resident_client.socket_path() == str(config.RUN_DIR.get() / resident.SOCKET_NAME)
    assert resident_client.socket_path() == str(resident.default_socket())
    assert resident_client.enabled() is config.AGENT.get()


def test_forward_leaves_the_command_to_the_cli_without_an_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path))
    assert resident_client.forward(["restore", "/s"]) is None  # no socket
    assert resident_client.forward(["ps"]) is None
    assert resident_client.forward([]) is None
    (tmp_path / resident.SOCKET_NAME).write_text("")  # not a socket
    assert resident_client.forward(["restore", "/s"]) is None


def test_the_client_imports_nothing_but_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import fastvllm.resident_client; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] not in sys.stdlib_module_names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the package's own __init__ files (light: fastvllm/__init__.py) and the client, nothing else
    light = {"fastvllm", "fastvllm.resident_client", "fastvllm.restore", "fastvllm.snapshot"}
    assert set(json.loads(out.replace("'", '"'))) <= light


# --- the agent's checks of a request -------------------------------------------------------------


def test_a_request_is_checked_and_other_settings_are_declined() -> None:
    env = {"FASTVLLM_CRIU": "/c", "FASTVLLM_AGENT": "1", "HOME": "/root"}
    req = {
        "op": "restore",
        "v": 1,
        "dir": "/s",
        "verify": False,
        "timeout": 5,
        "env": {"FASTVLLM_CRIU": "/c"},
    }
    assert resident.parse_request(req, env) == {"dir": "/s", "verify": False, "timeout": 5.0}
    with pytest.raises(resident._Reject) as got:
        resident.parse_request({**req, "env": {}}, env)
    assert got.value.declined and "FASTVLLM_CRIU" in got.value.reason
    with pytest.raises(resident._Reject) as got:
        resident.parse_request({**req, "container": "img"}, env)
    assert got.value.declined and "container" in got.value.reason
    for bad in ({"dir": "rel"}, {"verify": "yes"}, {"criu_restore": "fast"}, {"timeout": 0}, {"op": "x"}):
        with pytest.raises(resident._Reject) as got:
            resident.parse_request({**req, **bad}, env)
        assert not got.value.declined, bad


# --- a real agent process (no vLLM) --------------------------------------------------------------


class AgentProc:
    """`fastvllm agent` as a child process; stopped by PID."""

    def __init__(self, env: dict[str, str], *args: str, log: Path) -> None:
        self.log = log
        self.env = env
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastvllm.cli", "agent", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, path: str, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = resident_client.ping(path)
            if doc is not None and doc["pid"] == self.proc.pid:
                return doc
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"agent not ready after {timeout} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


def _env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ, FASTVLLM_RUN_DIR=str(run_dir))
    env.pop("FASTVLLM_AGENT", None)
    return env


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


def _start(agents: list[AgentProc], env: dict[str, str], *args: str, log: Path) -> AgentProc:
    a = AgentProc(env, *args, log=log)
    agents.append(a)
    return a


@needs_criu
def test_the_socket_is_private_a_stale_one_replaced_and_a_second_agent_refused(
    tmp_path: Path, agents: list[AgentProc]
) -> None:
    run = tmp_path / "run"
    sock_path = run / resident.SOCKET_NAME
    run.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # what a killed agent leaves: a socket file nobody listens on
    stale.close()
    env = _env(run)
    first = _start(agents, env, log=tmp_path / "a1.log")
    doc = first.wait_ready(str(sock_path))
    assert doc["busy"] is False and doc["uid"] == os.geteuid() and doc["socket"] == str(sock_path)
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    assert "ready on" in first.log.read_text()

    second = subprocess.run(
        [sys.executable, "-m", "fastvllm.cli", "agent"], env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 2
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"pid {first.proc.pid}" in err and "already runs" in err, err
    assert resident_client.ping(str(sock_path))["pid"] == first.proc.pid  # untouched

    # The CLI's own view
    out = subprocess.run(
        [sys.executable, "-m", "fastvllm.cli", "agent", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["pid"] == first.proc.pid

    assert first.stop() == 143
    assert not sock_path.exists()
    out = subprocess.run(
        [sys.executable, "-m", "fastvllm.cli", "agent", "status"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and "no fastvllm agent" in out.stderr


@needs_criu
def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("mine")
    out = subprocess.run(
        [sys.executable, "-m", "fastvllm.cli", "agent", "--socket", str(path)],
        env=_env(tmp_path / "run"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "is not a socket" in out.stderr
    assert path.read_text() == "mine"


NOBODY_PING = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.errno}))
    raise SystemExit
s.sendall(b'{"op": "ping"}\\n')
print(s.makefile().readline().strip() or "{}")
"""


@needs_criu
def test_a_client_of_another_user_is_refused(tmp_path: Path, agents: list[AgentProc]) -> None:
    """Two walls: the socket's mode (nobody cannot connect at all) and, behind it, the agent's
    own check of the peer's uid (SO_PEERCRED), met here by opening the socket up by hand."""
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to run a client as nobody) and /usr/bin/python3")
    where = Path(tempfile.mkdtemp(prefix="fastvllm-agent-test-", dir="/tmp"))
    try:
        os.chmod(where, 0o755)
        path = where / "agent.sock"
        a = _start(agents, _env(tmp_path / "run"), "--socket", str(path), log=tmp_path / "a.log")
        a.wait_ready(str(path))

        def as_nobody() -> dict[str, Any]:
            out = subprocess.run(
                ["/usr/bin/python3", "-c", NOBODY_PING, str(path)], user=65534, group=65534, extra_groups=[],
                cwd="/", capture_output=True, text=True, timeout=120, check=False,
                env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        assert as_nobody() == {"connect": 13}  # EACCES: the socket is 0600
        os.chmod(path, 0o666)
        got = as_nobody()
        assert got["event"] == "result" and got["exit_code"] == 5 and "uid 65534" in got["error"], got
        assert resident_client.ping(str(path))["pid"] == a.proc.pid  # and it serves on
    finally:
        for a in agents:
            a.stop()
        shutil.rmtree(where, ignore_errors=True)


@needs_criu
def test_the_agent_declines_other_settings_and_survives_a_bad_request(
    tmp_path: Path, agents: list[AgentProc]
) -> None:
    run = tmp_path / "run"
    env = _env(run)
    a = _start(agents, env, log=tmp_path / "a.log")
    sock_path = str(run / resident.SOCKET_NAME)
    a.wait_ready(sock_path)
    # Other FASTVLLM_* settings than the agent's: the client restores in its own process.
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, "restore", str(tmp_path / "nothing")],
        env=dict(env, FASTVLLM_SERVER_NICE="3"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == NO_AGENT, out.stderr
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, "restore", str(tmp_path / "nothing")],
        env=dict(env, FASTVLLM_AGENT="0"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == NO_AGENT, out.stderr
    for junk in (b"not json\n", b"[1, 2]\n", b'{"op": "restore"}\n'):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(junk)
            reply = json.loads(s.makefile().readline())
        assert reply["event"] == "result" and reply["exit_code"] == 2, reply
    # A restore the agent runs and fails: the error's one line and exit code, as the CLI gives them.
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, "restore", str(tmp_path / "nothing")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "through the fastvllm agent" in out.stderr and "error:" in out.stderr
    assert resident_client.ping(sock_path)["restores"] == 1


# --- through the agent, for real (vLLM, CRIU) -----------------------------------------------------


def _first_phase(s: socket.socket, req: dict[str, Any]) -> Any:
    s.settimeout(300)  # hang guard
    s.sendall((json.dumps(req) + "\n").encode())
    f = s.makefile()
    events = []
    for line in f:
        ev = json.loads(line)
        events.append(ev)
        if ev["event"] == "phase_start" and ev["name"] == "criu_restore":
            return f, events
        assert ev["event"] in ("accepted", "started", "phase_start", "phase_end", "progress"), ev
    raise AssertionError(f"the stream ended before CRIU started: {events}")


@pytest.mark.slow
@needs_criu
def test_restore_through_the_agent_then_cancel_one_mid_way(
    shared_snapshot: Any, tmp_path: Path, agents: list[AgentProc]
) -> None:
    run = tmp_path / "run"
    env = _env(run)
    sock_path = str(run / resident.SOCKET_NAME)
    a = _start(agents, env, log=tmp_path / "agent.log")
    a.wait_ready(sock_path)
    m = manifest.load(shared_snapshot.path)
    served: list[int] = []

    def stop_served() -> None:
        for pid in served:
            sid = os.getsid(pid)
            tree = proctree.session_pids(sid)
            proctree.stop_session(sid)
            assert not proctree.wait_gone(tree, 60, reaped=True)  # the agent reaps its root
        served.clear()

    def restore_once() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, "restore", str(shared_snapshot.path), "--json"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + a.log.read_text()
        res = json.loads(out.stdout)
        served.append(res["pid"])
        assert res["canary_ok"] and res["snapshot"] == str(shared_snapshot.path)
        got = completions(res["url"], shared_snapshot.served_model_name, PROMPTS[:2])
        assert got == shared_snapshot.before[:2]
        return res

    try:
        restore_once()
        stop_served()

        # Cancelled once CRIU has started: everything started is undone, the agent serves on.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            env_doc = {k: v for k, v in env.items() if k.startswith("FASTVLLM_")}
            req = {"op": "restore", "v": 1, "dir": str(shared_snapshot.path), "env": env_doc}
            f, _events = _first_phase(s, req)
            s.sendall(b'{"op": "cancel"}\n')
            rest = [json.loads(line) for line in f]
        final = rest[-1]
        assert final["event"] == "result" and final["exit_code"] == 130 and final.get("interrupted"), rest
        assert "cancelled" in final["error"]
        assert not proctree.wait_gone(m.server.tree_pids, 60, reaped=True)
        assert servers_on_port(m.server.port) == []
        doc = resident_client.ping(sock_path)
        assert doc is not None and doc["busy"] is False and a.proc.poll() is None

        # The client's own Ctrl-C: sent as a cancel, exit 130 as in the CLI.
        p = subprocess.Popen(
            [sys.executable, "-c", CLIENT, "restore", str(shared_snapshot.path)],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert p.stderr is not None
            seen = []
            for line in p.stderr:
                seen.append(line)
                if line.startswith("✓ validate"):
                    p.send_signal(signal.SIGINT)
                    break
            err = "".join(seen) + p.stderr.read()
            assert p.wait(300) == 130, err
        finally:
            if p.poll() is None:
                p.kill()
        assert "interrupted by SIGINT" in err
        assert not proctree.wait_gone(m.server.tree_pids, 60, reaped=True)

        # A restore after the cancels works: the agent forgot the signal they were.
        restore_once()
        stop_served()

        # SIGTERM to the agent mid-restore: that restore is undone, the one queued behind it is
        # handed back to its client, the socket removed, exit 143.
        with socket.socket(socket.AF_UNIX) as s, socket.socket(socket.AF_UNIX) as queued:
            s.connect(sock_path)
            f, _events = _first_phase(s, req)
            queued.connect(sock_path)
            queued.settimeout(300)
            queued.sendall((json.dumps(req) + "\n").encode())
            qf = queued.makefile()
            assert json.loads(qf.readline()) == {"event": "accepted", "pid": a.proc.pid, "ahead": 1}
            a.proc.send_signal(signal.SIGTERM)
            rest = [json.loads(line) for line in f]
            assert json.loads(qf.readline()) == {"event": "declined", "reason": "the agent is stopping"}
        assert rest[-1]["exit_code"] == 143 and "stopped by SIGTERM" in rest[-1]["error"], rest
        assert a.proc.wait(120) == 143
        assert not Path(sock_path).exists()
        assert not proctree.wait_gone(m.server.tree_pids, 60, reaped=True)
    finally:
        stop_served()
        for pid in servers_on_port(m.server.port):
            proctree.stop_session(os.getsid(pid))
    assert a.stop() == 143


@needs_criu
def test_hold_refuses_at_start_where_weights_cannot_be_held(tmp_path: Path) -> None:
    """`fastvllm agent --hold` on a host without the CUDA driver: one line saying why, exit 2,
    no socket left, before it listens."""
    from fastvllm.runtime import shared_pinned

    if shared_pinned.unavailable() is None:
        pytest.skip("this host can hold weights (a GPU host): the refusal is for hosts without one")
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "fastvllm.cli", "agent", "--hold", str(tmp_path / "snap")],
        env=_env(run), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = out.stderr.strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1 and "cannot hold weights on this host" in err, (
        err
    )
    assert not (run / resident.SOCKET_NAME).exists()
