"""Every FASTVLLM_* environment variable, declared once: its type, its default and what it does.

Code reads a setting through its declaration (`config.CRIU.get()`), never `os.environ` by
name, so the table in docs/operations.md (rendered by `markdown_table()`, checked by
tests/test_docs.py) cannot drift from the code. A value is read when `get()` is called, not
at import: a parent process or a test may set it later. An empty value counts as unset. A
value that does not parse is a UsageError naming the variable and its default.

Some variables are not settings: fastvllm sets the `INTERNAL` ones for a helper it starts
(the LD_PRELOAD port helper reads them in C), `BUILD` ones are read by scripts/setup.sh and
the image builder, and `TEST` ones by the test suite only. They are declared here all the
same, so that the table lists every FASTVLLM_* name the project uses.

    python -m fastvllm.scripts.env_table                            # print the markdown table
    python -m fastvllm.scripts.env_table --update docs/operations.md  # rewrite it between markers
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastvllm.runtime.errors import UsageError

T = TypeVar("T")

_REPO = Path(__file__).resolve().parent.parent  # the checkout, for the build settings' defaults


class Scope(enum.Enum):
    """Who reads a variable."""

    SETTING = "setting"  # fastvllm reads it: a user may set it
    INTERNAL = "internal"  # fastvllm sets it for a helper it starts; never set it by hand
    BUILD = "build"  # scripts/setup.sh or the image builder reads it
    TEST = "test"  # for the test suite only; never set it in production


class PinMode(enum.Enum):
    """How the GPU loader pins its host buffers (docs/decisions/pinned-pool.md)."""

    TORCH = "torch"  # torch's pinned allocator (cudaHostAlloc), one call per buffer
    REGISTER = "register"  # one huge-page mapping, cudaHostRegister'ed buffer by buffer


class CopyWait(enum.Enum):
    """How the GPU loader's thread that hands staging buffers back waits for their copies."""

    SPIN = "spin"  # the CUDA context's default (it spins when cores outnumber contexts): a core busy
    BLOCK = "block"  # blocking-sync events: the thread sleeps and leaves its core to the readers


class LoaderReads(enum.Enum):
    """How the GPU loader's readers take the weight file's bytes into the staging buffers."""

    PREAD = "pread"  # preadv: the kernel copies out of the page cache
    MAPPED = "mapped"  # a read-only mapping of the file, copied from in user space (glibc's memmove)


class GraphMemory(enum.Enum):
    """What a sleeping GPU snapshot does with the CUDA graphs' memory (weights/graph_memory.py)."""

    RELEASE = "release"  # unmapped with the KV cache, mapped back with the weights: not in the image
    KEEP = "keep"  # vLLM's own: resident, copied into the image by the CUDA checkpoint


@dataclass(frozen=True)
class Var(Generic[T]):
    """One environment variable: `parse` turns its text into a T (ValueError: not valid),
    `default` gives the value when it is unset; the two *_doc strings are for the table."""

    name: str
    parse: Callable[[str], T]
    default: Callable[[], T]
    type_doc: str
    default_doc: str
    help: str
    scope: Scope = Scope.SETTING

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name, "").strip())

    def get(self) -> T:
        raw = os.environ.get(self.name, "")
        if not raw.strip():
            return self.default()
        try:
            return self.parse(raw)
        except ValueError as e:
            raise UsageError(
                f"{self.name}={raw!r} {e}",
                hint=f"unset it (default: {self.default_doc}) or give {self.type_doc}",
            ) from None


ALL: list[Var[Any]] = []


def _declare(var: Var[T]) -> Var[T]:
    if any(v.name == var.name for v in ALL):
        raise ValueError(f"{var.name} declared twice")
    ALL.append(var)
    return var


def _path(raw: str) -> Path:
    return Path(raw.strip()).expanduser()


def _text(raw: str) -> str:
    return raw.strip()


def _flag(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not 1 or 0")


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw.strip())
        except ValueError:
            v = lo - 1
        if not lo <= v <= hi:
            raise ValueError(f"is not {what} from {lo} to {hi}")
        return v

    return parse


E = TypeVar("E", bound=enum.Enum)


def _one_of(kind: type[E]) -> Callable[[str], E]:
    """A parser for an enum setting: its values, case and spaces ignored."""

    def parse(raw: str) -> E:
        try:
            return kind(raw.strip().lower())
        except ValueError:
            raise ValueError("is not one of: " + ", ".join(str(m.value) for m in kind)) from None

    return parse


