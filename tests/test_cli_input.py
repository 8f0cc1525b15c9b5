"""Issue 21, findings 7-9: vLLM's own --port/--host after `--`, bad values and paths, two
restores at once, a failed phase on the live timeline, no raw traceback from any command, and
the secrets a snapshot holds (private files, credential names in `inspect`).

Most checks fail before anything is launched (fast). The slow ones share one real vLLM
snapshot taken with vLLM's own `-- --port P --host 0.0.0.0` and an HF_TOKEN in the
environment, and a plain process snapshot of `sleep` (CRIU, no vLLM)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fastvllm.runtime import credentials, manifest, proctree, restore_lock, vllm_server
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.timeline import Outcome, Timeline

from .conftest import FASTVLLM, TEST_PORT, completions, needs_criu, run_cli, servers_on_port

SECRET = "hf_fastvllmTestSecretValue0123456789"


def _one_error_line(stderr: str) -> str:
    """The failure is told in exactly one 'error:' line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _usage_error(r: subprocess.CompletedProcess[str]) -> str:
    """A usage error from typer's own option check or ours: exit 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return " ".join(r.stderr.translate(str.maketrans("", "", "│╭╮╰╯─")).split())  # typer's box


# --- finding 7: vLLM's own --port/--host after `--` ------------------------------------------


def test_vllm_address_args_are_parsed_in_every_spelling() -> None:
    rv = vllm_server.resolve_address
    assert rv(None, None, ["--max-model-len", "64", "--port", "9000"]) == (
        9000,
        "127.0.0.1",
        ["--max-model-len", "64"],
    )
    assert rv(None, None, ["--port=9001", "--host=0.0.0.0", "--seed", "1"]) == (
        9001,
        "0.0.0.0",
        ["--seed", "1"],
    )
    assert rv(9002, "::", ["--por", "9002", "--ho", "::"]) == (9002, "::", [])  # vLLM's abbreviations
    assert rv(None, None, []) == (vllm_server.DEFAULT_PORT, vllm_server.DEFAULT_HOST, [])
    with pytest.raises(UsageError, match=r"--port 8000 and vLLM's --port 9000 \(after --\) disagree"):
        rv(8000, None, ["--port", "9000"])
    with pytest.raises(UsageError, match=r"--host 127.0.0.1 and vLLM's --host 0.0.0.0"):
        rv(None, "127.0.0.1", ["--host", "0.0.0.0"])
    for bad, what in ((["--port", "0"], "fixed one"), (["--port=70000"], "not a TCP port")):
        with pytest.raises(UsageError, match=what):
            rv(None, None, bad)
    with pytest.raises(UsageError, match="not a number"):
        rv(None, None, ["--port", "http"])
    with pytest.raises(UsageError, match="Unix socket"):
        rv(None, None, ["--uds", "/tmp/s"])


def test_a_wildcard_server_is_reached_on_loopback_and_shown_as_it_listens() -> None:
    s = vllm_server.Server(1, "0.0.0.0", 9000, Path("/dev/null"))
    assert s.base_url == "http://127.0.0.1:9000" and s.listen_url == "http://0.0.0.0:9000"
    assert vllm_server.Server(1, "::", 9000, Path("/dev/null")).base_url == "http://[::1]:9000"
    assert "every address" in vllm_server.describe_address("0.0.0.0", 9000)
    assert vllm_server.describe_address("127.0.0.1", 9000) == "http://127.0.0.1:9000"
    args = vllm_server.redact_args(["--api-key", "k1", "--hf-token=k2", "--seed", "3"])
    assert args == ["--api-key", "***", "--hf-token=***", "--seed", "3"]


def test_snapshot_refuses_two_different_ports(tmp_path: Path) -> None:
    r = run_cli("snapshot", "tiny", "--out", str(tmp_path / "s"), "--port", "8000", "--", "--port", "9000")
    msg = _usage_error(r)
    assert "--port 8000 and vLLM's --port 9000" in msg and "give the port once" in msg
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args",
    [["--", "--port", "0"], ["--", "--port=70000"], ["--port", "0"], ["--port", "70000"], ["--port", "-1"]],
)
def test_snapshot_port_out_of_range_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    r = run_cli("snapshot", "tiny", "--out", str(tmp_path / "s"), *args)
    msg = _usage_error(r)
    assert ("fixed one" in msg) if args[-1] == "0" else ("not a TCP port" in msg), msg
    assert not (tmp_path / "s").exists()


def test_entrypoint_takes_the_same_address_rules(tmp_path: Path) -> None:
    r = run_cli("entrypoint", "tiny", "--snapshots", str(tmp_path), "--", "--port", "0")
    assert r.returncode == 2 and "fixed one" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("entrypoint", "tiny", "--snapshots", str(tmp_path), "--port", "1", "--", "--port=2")
    assert r.returncode == 2 and "--port 1 and vLLM's --port 2" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cmd", [["bench"], ["demo"], ["cluster", "serve", "--snapshots", "/tmp"]])
def test_other_ports_are_checked(cmd: list[str]) -> None:
    _usage_error(run_cli(*cmd, "--port", "70000"))


# --- finding 8: bad values, bad paths, two restores, interrupted phases, no traceback ---------


@pytest.mark.parametrize(
    "args",
    [
        ["snapshot", "tiny", "--out", "/nonexistent/s", "--timeout", "-5"],
        ["snapshot", "--pid", "1", "--out", "/nonexistent/s", "--lock-timeout", "0"],
        ["restore", "/nonexistent", "--timeout", "-5"],
        ["restore", "/nonexistent", "--prefetch-threads", "-1"],
        ["bench", "--reps", "0"],
    ],
)
def test_timeouts_and_counts_must_be_positive(args: list[str]) -> None:
    _usage_error(run_cli(*args))


@needs_criu
def test_out_under_a_file(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "f").write_text("a file")
    r = run_cli("snapshot", str(tiny_model), "--out", str(tmp_path / "f" / "s"), "--port", str(TEST_PORT))
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert f"{tmp_path / 'f'} is a file, not a directory" in line
    assert not servers_on_port(TEST_PORT)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only bind mount (root writes through a mode-0555 directory)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    r = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True, capture_output=True)
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, capture_output=True)


@needs_criu
def test_out_under_a_read_only_directory(read_only_dir: Path, tiny_model: Path) -> None:
    r = run_cli("snapshot", str(tiny_model), "--out", str(read_only_dir / "s"), "--port", str(TEST_PORT))
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "read-only" in line and str(read_only_dir / "s") in line and "writable" in line
    assert not servers_on_port(TEST_PORT)


def test_restore_held_by_another_process_fails_in_one_line(tmp_path: Path) -> None:
    """The second of two restores of one snapshot fails at once, naming the first (the slow
    test below starts two real ones together)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    with restore_lock.restoring(snap):
        r = run_cli("restore", str(snap))
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert f"snapshot {snap} is being restored by pid {os.getpid()}" in line
    r = run_cli("restore", str(snap))  # released: the restore goes on (to its own error here)
    assert "being restored" not in r.stderr


