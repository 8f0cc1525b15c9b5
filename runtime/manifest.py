"""The snapshot manifest: what was snapshotted (identity), how to bring it back (server
arguments, canary), and what every file must look like (size + xxh3-128).

xxh3 rather than sha256: verification sits on the restore path and must run at memory
speed; it guards against truncation and corruption, not against an attacker (snapshot
directories are 0700 and owned by root).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from fastvllm.runtime import private, sparse, system, vllm_server
from fastvllm.runtime.errors import IdentityMismatchError, IntegrityError, NotASnapshotError
from fastvllm.runtime.modes import SnapshotKind

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What a host learned about a snapshot (runtime.verified, restore.hotset): not part of it.
LOCAL_DIR = "local"
_CHUNK = 8 << 20


@dataclass
class FileEntry:
    path: str  # relative to the snapshot directory
    size: int
    xxh3_128: str


@dataclass
class Canary:
    prompt: str
    max_tokens: int
    token_ids: list[int]
    text: str


@dataclass
class ModelIdentity:
    path: str
    content_hash: str  # xxh3-128 over (relative name, size, bytes) of every file
    stat_fingerprint: str  # cheap: (name, size, mtime_ns); a restore rehashes only if it changed
    bytes: int


@dataclass
class HostIdentity:
    """What must match between the snapshot host and the restore host."""

    criu: str
    kernel: str
    python: str
    vllm: str
    image: str = ""  # the fastvllm container image's identity ("" on a host)

    @classmethod
    def here(cls, criu_version: str) -> HostIdentity:
        """This host's identity, the one a snapshot records and a restore must match."""
        return cls(
            criu=criu_version,
            kernel=system.kernel_release(),
            python=system.python_version(),
            vllm=vllm_server.vllm_version(),
            image=system.image_identity(),
        )

    def differences(self, other: HostIdentity) -> list[str]:
        return [
            f"{k}: snapshot {v!r}, here {getattr(other, k)!r}"
            for k, v in asdict(self).items()
            if getattr(other, k) != v
        ]


@dataclass
class ServerSpec:
    """How the server was launched; the restore reconnects and re-snapshots with it."""

    model: str
    served_model_name: str
    host: str
    port: int
    vllm_args: list[str]
    env: dict[str, str]
    log_path_at_dump: str  # the path CRIU recorded for the server's stdout/stderr
    tree_pids: list[int] = field(default_factory=list)  # CRIU restores these same PIDs
    worker_extension: bool = False  # launched with fastvllm's worker extension
    # The server's control token (runtime.control_guard), which its memory holds: a restore
    # needs it to reach the restored server ("": taken before the guard existed).
    control_token: str = field(default="", repr=False)


@dataclass
class Manifest:
    identity: HostIdentity
    model: ModelIdentity
    server: ServerSpec
    canary: Canary
    files: list[FileEntry] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    image_bytes: int = 0
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION
    source_snapshot: str | None = None  # set when the snapshotted server was itself restored
    # Sleeping snapshot: weights and KV cache were released before the dump; the restore
    # reloads the weights from this file (relative to the snapshot directory).
    weights_file: str | None = None
    released_bytes: dict[str, int] = field(default_factory=dict)
    # Content address (xxh3-128 of the data) of the weight file, and the shared store file
    # it is hard-linked to ("" when it could not be shared).
    weights_key: str | None = None
    weights_store_path: str = ""
    # A parallel server: every rank's weight file in rank order (`weights_file` is rank 0's;
    # the workers derive theirs from it), the tensor-parallel size, and the number of worker
    # processes (tensor x pipeline parallel).
    weights_files: list[str] = field(default_factory=list)
    tensor_parallel_size: int = 1
    world_size: int = 1
    # Each rank's worker process, rank order (CRIU restores these PIDs): errors name the rank.
    worker_pids: list[int] = field(default_factory=list)
    # Where the workers ran (runtime.devices.Devices as a dict): {"kind": "cpu"}, or the GPU
    # model, driver, count and UUIDs; {} for a snapshot taken before it was recorded.
    devices: dict[str, Any] = field(default_factory=dict)
    # GPU: vLLM's sleep level before the CUDA checkpoint (0: none), the processes whose GPU
    # state the CUDA driver checkpointed, and the GPU they ran on (a restore must match it).
    sleep_level: int = 0
    cuda_pids: list[int] = field(default_factory=list)
    gpu: dict[str, Any] | None = None
    # GPU: what the CUDA checkpoint moved (runtime.cuda_checkpoint). "processes": per PID (a
    # string key) the device memory it held and the address ranges its host copy fills (a
    # restore reads them ahead); "worker": the workers' device memory by kind, before and after
    # their allocator cache was released.
    gpu_state: dict[str, Any] = field(default_factory=dict)
    # TID -> CPUs of the threads that were bound to cores (CRIU does not restore affinity)
    affinity: dict[str, list[int]] = field(default_factory=dict)
    # Names (never values) of the credential-looking environment variables of the tree's
    # processes, whose values the image holds (runtime.credentials); None: not recorded (older).
    secret_env: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            identity=HostIdentity(**d["identity"]),
            model=ModelIdentity(**d["model"]),
            server=ServerSpec(**d["server"]),
            canary=Canary(**d["canary"]),
            files=[FileEntry(**f) for f in d["files"]],
            timings=d.get("timings", {}),
            image_bytes=d.get("image_bytes", 0),
            created_at=d["created_at"],
            format_version=d["format_version"],
            source_snapshot=d.get("source_snapshot"),
            weights_file=d.get("weights_file"),
            released_bytes=d.get("released_bytes", {}),
            weights_key=d.get("weights_key"),
            weights_store_path=d.get("weights_store_path", ""),
            weights_files=d.get("weights_files", []),
            tensor_parallel_size=d.get("tensor_parallel_size", 1),
            world_size=d.get("world_size", 1),
            worker_pids=d.get("worker_pids", []),
            devices=d.get("devices", {}),
            sleep_level=d.get("sleep_level", 0),
            cuda_pids=d.get("cuda_pids", []),
            gpu=d.get("gpu"),
            gpu_state=d.get("gpu_state", {}),
            affinity=d.get("affinity", {}),
            secret_env=d.get("secret_env"),
        )

    def write(self, directory: Path) -> None:
        _write_private(directory, self.to_json())

    def all_weight_files(self) -> list[str]:
        """Every rank's weight file (rank 0's first); [] for a snapshot that keeps none."""
        if not self.weights_file:
            return []
        return list(self.weights_files) or [self.weights_file]


