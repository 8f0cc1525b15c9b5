"""What the `fastvllm` command imports before it does any work (issue 23): the launcher is
standard library only, the CLI imports no command's heavy parts, the restore path has no numpy
and no HTTP client stack. Checked on sys.modules in fresh interpreters (no timings); plus the
launcher's read-ahead and file list, and the stdlib replacements of numpy on the restore path.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastvllm.prefetch import residency, warm
from fastvllm.restore import hotset

from fastvllm import launcher

# What no command should pay for just to start.
HEAVY = ("numpy", "httpx", "docker", "matplotlib", "rich.table", "fastvllm.restore.pipeline")


def _modules_after(code: str, env: dict[str, str] | None = None) -> tuple[set[str], set[str]]:
    """(modules loaded before `code`, modules loaded after it), in a fresh interpreter."""
    prog = (
        "import sys, json\nbefore = set(sys.modules)\n"
        f"{code}\n"
        "print(json.dumps([sorted(before), sorted(sys.modules)]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", prog],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, **(env or {})},
    )
    before, after = json.loads(r.stdout)
    return set(before), set(after)


def _heavy(mods: set[str]) -> list[str]:
    return sorted(
        m
        for m in mods
        if any(m == h or m.startswith(h + ".") for h in HEAVY) or m.startswith("fastvllm.scheduler")
    )


def test_importing_the_cli_imports_no_heavy_module() -> None:
    _, mods = _modules_after("import fastvllm.cli")
    assert _heavy(mods) == []


def test_the_restore_path_imports_no_numpy_and_no_http_client_stack() -> None:
    _, mods = _modules_after("import fastvllm.api, fastvllm.restore.pipeline")
    bad = [m for m in mods if m.split(".")[0] in ("numpy", "httpx", "docker", "matplotlib")]
    assert bad == [] and not any(m.startswith("fastvllm.scheduler") for m in mods)


def test_a_restore_the_launcher_runs_imports_no_cli_stack_and_no_http_client() -> None:
    """The launcher's restore (fastvllm/restore_command.py) with --json into a pipe: no typer or
    click (the CLI's parsing), no rich (nothing is drawn), no http.client/ssl/email (the servers
    are asked through runtime/localhttp's own socket client), no psutil (runtime/proctree reads
    /proc), no importlib.metadata (vLLM's version from its .dist-info)."""
    _, mods = _modules_after(
        "import fastvllm.launcher, fastvllm.restore_command, fastvllm.api, fastvllm.restore.pipeline\n"
        "from fastvllm.runtime import proctree, vllm_server\n"
        "vllm_server.vllm_version(); proctree.alive(1); proctree.pid_exists(1)"
    )
    banned = ("typer", "click", "rich", "http.client", "ssl", "email", "psutil", "importlib.metadata")
    assert sorted(m for m in mods if any(m == b or m.startswith(b + ".") for b in banned)) == []


def test_the_launcher_imports_only_the_standard_library() -> None:
    """Itself, the agent's client (called before anything else), the package's light
    __init__ (which makes the `snapshot` and `restore` packages callable), and the modes'
    enums (runtime/modes.py, standard library only by design)."""
    before, after = _modules_after(
        "import fastvllm.launcher\nfrom fastvllm import resident_client\n"
        "fastvllm.launcher._restore_target(['restore', '/nonexistent'])"
    )
    ours = {
        "fastvllm",
        "fastvllm.launcher",
        "fastvllm.resident_client",
        "fastvllm.snapshot",
        "fastvllm.restore",
        "fastvllm.runtime",
        "fastvllm.runtime.modes",
    }
    other = sorted(
        m for m in after - before if m.split(".")[0] not in sys.stdlib_module_names and m not in ours
    )
    assert other == []


@pytest.mark.parametrize("args", [["--help"], ["ps", "--json"], ["ps"]])
def test_the_console_script_runs_commands(args: list[str], tmp_path: Path) -> None:
    """Without importing pydantic: typer would build an adapter for the unset --help flag
    (cli._unset_flags_cost_nothing)."""
    env = {**os.environ, "FASTVLLM_RUN_DIR": str(tmp_path / "run"), "FASTVLLM_AGENT": "0"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fastvllm.launcher", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "| pydantic" not in r.stderr
    if args == ["ps"]:
        return
    if args == ["--help"]:
        assert "restore" in r.stdout and "snapshot" in r.stdout
    else:
        assert json.loads(r.stdout) == []


@pytest.mark.parametrize(
    "extra", [[], ["--json"], ["--timeout", "0"], ["--criu-restore", "MMAP", "--no-verify"]]
)
def test_a_restore_the_launcher_parsed_ends_as_the_cli_ends_it(extra: list[str], tmp_path: Path) -> None:
    """The launcher runs a restore with plain options without typer's parsing: same exit
    status and message as the CLI (here: not a snapshot, or an option value it refuses)."""
    env = {**os.environ, "FASTVLLM_RUN_DIR": str(tmp_path / "run"), "FASTVLLM_AGENT": "0"}
    got = []
    for entry in ("fastvllm.launcher", "fastvllm.cli"):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", entry, "restore", str(tmp_path), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")]
        got.append((r.returncode, r.stdout, lines[-1]))
        if entry == "fastvllm.launcher" and extra != ["--timeout", "0"]:  # typer's check refuses 0
            assert "| pydantic" not in r.stderr  # typer's parsing was skipped
    assert got[0] == got[1] and got[0][0] == 2