def _run_dir() -> Path:
    return Path("/run/fastvllm" if os.geteuid() == 0 else "/tmp/fastvllm-run")


def _weights_store() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/fastvllm/weights")
    return Path.home() / ".cache" / "fastvllm" / "weights"


# --- settings: what a user may set -------------------------------------------------------

CRIU = _declare(
    Var[Path | None](
        "FASTVLLM_CRIU",
        _path,
        lambda: None,
        "a path",
        "the patched CRIU `scripts/setup.sh` installs, else `criu` on the PATH",
        "The CRIU binary to run (4.2 or newer); tried before any other.",
    )
)
VLLM_PYTHON = _declare(
    Var[str](
        "FASTVLLM_VLLM_PYTHON",
        _text,
        lambda: sys.executable,
        "a command or path",
        "the Python running fastvllm",
        "The Python that runs vLLM's server (`-m vllm.entrypoints.openai.api_server`) and that "
        "`fastvllm doctor` asks for vLLM's version.",
    )
)
HOME = _declare(
    Var[Path](
        "FASTVLLM_HOME",
        _path,
        lambda: Path.home() / ".cache" / "fastvllm",
        "a path",
        "`~/.cache/fastvllm`",
        "Where fastvllm keeps what it builds or learns once per user: the native helpers, the "
        "tiny model, what it found out about each CRIU binary, the files a restore imports "
        "(`startup-files.json`, read ahead by the `fastvllm` launcher).",
    )
)
RUN_DIR = _declare(
    Var[Path](
        "FASTVLLM_RUN_DIR",
        _path,
        _run_dir,
        "a path",
        "`/run/fastvllm` as root, else `/tmp/fastvllm-run`",
        "Records of the servers fastvllm launched or restored (`fastvllm ps`/`stop`) and the "
        "port helper's state files.",
    )
)
AGENT = _declare(
    Var[bool](
        "FASTVLLM_AGENT",
        _flag,
        lambda: True,
        "1 or 0",
        "1",
        "`fastvllm restore` hands the restore to a running `fastvllm agent` (its socket "
        "`agent.sock` in the run directory): no interpreter start or import is paid. 0: always "
        "restore in the command's own process. Read by fastvllm/resident_client.py itself.",
    )
)
WEIGHTS_STORE = _declare(
    Var[Path](
        "FASTVLLM_WEIGHTS_STORE",
        _path,
        _weights_store,
        "a path",
        "`/var/lib/fastvllm/weights` as root, else `~/.cache/fastvllm/weights`",
        "The content-addressed store that snapshots' weight files are hard-linked into, so "
        "snapshots of one model share one copy on disk. Keep it on the snapshots' file system.",
    )
)
SERVER_NICE = _declare(
    Var[int](
        "FASTVLLM_SERVER_NICE",
        _int_in(0, 19, "a nice value"),
        lambda: 10,
        "an integer 0-19",
        "10",
        "The CPU weight of the shared `fastvllm` cgroup every server joins, as a nice value "
        "(10 = weight 110 against 1024); 0 leaves servers where the kernel puts them.",
    )
)
CPU_ONEDNN = _declare(
    Var[bool](
        "FASTVLLM_CPU_ONEDNN",
        _flag,
        lambda: False,
        "1 or 0",
        "0",
        "1 keeps vLLM's own oneDNN choice for CPU GEMMs; its packed weights are opaque and stay "
        "in a sleeping snapshot's image (`released_bytes.weight_bytes_kept_opaque`).",
    )
)
PIN = _declare(
    Var[PinMode](
        "FASTVLLM_PIN",
        _one_of(PinMode),
        lambda: PinMode.TORCH,
        "`torch` or `register`",
        "`torch`",
        "How the GPU weight loader pins its host buffers: torch's pinned allocator, or one "
        "huge-page mapping registered with CUDA (measured slower; docs/decisions/pinned-pool.md).",
    )
)
GPU_PREFAULT_THREADS = _declare(
    Var[int](
        "FASTVLLM_GPU_PREFAULT_THREADS",
        _int_in(0, 64, "a thread count"),
        lambda: 4,
        "an integer 0-64",
        "4",
        "Threads that map the CUDA checkpoint's host copy of device memory in while the driver "
        "restores it (GPU snapshots restored in mmap mode; runtime/prefault.py); 0: none, the "
        "driver faults it in itself.",
    )
)
GPU_GRAPH_MEMORY = _declare(
    Var[GraphMemory](
        "FASTVLLM_GPU_GRAPH_MEMORY",
        _one_of(GraphMemory),
        lambda: GraphMemory.RELEASE,
        "`release` or `keep`",
        "`release`",
        "The CUDA graphs' memory of a GPU server launched for a sleeping snapshot: `release` "
        "allocates it through vLLM's sleep-mode allocator, so sleep unmaps it and the snapshot "
        "leaves it out (its contents are scratch: a smaller image, a faster CUDA restore); `keep` "
        "leaves it resident, as vLLM does, and the CUDA checkpoint copies it into the image. "
        "Read by the server at launch.",
    )
)
LOADER_THREADS = _declare(
    Var[int](
        "FASTVLLM_LOADER_THREADS",
        _int_in(0, 64, "a thread count"),
        lambda: 0,
        "an integer 0-64",
        "0",
        "Reader threads of the weight loader in a restore (0: on a GPU 12, or the host's core "
        "count if fewer, sharing the 14 staging buffers a GPU snapshot keeps; on the CPU the "
        "loader's default, 10 or the core count).",
    )
)
LOADER_COPY_WAIT = _declare(
    Var[CopyWait](
        "FASTVLLM_LOADER_COPY_WAIT",
        _one_of(CopyWait),
        lambda: CopyWait.SPIN,
        "`spin` or `block`",
        "`spin`",
        "How the GPU weight loader waits for each staging buffer's copy to the device before "
        "handing the buffer back to its readers: `spin` polls the copy's event, as CUDA does by "
        "default (one core busy for the whole load); `block` sleeps on it and leaves the core "
        "to the readers (no faster on the H100: docs/decisions/pinned-pool.md). Sent to the "
        "worker with each restore's reload: a snapshot taken before the setting existed "
        "refuses it, so set it only for snapshots taken since.",
    )
)
LOADER_READER_NICE = _declare(
    Var[int](
        "FASTVLLM_LOADER_READER_NICE",
        _int_in(0, 19, "a nice value"),
        lambda: 0,
        "an integer 0-19",
        "0",
        "How far the GPU weight loader's reader threads lower their priority (added to their "
        "nice value, up to 19), so that the thread issuing the copies to the device wins a core "
        "when it wakes (0: not at all; 5 was no faster on the H100: "
        "docs/decisions/pinned-pool.md). Sent to the worker with each restore's reload: a "
        "snapshot taken before the setting existed refuses it, so set it only for snapshots "
        "taken since.",
    )
)
LOADER_READS = _declare(
    Var[LoaderReads](
        "FASTVLLM_LOADER_READS",
        _one_of(LoaderReads),
        lambda: LoaderReads.PREAD,
        "`pread` or `mapped`",
        "`pread`",
        "How the GPU weight loader's readers take a warm weight file into its staging buffers: "
        "`pread` reads it (the kernel copies out of the page cache); `mapped` maps the file and "
        "copies from the mapping in user space, whose large copies stream past the CPU caches "
        "(built to measure whether host memory traffic bounds the loader: "
        "docs/decisions/pinned-pool.md). A cold file is read either way. Sent to the worker "
        "with each restore's reload: a snapshot taken before the setting existed refuses it, so "
        "set it only for snapshots taken since.",
    )
)
CRIU_LOG_LEVEL = _declare(
    Var[int](
        "FASTVLLM_CRIU_LOG_LEVEL",
        _int_in(0, 4, "a CRIU log level"),
        lambda: 4,
        "an integer 0-4",
        "4",
        "CRIU's `-v` level for the logs every dump and restore writes under the snapshot's "
        "`logs/` (4: everything, one write per line; 2: errors and warnings).",
    )
)
IMAGE_ID = _declare(
    Var[str](
        "FASTVLLM_IMAGE_ID",
        _text,
        lambda: "",
        "text",
        "the content of `/etc/fastvllm/image-id` (none outside an image)",
        "The container image's identity, recorded in a snapshot; a snapshot taken on another "
        "image is not restored. `Dockerfile.criu` writes the file; set this only to override it.",
    )
)