def _write_private(directory: Path, text: str) -> None:
    """The manifest, readable by its owner only: a vLLM snapshot's holds its server's control
    token. Created 0600 (no window in which another user may open it), then renamed into place."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, directory / MANIFEST)


def check_guarded(directory: Path, m: Manifest) -> None:
    """A snapshot whose server has no control guard would come back with vLLM's development
    endpoints open to every local user: it is not restored."""
    if not m.server.control_token:
        raise NotASnapshotError(
            f"{directory} was taken by an older fastvllm whose server has no control guard "
            "(its /collective_rpc, /sleep and /wake_up would be open to every local user)",
            hint="take a new snapshot with this fastvllm",
        )


@dataclass
class ProcessManifest:
    """A plain process snapshot (`fastvllm snapshot --pid` of a tree fastvllm did not launch):
    no vLLM steps, no canary; GPU state, when the tree held any, came through the CUDA
    checkpoint API and must go back onto the same GPU model and driver."""

    identity: HostIdentity
    root_pid: int
    tree_pids: list[int]
    cmdline: list[str]
    cuda_pids: list[int] = field(default_factory=list)
    shell_job: bool = False  # the root was not a session leader (CRIU's --shell-job)
    gpu: dict[str, Any] | None = None  # runtime.cuda_checkpoint.GpuIdentity as a dict
    files: list[FileEntry] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    image_bytes: int = 0
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = FORMAT_VERSION
    kind: str = "process"
    secret_env: list[str] | None = None  # as Manifest.secret_env

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessManifest:
        d = dict(d)
        d["identity"] = HostIdentity(**d["identity"])
        d["files"] = [FileEntry(**f) for f in d["files"]]
        return cls(**d)

    def write(self, directory: Path) -> None:
        _write_private(directory, self.to_json())


def kind(directory: Path) -> SnapshotKind:
    """A served model (with canary) or a plain process tree; an unknown kind is a NotASnapshotError."""
    raw = _read_raw(directory).get("kind", SnapshotKind.VLLM)
    try:
        return SnapshotKind(raw)
    except ValueError:
        raise NotASnapshotError(
            f"{directory / MANIFEST} records an unknown kind {raw!r}",
            hint="the snapshot is damaged or from another version; take a new one",
        ) from None


def load_process(directory: Path) -> ProcessManifest:
    raw = _read_raw(directory)
    if raw.get("kind") != "process":
        raise NotASnapshotError(f"{directory} is a vLLM snapshot, not a process snapshot", hint="restore it")
    return _parse(ProcessManifest, raw, directory)


def load(directory: Path) -> Manifest:
    """Read and parse a vLLM snapshot's manifest; any problem is a NotASnapshotError."""
    raw = _read_raw(directory)
    if raw.get("kind", "vllm") != "vllm":
        raise NotASnapshotError(
            f"{directory} is a plain process snapshot, not a vLLM one",
            hint="'fastvllm restore' (or fastvllm.restore_process) restores it; the vLLM-only commands "
            "do not apply to it",
        )
    return _parse(Manifest, raw, directory)