def test_an_unexpected_exception_is_one_line_and_a_report(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastvllm import cli\n"
        "from fastvllm.runtime import mapped\n"
        "def boom(*_):\n"
        "    raise RuntimeError('no such thing [x]\\nsecond line')\n"
        "mapped.snapshot_mappers = boom\n"  # a bug in what `inspect` calls first
        "sys.argv = ['fastvllm', 'inspect', '/nonexistent']\n"
        "cli.main()\n"
    )
    env = {**os.environ, "FASTVLLM_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 70, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("internal error: RuntimeError: no such thing [x] second line (a bug")
    (report,) = (tmp_path / "run" / "errors").iterdir()
    assert str(report) in line
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert "Traceback" in report.read_text() and "def boom" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "/nonexistent"],
        ["inspect", "/etc/hostname"],
        ["rm", "/etc/hostname"],
        ["stop", "999999999"],
        ["weights", "verify", "/nonexistent.fvw"],
        ["prefetch", "status", "/nonexistent"],
        ["model", "make-tiny", "/etc/hostname/x"],
        ["cluster", "status", "--snapshots", "/nonexistent"],
        ["cluster", "place", "m", "--snapshots", "/etc/hostname"],
    ],
)
def test_bad_paths_and_pids_never_give_a_traceback(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode not in (0, 1, 70), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


def test_address_with_pid_is_refused(tmp_path: Path) -> None:
    for extra in (["--port", "9000"], ["--host", "0.0.0.0"]):
        r = run_cli("snapshot", "--pid", "1", "--out", str(tmp_path / "s"), *extra)
        assert r.returncode == 2 and "do not apply with --pid" in _one_error_line(r.stderr)


def test_a_damaged_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x00not a checkpoint")
    r = run_cli("weights", "dump", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "w.fvw"))
    assert r.returncode == 2 and "not a readable safetensors file" in _one_error_line(r.stderr)