def test_the_restore_target_is_the_directory_with_a_manifest(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "manifest.json").write_text("{}")
    target = launcher._restore_target
    assert target(["restore", str(snap)]) == str(snap)
    assert target(["restore", "--timeout", "5", str(snap), "--json"]) == str(snap)
    assert target(["restore", str(tmp_path)]) is None  # no manifest
    assert target(["inspect", str(snap)]) is None
    assert target(["restore", str(snap), "--container", "img"]) is None  # its own file system
    assert target([]) is None


def test_the_startup_files_are_recorded_once_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(launcher, "_launched", False)
    launcher.record_startup_files()  # not started by the launcher (a test, the API): nothing kept
    assert not (tmp_path / "home" / launcher.STARTUP_FILES).exists()
    monkeypatch.setattr(launcher, "_launched", True)
    launcher.record_startup_files()
    path = tmp_path / "home" / launcher.STARTUP_FILES
    got = launcher._startup_files()
    assert got.modules == list(dict.fromkeys(got.modules))
    assert all(Path(p).is_file() for p in got.modules + got.libraries + got.stat)
    mtime = path.stat().st_mtime_ns
    launcher.record_startup_files()  # unchanged: not rewritten
    assert path.stat().st_mtime_ns == mtime
    doc = json.loads(path.read_text())
    doc["prefix"] = "/another/python"
    path.write_text(json.dumps(doc))
    assert launcher._startup_files() == launcher._Startup([], [], [])  # another interpreter's list


def test_the_read_ahead_asks_for_the_hot_ranges_and_the_startup_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, willneed: list[tuple[str, int, int]]
) -> None:
    """From a cold cache the startup files are asked for whole, before the snapshot's hot
    ranges, and of the image only its hot range; with the probed pages cached, nothing is asked
    for. The hints, not the pages that arrive, are checked (conftest's `willneed` says why)."""
    page = mmap.PAGESIZE
    snap = tmp_path / "snap"
    (snap / "local").mkdir(parents=True)
    (snap / "manifest.json").write_text("{}")
    image = snap / "pages-1.img"
    image.write_bytes(os.urandom(64 * page))
    module = tmp_path / "mod.pyc"
    module.write_bytes(os.urandom(8 * page))
    hot = {
        "version": launcher.HOT_SET_VERSION,
        "mode": "mmap",
        "files": [
            {"path": "pages-1.img", "size": 64 * page, "mtime_ns": 0, "ranges": [[0, 4 * page]], "stage": 1}
        ],
    }
    (snap / "local" / "hot.json").write_text(json.dumps(hot))
    home = tmp_path / "home"
    home.mkdir()
    doc = {"version": launcher.STARTUP_VERSION, "prefix": sys.prefix, "modules": [str(module)]}
    (home / launcher.STARTUP_FILES).write_text(json.dumps({**doc, "libraries": [], "stat": []}))
    monkeypatch.setenv("FASTVLLM_HOME", str(home))
    for f in (image, module):
        warm.evict([f])
    if residency.resident_pages(image)[0] or residency.resident_pages(module)[0]:
        pytest.skip("this file system keeps evicted pages (tmpfs?)")
    launcher._read_ahead(str(snap), prefetch=True)
    assert willneed == [
        (str(module), 0, 8 * page),
        (str(snap / "manifest.json"), 0, 2),
        (str(image), 0, 4 * page),  # the hot range, not the whole image
    ]
    # The probed pages in the page cache (a module's, the first hot range's): warm, nothing
    # more is asked for. Each is read just before, so that no eviction comes between.
    willneed.clear()
    for f in (module, image):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.pread(fd, 1, 0)
        finally:
            os.close(fd)
    launcher._read_ahead(str(snap), prefetch=True)
    assert willneed == []


def test_counting_resident_pages_without_numpy_agrees_with_a_plain_count() -> None:
    vec = (residency.ctypes.c_ubyte * 9)(0, 1, 1, 3, 0, 2, 255, 254, 1)
    assert residency._count_resident(vec) == sum(b & 1 for b in vec) == 5


def test_pagemap_runs_without_numpy_match_a_plain_decoding() -> None:
    """hotset._present's slice/translate/regex decoding against the obvious per-entry loop."""
    present, filed, other = 1 << 63, 1 << 61, (1 << 55) | 1234
    entries = [
        0,
        present | filed,
        present | filed,
        present,
        present | other,
        0,
        filed,
        present | filed | other,
    ]
    entries += [present | filed] * 3 + [0] * 5 + [present] * 2
    raw = b"".join(e.to_bytes(8, sys.byteorder) for e in entries)
    page = hotset.PAGE
    own, copies = hotset._present(io.BytesIO(raw), 0, len(entries) * page, base=100)
    want_own = [i + 100 for i, e in enumerate(entries) if e & present and e & filed]
    want_copies = [i + 100 for i, e in enumerate(entries) if e & present and not e & filed]
    assert [p for r in own for p in r] == want_own
    assert [p for r in copies for p in r] == want_copies


def test_the_launchers_copy_of_the_hot_set_format_agrees_with_hotset() -> None:
    snap = Path("/s")
    assert snap / launcher.HOT_SET == hotset.path_of(snap)
    assert (launcher.HOT_SET_VERSION, launcher.WILLNEED_CHUNK) == (hotset.VERSION, hotset.WILLNEED_CHUNK)