# --- internal: set by fastvllm for the LD_PRELOAD port helper (runtime/native/bind_ports.c) ---

BIND_PORTS = _declare(
    Var[str](
        "FASTVLLM_BIND_PORTS",
        _text,
        lambda: "",
        "`LO-HI`",
        "set per server",
        'The port range the helper hands a server\'s "any free port" binds from (below the '
        "kernel's ephemeral range).",
        Scope.INTERNAL,
    )
)
BIND_FIRST = _declare(
    Var[int](
        "FASTVLLM_BIND_FIRST",
        int,
        lambda: 0,
        "a port",
        "set per server",
        "The first port of the server's block (chosen by its API port).",
        Scope.INTERNAL,
    )
)
BIND_STATE = _declare(
    Var[Path](
        "FASTVLLM_BIND_STATE",
        _path,
        lambda: Path(),
        "a path",
        "set per server",
        "The file that keeps the server's processes on one sequence of ports.",
        Scope.INTERNAL,
    )
)
# --- internal: set by fastvllm for the control guard inside each vLLM server (runtime/control_guard.py)
CONTROL_TOKEN = _declare(
    Var[str](
        "FASTVLLM_CONTROL_TOKEN",
        _text,
        lambda: "",
        "a secret",
        "a new one per server",
        "The server's key to its control endpoints and readiness gate, given to it in its "
        "environment (never its command line); kept in the snapshot's and the instance record's "
        "0600 files. See Security below.",
        Scope.INTERNAL,
    )
)