def test_a_failed_or_interrupted_phase_is_recorded_and_shown() -> None:
    from fastvllm import ui

    tl = Timeline()
    live = ui.LiveTimeline(tl, enabled=False)
    with pytest.raises(KeyboardInterrupt), live.running():
        with tl.phase("validate"):
            pass
        with contextlib.suppress(ValueError), tl.phase("health"):
            raise ValueError("no")
        with tl.phase("criu_restore"):
            raise KeyboardInterrupt
    assert [(p.name, p.outcome) for p in tl.phases] == [
        ("validate", Outcome.OK),
        ("health", Outcome.FAILED),
        ("criu_restore", Outcome.INTERRUPTED),
    ]
    assert [p["outcome"] for p in tl.as_list()] == ["ok", "failed", "interrupted"]
    col = live.progress.columns[0]
    marks = [str(col.render(t)) for t in live.progress.tasks]
    assert marks[1:] == ["✗", "✗"] and marks[0] != "✗"
    table = ui.phase_table(tl, "t")
    names = [str(c) for c in table.columns[0].cells]
    assert "(failed)" in names[1] and "(interrupted)" in names[2] and names[0] == "validate"


def test_a_phase_left_running_shows_as_interrupted() -> None:
    """A phase a thread runs (the read-ahead) has not ended when the pipeline stops: its line
    must not keep spinning as if it were still going."""
    from fastvllm import ui

    tl = Timeline()
    live = ui.LiveTimeline(tl, enabled=False)
    with pytest.raises(RuntimeError), live.running():
        tl.on_start("readahead")  # type: ignore[misc]  (what a phase's start does)
        raise RuntimeError
    (task,) = live.progress.tasks
    assert task.finished and task.fields["outcome"] == Outcome.INTERRUPTED


# --- finding 9: secrets --------------------------------------------------------------------


def test_credential_names_by_name_never_value() -> None:
    env = {
        "HF_TOKEN": SECRET,
        "AWS_SECRET_ACCESS_KEY": "x",
        "OPENAI_API_KEY": "x",
        "DB_PASSWORD": "x",
        "HTTPS_PROXY": "http://user:pw@proxy:3128",
        "TOKENIZERS_PARALLELISM": "false",
        "PWD": "/",
        "SSH_AUTH_SOCK": "/tmp/agent",
        "AWS_REGION": "eu-west-1",
        "NO_PROXY": "localhost",
    }
    names = credentials.credential_names(env)
    assert names == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "HF_TOKEN", "HTTPS_PROXY", "OPENAI_API_KEY"]
    assert credentials.redact_env(env)["HF_TOKEN"] == "***"


def test_old_manifests_still_load(tmp_path: Path) -> None:
    from .test_units import _sample_manifest

    m = _sample_manifest()
    doc = json.loads(m.to_json())
    doc.pop("secret_env")
    assert manifest.Manifest.from_dict(doc).secret_env is None
    pm = manifest.ProcessManifest(manifest.HostIdentity("4.2", "k", "3.11", "v"), 1, [1], ["sleep"])
    doc = json.loads(pm.to_json())
    doc.pop("secret_env")
    assert manifest.ProcessManifest.from_dict(doc).secret_env is None


def _private(snap: Path) -> None:
    for dirpath, _dirs, files in os.walk(snap):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in files)]:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(p.lstat().st_mode) == want, f"{p} is {oct(p.lstat().st_mode)}"


