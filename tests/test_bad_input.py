"""Bad input: each a clear one-line message, a nonzero exit, nothing half-written, no stray
process. These run the real CLI; the ones that need a snapshot share the session's one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastvllm.runtime import manifest, proctree

from .conftest import TEST_PORT, SharedSnapshot, needs_criu, run_cli, servers_on_port


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".partial-" in p.name], "a staging directory was left behind"
    assert not servers_on_port(TEST_PORT), "a vLLM process was left behind"


@needs_criu
def test_model_path_missing(tmp_path: Path) -> None:
    r = run_cli("snapshot", str(tmp_path / "nope"), "--out", str(tmp_path / "s"), "--port", str(TEST_PORT))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "s").exists()
    _no_leftovers(tmp_path)


@needs_criu
def test_model_path_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README").write_text("not a model")
    r = run_cli("snapshot", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--port", str(TEST_PORT))
    assert r.returncode == 2
    assert "not a model directory (no config.json)" in r.stderr
    assert not (tmp_path / "s").exists()


@needs_criu
def test_output_directory_exists(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli("snapshot", str(tiny_model), "--out", str(out), "--port", str(TEST_PORT))
    assert r.returncode == 2
    assert "already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _no_leftovers(tmp_path)


@needs_criu
def test_port_in_use(tmp_path: Path, tiny_model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("snapshot", str(tiny_model), "--out", str(tmp_path / "s"), "--port", str(port))
    assert r.returncode == 2
    assert f"port {port}" in r.stderr and "in use" in r.stderr and "--port" in r.stderr
    assert not (tmp_path / "s").exists()
    assert not servers_on_port(port)


@needs_criu
def test_snapshot_bad_graph_memory_setting(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's worker reads it at launch; `snapshot` checks it before starting anything."""
    monkeypatch.setenv("FASTVLLM_GPU_GRAPH_MEMORY", "drop")
    r = run_cli("snapshot", str(tiny_model), "--out", str(tmp_path / "s"), "--port", str(TEST_PORT))
    assert r.returncode == 2
    assert "FASTVLLM_GPU_GRAPH_MEMORY='drop' is not one of: release, keep" in r.stderr
    assert not (tmp_path / "s").exists()
    _no_leftovers(tmp_path)


@needs_criu
def test_restore_missing_directory(tmp_path: Path) -> None:
    r = run_cli("restore", str(tmp_path / "nothing"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr


@needs_criu
def test_restore_bad_server_nice(shared_snapshot: SharedSnapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTVLLM_SERVER_NICE", "-5")
    r = run_cli("restore", str(shared_snapshot.path))
    assert r.returncode == 2
    assert "FASTVLLM_SERVER_NICE='-5' is not a nice value from 0 to 19" in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        r.stderr.strip().splitlines()[-1]
    ]
    assert not servers_on_port(TEST_PORT)


@needs_criu
def test_restore_not_a_snapshot(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    r = run_cli("restore", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "not a fastvllm snapshot" in r.stderr


def _copy_with_links(src: Path, dst: Path, *, copy: tuple[str, ...] = ()) -> None:
    """A cheap copy of a snapshot: symlinks to the big image files, real copies of `copy`."""
    dst.mkdir(mode=0o700)
    shutil.copy2(src / "manifest.json", dst / "manifest.json")
    for sub in sorted(p.name for p in src.iterdir() if p.is_dir() and p.name != "logs"):
        (dst / sub).mkdir()
        for f in (src / sub).iterdir():
            if f"{sub}/{f.name}" in copy:
                shutil.copy2(f, dst / sub / f.name)
            else:
                (dst / sub / f.name).symlink_to(f)


@needs_criu
@pytest.mark.slow
@pytest.mark.parametrize("field", ["vllm", "criu", "kernel"])
def test_restore_other_version(shared_snapshot: SharedSnapshot, tmp_path: Path, field: str) -> None:
    dst = tmp_path / "other"
    _copy_with_links(shared_snapshot.path, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    doc["identity"][field] = "0.0.0-elsewhere"
    (dst / "manifest.json").write_text(json.dumps(doc))
    r = run_cli("restore", str(dst))
    assert r.returncode == 3
    assert field in r.stderr and "0.0.0-elsewhere" in r.stderr
    assert not servers_on_port(TEST_PORT)


def _small_image(snap: Path) -> str:
    m = manifest.load(snap)
    f = min((f for f in m.files if f.path.startswith("criu/core-")), key=lambda f: f.size)
    return f.path


@needs_criu
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_restore_damaged_image(shared_snapshot: SharedSnapshot, tmp_path: Path, damage: str) -> None:
    name = _small_image(shared_snapshot.path)
    dst = tmp_path / "damaged"
    _copy_with_links(shared_snapshot.path, dst, copy=(name,))
    data = bytearray((dst / name).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    (dst / name).write_bytes(bytes(data))
    r = run_cli("restore", str(dst))
    assert r.returncode == 4
    assert name in r.stderr
    assert ("truncated" in r.stderr) if damage == "truncate" else ("checksum" in r.stderr)
    assert not servers_on_port(TEST_PORT)


@needs_criu
@pytest.mark.slow
def test_restore_criu_fails_with_log_tail(shared_snapshot: SharedSnapshot, tmp_path: Path) -> None:
    """An image CRIU cannot read whose checksum was updated to match: our checks pass, CRIU
    fails, and the message carries its log."""
    dst = tmp_path / "badimg"
    _copy_with_links(shared_snapshot.path, dst, copy=("criu/pstree.img",))
    (dst / "criu/pstree.img").write_bytes(b"\x00" * 16)
    doc = json.loads((dst / "manifest.json").read_text())
    for f in doc["files"]:
        if f["path"] == "criu/pstree.img":
            f["size"] = 16
            f["xxh3_128"] = manifest.hash_file(dst / "criu/pstree.img")
    (dst / "manifest.json").write_text(json.dumps(doc))
    r = run_cli("restore", str(dst))
    assert r.returncode == 6
    assert "CRIU restore failed" in r.stderr
    assert "criu-restore" in r.stderr  # the hint names the full log
    assert len(r.stderr.splitlines()) > 2  # and the relevant tail of it follows
    assert not servers_on_port(TEST_PORT)
    m = manifest.load(shared_snapshot.path)
    assert not any(proctree.alive(p) for p in m.server.tree_pids)


@needs_criu
def test_missing_capability(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]
    cmd = [*drop, sys.executable, "-m", "fastvllm.cli", "restore", str(tmp_path / "x")]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 5, r.stderr
    assert "CAP_SYS_PTRACE" in r.stderr


@needs_criu
def test_not_root(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    os.chmod(tmp_path, 0o755)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    cmd = [*nobody, sys.executable, "-m", "fastvllm.cli", "snapshot", "tiny", "--out", str(tmp_path / "s")]
    env = {**os.environ, "HOME": str(tmp_path)}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    assert r.returncode == 5, r.stderr
    assert "must run as root" in r.stderr
    assert not (tmp_path / "s").exists()
