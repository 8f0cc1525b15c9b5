"""Shared fixtures. The slow tests share ONE vLLM launch and ONE snapshot (session scope):
vLLM takes 30-50 s to start on a 2-core machine, everything else is seconds."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fastvllm.runtime import criu, proctree
from fastvllm.runtime.errors import FastVLLMError

TEST_PORT = int(os.environ.get("FASTVLLM_TEST_PORT", "18731"))
PROMPTS = [
    "The history of the lighthouse keeper begins",
    "Once upon a time there was a queen who",
    "The server restored its cache and the model",
    "In the garden the old machine",
]
FASTVLLM = [sys.executable, "-m", "fastvllm.cli"]


def _criu_unusable() -> str | None:
    if os.geteuid() != 0:
        return "CRIU needs root; run the tests as root"
    try:
        criu.find_criu()
    except FastVLLMError as e:
        return f"{e.message} ({e.hint})"
    return None


def _vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:
        return f"vLLM is not importable: {e}"
    return None


needs_criu = pytest.mark.skipif(_criu_unusable() is not None, reason=str(_criu_unusable()))


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FASTVLLM, *args], capture_output=True, text=True, timeout=timeout, check=False)


def servers_on_port(port: int) -> list[int]:
    """PIDs of processes whose command line names this port (a vLLM server we started)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and "--port" in cmd and str(port) in cmd:
            out.append(p.pid)
    return out


def completions(base_url: str, model: str, prompts: list[str], max_tokens: int = 20) -> list[list[int]]:
    import httpx

    res = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        body |= {"return_token_ids": True, "ignore_eos": True}
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        res.append(r.json()["choices"][0]["token_ids"])
    return res


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastvllm.runtime.tiny_model import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@dataclass
class SharedSnapshot:
    path: Path
    model: Path
    served_model_name: str
    before: list[list[int]]  # PROMPTS' greedy tokens from the original server
    root: Path


@pytest.fixture(scope="session")
def shared_snapshot(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SharedSnapshot]:
    """One real vLLM launch, snapshotted with --leave-running so the original server can answer
    the prompts the restored ones must reproduce; then the original is stopped."""
    with snapshot_for_tests(tmp_path_factory.mktemp("snapshots"), tiny_model, TEST_PORT) as snap:
        yield snap


@contextlib.contextmanager
def snapshot_for_tests(
    root: Path, tiny_model: Path, port: int, vllm_args: list[str] | None = None
) -> Iterator[SharedSnapshot]:
    """A snapshot of the tiny model under `root` (its server on `port`), with the original
    server's greedy answers to PROMPTS, one at a time; removed, and any server left on `port`
    stopped, when the block ends. A skip where CRIU or vLLM cannot run here."""
    reason = _criu_unusable() or _vllm_missing()
    if reason:
        pytest.skip(reason)
    import fastvllm

    # e.g. FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN" on the GPU machine (DESIGN.md)
    extra = shlex.split(os.environ.get("FASTVLLM_TEST_VLLM_ARGS", "")) + (vllm_args or [])
    try:
        snap = fastvllm.snapshot(
            str(tiny_model), out=root / "tiny", port=port, leave_running=True, vllm_args=extra
        )
    except FastVLLMError as e:  # the server's or CRIU's log tail, not only the one line
        pytest.fail(f"the snapshot for the tests failed: {e.message}\n{e.detail or ''}")
    assert snap.server is not None
    try:
        name = snap.manifest.server.served_model_name
        before = completions(snap.server.base_url, name, PROMPTS)
    finally:
        tree = proctree.session_pids(snap.server.pid)
        fastvllm.stop(snap.server.pid)
        proctree.wait_gone(tree, 30, reaped=True)
    try:
        yield SharedSnapshot(snap.path, tiny_model, name, before, root)
    finally:
        for pid in servers_on_port(port):
            proctree.stop_session(os.getsid(pid))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def restored_cleanup() -> Iterator[list[int]]:
    """Tests append the root PIDs of servers they restore; teardown stops them even on failure."""
    import fastvllm

    pids: list[int] = []
    yield pids
    for pid in pids:
        tree = proctree.session_pids(pid)
        fastvllm.stop(pid)
        proctree.wait_gone(tree, 30, reaped=True)


@pytest.fixture
def willneed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """The WILLNEED hints this test's code gives, as (path, offset, length), each passed on to
    the real posix_fadvise. Tests check the hints, not what the kernel then reads: WILLNEED is
    advice the kernel may drop (its page allocations give up under memory pressure; a full
    suite on CI, with gigabytes of snapshot images written, once left a file unread for 60 s)."""
    seen: list[tuple[str, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            seen.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return seen


def page_image_vm_flags(pids: list[int]) -> list[set[str]]:
    """The VmFlags of every mapping of a CRIU page image among `pids` (/proc/PID/smaps): a tree
    restored in mmap mode maps its page images, and CRIU's advice shows there ("rr": random)."""
    out, inside = [], False
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header
                inside = len(head) >= 6 and "/pages-" in head[5]
            elif inside and line.startswith("VmFlags:"):
                out.append(set(head[1:]))
    return out