# --- build: read by scripts/setup.sh and the image builder ------------------------------------

VENV = _declare(
    Var[Path](
        "FASTVLLM_VENV",
        _path,
        lambda: _REPO / ".venv",
        "a path",
        "`.venv` in the checkout",
        "Where `scripts/setup.sh` creates the virtual environment.",
        Scope.BUILD,
    )
)
DEPS = _declare(
    Var[Path](
        "FASTVLLM_DEPS",
        _path,
        lambda: _REPO / ".deps",
        "a path",
        "`.deps` in the checkout",
        "Where `scripts/setup.sh` and `python -m fastvllm.scripts.docker_image` keep downloaded "
        "and built dependencies (CRIU's source, the debootstrap base).",
        Scope.BUILD,
    )
)

# --- test: read by the test suite only ------------------------------------------------------

TEST_PORT = _declare(
    Var[int](
        "FASTVLLM_TEST_PORT",
        _int_in(1024, 65535, "a port"),
        lambda: 18731,
        "a port",
        "18731",
        "First port of the block the tests' servers use; give each concurrent test run its own.",
        Scope.TEST,
    )
)
TEST_VLLM_ARGS = _declare(
    Var[str](
        "FASTVLLM_TEST_VLLM_ARGS",
        _text,
        lambda: "",
        "shell words",
        "none",
        "Extra vLLM arguments for the tests' servers (e.g. `--attention-backend FLASH_ATTN` on "
        "a GPU machine).",
        Scope.TEST,
    )
)
FAULT = _declare(
    Var[str](
        "FASTVLLM_FAULT",
        _text,
        lambda: "",
        "`POINT:FAULT`",
        "none",
        "Fault injection (`runtime/faults.py`): the snapshot or restore pipeline fires FAULT "
        "(a signal, killing the server, a failing CRIU) when it reaches POINT.",
        Scope.TEST,
    )
)
FAULT_MATRIX = _declare(
    Var[str](
        "FASTVLLM_FAULT_MATRIX",
        _text,
        lambda: "",
        "`full` or unset",
        "unset: a subset of the cases",
        "`full` makes `tests/test_faults.py` run every fault at every point.",
        Scope.TEST,
    )
)
TEST_CASE = _declare(
    Var[str](
        "FASTVLLM_TEST_CASE",
        _text,
        lambda: "",
        "a tag",
        "none",
        "Set by `tests/test_faults.py` on the CLI it runs, so the test finds every process of "
        "the server tree it launched afterwards.",
        Scope.TEST,
    )
)


TABLE_START = "<!-- env-table:start (generated by `python -m fastvllm.scripts.env_table`) -->"
TABLE_END = "<!-- env-table:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The table docs/operations.md shows, between TABLE_START and TABLE_END, in scope order."""
    rows = [
        "| variable | kind | type | default | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for scope in Scope:
        for v in ALL:
            if v.scope is scope:
                cells = (f"`{v.name}`", scope.value, v.type_doc, v.default_doc, v.help)
                rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def table_in(text: str) -> str | None:
    """The generated table inside a document's markers, or None if the markers are missing."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        return None
    return text[start + len(TABLE_START) : end].strip()