def _parse(cls: Any, raw: dict[str, Any], directory: Path) -> Any:
    try:
        return cls.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise NotASnapshotError(
            f"{directory / MANIFEST} is incomplete ({e})", hint="the snapshot is damaged; take a new one"
        ) from e


def _read_raw(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise NotASnapshotError(f"snapshot directory {directory} does not exist", hint="check the path")
    if not directory.is_dir():
        raise NotASnapshotError(f"{directory} is not a directory", hint="pass a snapshot directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise NotASnapshotError(
            f"{directory} is not a fastvllm snapshot (no {MANIFEST})",
            hint="pass a directory written by 'fastvllm snapshot'",
        )
    try:
        raw = json.loads(path.read_text())
    except PermissionError as e:
        raise NotASnapshotError(
            f"cannot read {path}: permission denied", hint="run as the snapshot's owner (root)"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise NotASnapshotError(
            f"{path} is not valid JSON ({e})", hint="the snapshot is damaged; take a new one"
        ) from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise NotASnapshotError(
            f"{path} has format version {version!r}, this fastvllm reads {FORMAT_VERSION}",
            hint="take a new snapshot with this fastvllm",
        )
    return raw


_ZEROS = bytes(_CHUNK)
_MADV_POPULATE_READ = 22  # Linux 5.14 (runtime.memory has it too; runtime imports stay flat)


def hash_file(
    path: Path,
    on_bytes: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """xxh3-128 of the file's bytes. Holes (the sparse /dev/shm copies are mostly holes) are
    hashed as the zeros they read as, without reading them: same digest, none of the cost.
    `stop()` is asked before each chunk read; once it says True the digest is abandoned (None)."""
    view = memoryview(bytearray(_CHUNK))

    def chunk(f: Any, pos: int, n: int, _exact: bool) -> memoryview | None:
        f.seek(pos)
        got = 0
        while got < n:
            k = f.readinto(view[got:n])
            if not k:
                return None
            got += k
        return view[:n]

    return _hash_sparse(path, chunk, on_bytes, stop)


def hash_file_mapped(
    path: Path,
    on_bytes: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """`hash_file` through a read-only mapping instead of `read()`: the same digest, and the same
    page-cache fill, without copying every byte into a buffer first (half the CPU, which the
    restore's read-ahead shares with CRIU and the restored server on a small host). Each
    8 MiB window is populated in one call (MADV_POPULATE_READ, the kernel's large reads), then
    hashed. The size is checked before each window: a file cut short while it is read hashes
    to a wrong digest instead of faulting (SIGBUS) past its end."""
    held: list[tuple[mmap.mmap, memoryview, memoryview]] = []

    def drop() -> None:  # the previous window, hashed by now (views first: close() needs none)
        while held:
            m, v, sub = held.pop()
            sub.release()
            v.release()
            m.close()

    def chunk(f: Any, pos: int, n: int, exact: bool) -> memoryview | None:
        drop()
        if os.fstat(f.fileno()).st_size < pos + n:
            return None
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(f.fileno(), pos - base + n, prot=mmap.PROT_READ, offset=base)
        if exact:  # a run of data before a hole: the fault's read-around would zero-fill the hole
            os.posix_fadvise(f.fileno(), pos, n, os.POSIX_FADV_WILLNEED)
            m.madvise(mmap.MADV_RANDOM)
        # Before Linux 5.14 (EINVAL) the hash's own page faults read the window in.
        with contextlib.suppress(OSError):
            m.madvise(_MADV_POPULATE_READ)
        view = memoryview(m)
        sub = view[pos - base :]
        held.append((m, view, sub))
        return sub

    try:
        return _hash_sparse(path, chunk, on_bytes, stop)
    finally:
        drop()


def update_zeros(h: Any, n: int) -> None:
    """Feed `n` zero bytes to hasher `h`: a hole, hashed as the zeros it reads as, unread."""
    zeros = memoryview(_ZEROS)
    while n > 0:
        k = min(_CHUNK, n)
        h.update(zeros[:k])
        n -= k


def new_hasher() -> Any:
    """The hasher of FileEntry.xxh3_128, for a writer that hashes what it writes."""
    return xxhash.xxh3_128()


def _hash_sparse(
    path: Path,
    chunk: Callable[[Any, int, int, bool], memoryview | None],
    on_bytes: Callable[[int], None] | None,
    stop: Callable[[], bool] | None,
) -> str | None:
    """The walk both hashes share: data runs (SEEK_DATA / SEEK_HOLE) are hashed in chunks that
    `chunk(f, pos, n, exact)` returns (None: the file shrank, so the digest will not match), holes
    as zeros without reading them. `exact`: the file has holes, so read no byte past the run."""
    h = new_hasher()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        runs = [(d, d + n) for d, n in sparse.data_extents(fd, size)]
        exact = sum(end - d for d, end in runs) < size
        for data, end in [*runs, (size, size)]:  # the last pair hashes a trailing hole
            if pos < data:  # a hole reads as zeros
                update_zeros(h, data - pos)
                if on_bytes:
                    on_bytes(data - pos)
                pos = data
            while pos < end:
                if stop is not None and stop():
                    return None
                n = min(_CHUNK, end - pos)
                got = chunk(f, pos, n, exact)
                if got is None:
                    return h.hexdigest()
                h.update(got)
                pos += n
                if on_bytes:
                    on_bytes(n)
    return h.hexdigest()


def _walk(root: Path, skip: Iterable[str]) -> list[Path]:
    skip = set(skip)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip and rel.name not in skip:
            out.append(p)
    return out


def collect_files(
    root: Path,
    skip: Iterable[str] = (MANIFEST, "logs", LOCAL_DIR),
    on_bytes: Callable[[int], None] | None = None,
) -> list[FileEntry]:
    """Hash every file under `root` except the manifest, logs and what a host learned, in parallel.
    First, everything under `root` is made private (runtime.private: files 0600, directories
    0700; the images hold the server's memory), before any file is hashed or stamped."""
    private.make_private(root)
    files = _walk(root, skip)

    def digest(p: Path) -> str:
        h = hash_file(p, on_bytes)
        assert h is not None  # only a `stop` abandons a digest, and there is none here
        return h

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        hashes = list(pool.map(digest, files))
    return [
        FileEntry(str(p.relative_to(root)), p.stat().st_size, h) for p, h in zip(files, hashes, strict=True)
    ]


def verify_files(root: Path, entries: list[FileEntry], on_bytes: Callable[[int], None] | None = None) -> None:
    """Sizes first (cheap, catches truncation), then content; the first problem is raised."""
    check_sizes(root, entries)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = list(pool.map(lambda e: (e, hash_file(root / e.path, on_bytes)), entries))
    for e, h in results:
        check_digest(e, h)


def check_digest(e: FileEntry, digest: str | None) -> None:
    if digest != e.xxh3_128:
        raise IntegrityError(
            f"snapshot file {e.path} does not match its checksum (altered or corrupted)",
            hint="the snapshot is damaged; take a new one",
        )


def check_sizes(root: Path, entries: list[FileEntry]) -> None:
    """Every file present with its recorded size: catches a missing or truncated file at once."""
    for e in entries:
        p = root / e.path
        if not p.is_file():
            raise IntegrityError(
                f"snapshot file {e.path} is missing", hint="the snapshot is damaged; take a new one"
            )
        size = p.stat().st_size
        if size != e.size:
            raise IntegrityError(
                f"snapshot file {e.path} has {size} bytes, the manifest says {e.size} (truncated or altered)",
                hint="the snapshot is damaged; take a new one",
            )


def model_identity(model_dir: Path) -> ModelIdentity:
    content = xxhash.xxh3_128()
    total = 0
    for p in _walk(model_dir, skip=()):
        size = p.stat().st_size
        total += size
        content.update(f"{p.relative_to(model_dir)}\0{size}\0{hash_file(p)}\n".encode())
    return ModelIdentity(str(model_dir), content.hexdigest(), model_stat_fingerprint(model_dir), total)


def check_model_unchanged(recorded: ModelIdentity) -> None:
    """The restored process has the model's files open or mapped by path: they must be the same."""
    model_dir = Path(recorded.path)
    if not model_dir.is_dir():
        raise IdentityMismatchError(
            f"the snapshot's model {model_dir} is not on this host",
            hint="restore on a host that has the model at the same path",
        )
    now = model_stat_fingerprint(model_dir)
    if now == recorded.stat_fingerprint:
        return
    if model_identity(model_dir).content_hash != recorded.content_hash:
        raise IdentityMismatchError(
            f"the model at {model_dir} changed since the snapshot (content hash differs)",
            hint="restore the original model files or take a new snapshot",
        )


def model_stat_fingerprint(model_dir: Path) -> str:
    stat = xxhash.xxh3_128()
    for p in _walk(model_dir, skip=()):
        st = p.stat()
        stat.update(f"{p.relative_to(model_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return stat.hexdigest()