@pytest.fixture
def secret_sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process with a credential in its environment, in a session of its own; killed at
    teardown, whatever copy of it (the restored one has its PID) is there by then."""
    env = {**os.environ, "HF_TOKEN": SECRET}
    proc = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(10)
        proctree.wait_gone([proc.pid], 30.0)


@needs_criu
@pytest.mark.slow
def test_process_snapshot_is_private_and_names_its_secrets(
    tmp_path: Path, secret_sleeper: subprocess.Popen[bytes]
) -> None:
    snap = tmp_path / "snap"
    r = run_cli("snapshot", "--pid", str(secret_sleeper.pid), "--out", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    secret_sleeper.wait(30)  # the dump ended it: reaped, its PID is free for the restore
    images = b"".join(p.read_bytes() for p in (snap / "criu").iterdir())
    assert SECRET.encode() in images  # why all of this matters: the image holds the value
    _private(snap)
    assert manifest.load_process(snap).secret_env == ["HF_TOKEN"]
    r = run_cli("inspect", str(snap), "--json")
    assert r.returncode == 0 and SECRET not in r.stdout
    doc = json.loads(r.stdout)
    assert doc["secret_env"] == ["HF_TOKEN"]
    assert any("HF_TOKEN" in w and "memory" in w for w in doc["warnings"])
    r = run_cli("inspect", str(snap))
    assert r.returncode == 0 and SECRET not in r.stdout + r.stderr
    (warning,) = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert "HF_TOKEN" in warning
    r = run_cli("restore", str(snap))  # what a restore adds to the snapshot is private too
    assert r.returncode == 0, r.stderr
    _private(snap)


# --- the slow part: one real vLLM snapshot taken with vLLM's own address flags ------------------

PORT = TEST_PORT + 7  # not the shared snapshot's


def _listening(port: int) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def _stop_servers(port: int) -> None:
    for pid in servers_on_port(port):
        with contextlib.suppress(OSError):
            tree = proctree.session_pids(os.getsid(pid))
            proctree.stop_session(os.getsid(pid))
            proctree.wait_gone(tree, 30.0, reaped=True)


@pytest.fixture(scope="module")
def wildcard_snapshot(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Path]:
    """`fastvllm snapshot MODEL --out S -- --port P --host 0.0.0.0`, as a vLLM user writes it,
    with HF_TOKEN in the environment. Before issue 21 it polled port 8000 until its timeout."""
    root = tmp_path_factory.mktemp("wildcard")
    snap = root / "snap"
    env = {**os.environ, "HF_TOKEN": SECRET}
    cmd = [*FASTVLLM, "snapshot", str(tiny_model), "--out", str(snap), "--timeout", "600"]
    try:
        r = subprocess.run(
            [*cmd, "--", "--port", str(PORT), "--host=0.0.0.0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        yield snap
    finally:
        _stop_servers(PORT)
        shutil.rmtree(root, ignore_errors=True)


@needs_criu
@pytest.mark.slow
def test_vllm_port_and_host_after_dashdash_are_honoured(wildcard_snapshot: Path) -> None:
    m = manifest.load(wildcard_snapshot)
    assert (m.server.port, m.server.host) == (PORT, "0.0.0.0")
    assert "--port" not in m.server.vllm_args and "--host=0.0.0.0" not in m.server.vllm_args
    _private(wildcard_snapshot)
    assert m.secret_env is not None and "HF_TOKEN" in m.secret_env
    r = run_cli("inspect", str(wildcard_snapshot))
    assert r.returncode == 0
    assert f"http://0.0.0.0:{PORT} (every address" in " ".join(r.stdout.split())
    assert SECRET not in r.stdout + r.stderr and "HF_TOKEN" in r.stderr


@needs_criu
@pytest.mark.slow
def test_two_restores_at_once_one_serves_the_other_says_why(wildcard_snapshot: Path) -> None:
    procs = [
        subprocess.Popen(
            [*FASTVLLM, "restore", str(wildcard_snapshot), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes[0] == 0 and codes[1] != 0, [
            (p.returncode, e) for p, (_, e) in zip(procs, outs, strict=True)
        ]
        (won,) = [json.loads(o) for p, (o, _) in zip(procs, outs, strict=True) if p.returncode == 0]
        (lost,) = [e for p, (_, e) in zip(procs, outs, strict=True) if p.returncode != 0]
        line = _one_error_line(lost)
        # The loser started while the winner restored (the lock: the line names the winner's
        # PID, or "another fastvllm process" if the winner had not written it yet), or, on a
        # very slow start, after it served (its port is taken then): one line that says why.
        assert "is being restored by" in line or f"port {PORT}" in line, line
        assert won["url"] == f"http://127.0.0.1:{PORT}" and won["listen"] == f"http://0.0.0.0:{PORT}"
        assert ("0.0.0.0", PORT) in _listening(PORT)
        # the loser's failure left the winner intact (its /dev/shm queues, its port): it answers
        name = manifest.load(wildcard_snapshot).server.served_model_name
        assert completions(won["url"], name, ["Hello"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        _stop_servers(PORT)
    # and the next command works
    deadline = time.monotonic() + 60
    while servers_on_port(PORT) and time.monotonic() < deadline:
        time.sleep(0.2)
    r = run_cli("restore", str(wildcard_snapshot), "--json")
    try:
        assert r.returncode == 0, r.stderr
    finally:
        _stop_servers(PORT)
