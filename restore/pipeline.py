"""The restore pipeline: validate the manifest, the identity and the checksums, CRIU-restore
the tree, wait until healthy, and prove it with the canary before calling it serving.

By default the snapshot's files are read ahead in the background (`restore.readahead`), in
the order the restore needs them, while CRIU restores: the disk's time hides behind CRIU's
work, and the checksums are checked on the way instead of in a pass of their own before CRIU
may start. The canary waits for that check. `prefetch=False` keeps the serial order (all
checksums first), for comparison. A file this host already checked, unchanged since, is not
hashed again (`runtime.verified`; `reverify` hashes everything), and the ranges the tree
needed last time are read first (`restore.hotset`, learned after the first restore's canary).

A restored tree that fails any later step is stopped: a server that answers differently
from the one snapshotted is worse than none.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastvllm.prefetch import residency, warm
from fastvllm.restore import hotset, order
from fastvllm.restore.plan import RestorePlan, WeightsBack
from fastvllm.restore.plan import make as make_plan
from fastvllm.restore.readahead import HotReader, ReadAhead
from fastvllm.runtime import (
    affinity,
    bind_ports,
    config,
    cpu_share,
    criu,
    cuda_checkpoint,
    devices,
    faults,
    instances,
    journal,
    manifest,
    prefault,
    proctree,
    ranks,
    restore_lock,
    shm,
    signals,
    system,
    verified,
    vllm_server,
    worker_rpc,
)
from fastvllm.runtime.errors import (
    CanaryMismatchError,
    FastVLLMError,
    IdentityMismatchError,
    IntegrityError,
    PortInUseError,
    UsageError,
)
from fastvllm.runtime.modes import CriuRestoreMode, Reloader
from fastvllm.runtime.timeline import Timeline

# The loader's readers in a restored GPU worker (FASTVLLM_LOADER_THREADS unset): 12, two fewer
# than the 14 staging buffers its snapshot kept, so that copies in flight never leave a reader
# without a buffer. On the H100, 14 readers (every buffer held by a reader) fell to half the
# pinned bound on one host, and 12 beat both 14 and 10 there (docs/decisions/pinned-pool.md);
# a CPU restore keeps the loader's own.
RELOAD_THREADS = min(12, os.cpu_count() or 4)


@dataclass
class RestoreOptions:
    snapshot: Path
    verify: bool = True
    health_timeout: float = 120.0
    prefetch: bool = True  # read the files ahead while CRIU restores (checksums on the way)
    prefetch_threads: int = 0  # 0: the measured default
    reloader: Reloader = Reloader.FASTVLLM  # GPU sleep-2 snapshots: what refills the weights
    # How CRIU fills private memory (runtime.modes; AUTO: the fastest this CRIU runs).
    criu_restore: CriuRestoreMode | str = CriuRestoreMode.AUTO
    reverify: bool = False  # hash every file, even those this host checked before and unchanged
    # Bind the tree's threads to the cores they were bound to at snapshot time (CRIU does not).
    # Off by default: those cores were chosen for the snapshot host and its neighbours, and
    # vLLM's `auto` binding puts every server of a host on the same ones (two restored servers
    # on one 2-core host then fight over core 0: the cluster tests' migrations stopped switching).
    keep_affinity: bool = False
    # GPU snapshots: this host's GPUs to restore onto (indices or UUIDs, comma-separated, one
    # per GPU the snapshot used); None: the snapshotted ones (runtime.devices.gpu_pairs).
    gpus: str | None = None


@dataclass
class RestoreResult:
    snapshot: Path
    server: vllm_server.Server
    timeline: Timeline
    time_to_first_completion_s: float
    canary_ok: bool
    manifest: manifest.Manifest
    criu_restore: CriuRestoreMode = CriuRestoreMode.COPY
    readahead: dict[str, object] | None = None  # ReadAheadStats.as_dict(); None with no read-ahead
    gpu: dict[str, object] | None = None  # CUDA restore per process and the loader's figures

    def as_dict(self) -> dict[str, object]:
        return {
            "snapshot": str(self.snapshot),
            "pid": self.server.pid,
            "url": self.server.base_url,  # where to reach it from this host
            "listen": self.server.listen_url,  # the address it binds (0.0.0.0: every address)
            "log": str(self.server.log_path),
            "time_to_first_completion_s": round(self.time_to_first_completion_s, 4),
            # the phases' origin on the host's monotonic clock (time.perf_counter, which CPython
            # reads from CLOCK_MONOTONIC on Linux: one clock for every process of a host), so a
            # caller that spawned the command can tell the command's start-up from the restore
            "timeline_origin_s": round(self.timeline.origin, 6),
            "canary_ok": self.canary_ok,
            "criu_restore": self.criu_restore,
            "readahead": self.readahead,
            "gpu": self.gpu,
            "phases": self.timeline.as_list(),
        }


@dataclass(frozen=True)
class _Faults:
    """How the restored tree meets its page images (mmap mode). `random`: each fault reads its
    own page only (CRIU's --mmap-pages-random), where nothing reads the images whole. `learn`:
    this restore may learn the hot set. With random faults, only one whose tree faulted its
    pages in from a cold cache: after a whole-file read, or from a warm cache, the kernel's
    fault-around also maps cached neighbours of each touched page, and the set comes out
    inflated (523 MB warm, 334 MB, against 225 MB, for the tiny model)."""

    random: bool = False
    learn: bool = True


class _GpuQueries:
    """What a GPU snapshot's checks ask of this host's GPUs (its identity, its GPU list). The
    driver's own files answer at once where they can (`devices.driver_gpus`); otherwise, or
    where their answer would refuse the restore (`exact`), nvidia-smi is asked (tens of
    milliseconds each), side by side in the background as soon as the manifest says the
    snapshot has GPU state, while the rest of the validation runs."""

    def __init__(self) -> None:
        pool = ThreadPoolExecutor(3, thread_name_prefix="gpu-query")
        # The driver API loaded and initialised (cuInit) before the CUDA restore needs it: in a
        # fresh process (the command, a container's entrypoint) that is otherwise on its path.
        pool.submit(cuda_checkpoint.prepare)
        self.fast = devices.driver_gpus()
        self._identity = pool.submit(cuda_checkpoint.gpu_identity) if self.fast is None else None
        self._gpus = pool.submit(devices.list_gpus) if self.fast is None else None
        pool.shutdown(wait=False)

    @staticmethod
    def start(m: manifest.Manifest) -> _GpuQueries | None:
        return _GpuQueries() if (m.cuda_pids or m.gpu is not None) else None

    def identity(self, *, exact: bool = False) -> cuda_checkpoint.GpuIdentity | None:
        if self.fast and not exact:
            return cuda_checkpoint.GpuIdentity(self.fast[0].model, self.fast[0].driver, 0)
        return self._identity.result() if self._identity is not None else cuda_checkpoint.gpu_identity()

    def gpus(self, *, exact: bool = False) -> list[devices.Gpu]:
        if self.fast is not None and not exact:
            return self.fast
        return self._gpus.result() if self._gpus is not None else devices.list_gpus()


def _preflight(
    path: Path,
    m: manifest.Manifest,
    found: criu.Criu,
    queries: _GpuQueries | None = None,
) -> None:
    """The checks before CRIU may run (the CRIU mode was resolved, and checked against this
    CRIU, for the plan)."""
    manifest.check_guarded(path, m)  # no server comes back with its control endpoints open
    diffs = m.identity.differences(manifest.HostIdentity.here(found.version))
    if diffs:
        raise IdentityMismatchError(
            "snapshot was taken on a different host setup: " + "; ".join(diffs),
            hint="restore with the same CRIU, kernel, Python and vLLM, or take a new snapshot here",
        )
    if m.gpu is not None:
        gdiffs = _gpu_differences(m.gpu, queries.identity() if queries else cuda_checkpoint.gpu_identity())
        if gdiffs and queries is not None and queries.fast is not None:  # nvidia-smi decides a refusal
            gdiffs = _gpu_differences(m.gpu, queries.identity(exact=True))
        if gdiffs:
            raise IdentityMismatchError(
                "snapshot was taken on a different GPU setup: " + "; ".join(gdiffs),
                hint="restore on a host with the same GPU model and driver, or take a new snapshot here",
            )
    manifest.check_model_unchanged(m.model)
    try:
        vllm_server.ensure_port_free(m.server.host, m.server.port)
    except PortInUseError as e:
        running = [i.pid for i in instances.running() if i.port == m.server.port]
        hint = f"stop it first: fastvllm stop {running[0]}" if running else "stop what listens there"
        raise PortInUseError(f"{e.message}: the restored server needs it back", hint=hint) from e
    try:
        criu.check_ids_free([f.path for f in m.files], m.server.tree_pids, "server")
    except UsageError as e:
        # A server fastvllm runs holds them (e.g. the rest of a tree whose root was killed).
        holders = [i for p in m.server.tree_pids if proctree.alive(p) and (i := instances.owner_of(p))]
        if holders:
            e.hint = f"a server fastvllm started still runs with them: fastvllm stop {holders[0].pid}"
        raise
    # A stopped tree's zombies hold their PIDs until init reaps them (seconds on some hosts).
    if proctree.wait_gone(m.server.tree_pids, 30.0, reaped=True):
        raise UsageError(
            "the snapshot's PIDs are still held by exited processes nobody has reaped",
            hint="retry in a few seconds; if it persists, the host's init does not reap orphans",
        )


def _gpu_differences(recorded: dict[str, Any], here: cuda_checkpoint.GpuIdentity | None) -> list[str]:
    if here is None:
        return [f"GPU: snapshot on a {recorded['model']}, none here"]
    return cuda_checkpoint.GpuIdentity(**recorded).differences(here)


def restore_snapshot(
    opts: RestoreOptions,
    timeline: Timeline | None = None,
    on_verify_bytes: Callable[[int], None] | None = None,
) -> RestoreResult:
    journal.recover()  # a tree an interrupted restore left is stopped, its PIDs freed
    with restore_lock.restoring(opts.snapshot.expanduser()):  # a second restore of it fails at once
        return _restore_snapshot(opts, timeline, on_verify_bytes)


def _restore_snapshot(
    opts: RestoreOptions,
    timeline: Timeline | None = None,
    on_verify_bytes: Callable[[int], None] | None = None,
) -> RestoreResult:
    tl = timeline or Timeline()
    path = opts.snapshot.expanduser().absolute()
    proctree.adopt_orphans()
    early: HotReader | None = None
    resident = residency.Sampled(path)  # each big file's share in the page cache, sampled once
    with tl.phase("validate"):
        system.require_criu_privileges()  # first: without it nothing below can succeed
        m = manifest.load(path)
        queries = _GpuQueries.start(m)  # answered while the rest below runs
        found = criu.find_criu()
        the_plan = make_plan(
            m,
            criu.resolve_mode(found, opts.criu_restore, gpu=bool(m.cuda_pids)),
            prefetch=opts.prefetch,
            reloader=opts.reloader,
        )
        if the_plan.early_reads:
            # What CRIU and the tree need first is read while the host is still checked (see
            # HotReader): the hot set is a hint, reading it decides nothing.
            hot = hotset.load(path, {f.path: f.size for f in m.files}, mode=the_plan.mode)
            # The small images CRIU reads first (its page images are in the hot set; the
            # /dev/shm copies are sparse, read exactly later). CRIU's own binary and libraries
            # were tried too: CRIU's step came out shorter, but the validation's own reads
            # queued behind 16 MB and CRIU started later, no faster overall (ad hoc A/B, 6
            # rounds, cold 0.562 s against 0.543 s).
            first: list[str | Path] = [path / f.path for f in m.files if order.is_small_image(f.path)]
            # In mmap mode the CUDA restore would fault the host copy of device memory in from
            # the mapped page images page by page: it is read ahead whole, right after CRIU's.
            gpu_of = m if the_plan.gpu_host_copy_first else None
            # With the page images and weights in the page cache already, so is what the hot
            # set would read: its reader is not started.
            cached = _big_files_cached(resident, m)
            early = HotReader(
                path, hot, first, timeline=tl, on_bytes=on_verify_bytes, gpu_of=None if cached else gpu_of
            )
            if not cached:
                early.start()
        try:
            faults.at(faults.Point.VALIDATE)
            _preflight(path, m, found, queries)
            pairs = _check_devices(m, opts.gpus, queries)
            nice = cpu_share.server_nice()
            bind_ports.helper()  # a fresh container or host: the tree maps it, CRIU needs it in place
        except BaseException:
            if early is not None:
                early.stop()
            raise
    try:
        return _restore_checked(
            opts, tl, path, m, found, the_plan, nice, early, on_verify_bytes, pairs, resident=resident
        )
    finally:
        if early is not None:
            early.stop()  # stopped with the read-ahead that adopted it, or here on a failure


def _check_devices(
    m: manifest.Manifest, gpus: str | None, queries: _GpuQueries | None = None
) -> list[tuple[str, str]]:
    """This host has the devices the snapshot's workers need (runtime.devices), or the restore
    is refused in one line; with --gpus, the (snapshot GPU, target GPU) pairs for the driver."""

    def exact() -> list[devices.Gpu]:  # nvidia-smi's list: what a refusal and --gpus's UUIDs rest on
        return queries.gpus(exact=True) if queries is not None else devices.list_gpus()

    if gpus is None and (snap := devices.Devices.from_dict(m.devices)) is not None:
        if snap.kind is devices.DeviceKind.CPU:
            return []
        if queries is not None and queries.fast is not None and not devices.differences(snap, queries.fast):
            return []
        devices.check(snap, exact())
        return []
    if gpus is None:
        return []
    here = exact()
    snap = devices.Devices.from_dict(m.devices)
    pairs = devices.gpu_pairs(snap, gpus, here)
    if snap is not None:  # the model and driver were matched; the count is the pairs'
        devices.check(devices.Devices(snap.kind, snap.model, snap.driver, 0), here)
    if not cuda_checkpoint.can_remap():
        raise UsageError(
            "--gpus: the installed cuda-python has no GPU pairs for the CUDA restore",
            hint="upgrade cuda-bindings to 13 or later, or restore without --gpus",
        )
    return pairs


def _restore_checked(
    opts: RestoreOptions,
    tl: Timeline,
    path: Path,
    m: manifest.Manifest,
    found: criu.Criu,
    the_plan: RestorePlan,
    nice: int,
    early: HotReader | None,
    on_verify_bytes: Callable[[int], None] | None,
    pairs: list[tuple[str, str]] | None = None,
    *,
    resident: residency.Sampled,
) -> RestoreResult:
    """Everything after the checks: the read-ahead, CRIU, health, weights, canary. Each step
    registers its undo on the operation's stack (runtime.journal.Operation): a tree that fails
    any later step is stopped, whatever stopped it (an error, Ctrl-C, SIGTERM, SIGHUP; if this
    process is killed, the next command, through the journal)."""
    trusted = verified.unchanged(path, m.files) if opts.verify and not opts.reverify else set()
    r = _Restore(
        opts,
        tl,
        path,
        m,
        found,
        the_plan,
        early,
        on_verify_bytes,
        trusted,
        resident,
    )
    r.gpu_pairs = pairs or []
    with journal.Operation("restore", path) as op:
        _read_ahead(op, r)
        # The first restore with a read-ahead and no hot set learns one (see _Faults for which may).
        learn = opts.prefetch and (early is None or early.hot is None) and r.paging.learn
        steps: list[hotset.Capture] | None = [] if learn else None
        server = _criu_restore(op, r)
        with _naming_ranks(r, server):
            signals.check()
            _after_criu(r, nice)
            _wait_healthy(r, server, steps)
            signals.check()
            _load_weights(r, server, steps)
            ttfc = _prove(r, server)
        op.commit()
    _remember(opts, path, m, r.ahead, trusted, server.pid, tl, steps)
    instances.record(
        instances.Instance(
            server.pid,
            m.server.host,
            m.server.port,
            m.server.model,
            m.server.served_model_name,
            list(m.server.vllm_args),
            dict(m.server.env),
            str(path),
            str(server.log_path),
            m.server.worker_extension,
            criu_restore=the_plan.mode,
            control_token=m.server.control_token,
        )
    )
    stats = r.ahead.stats.as_dict() if r.ahead is not None else None
    return RestoreResult(path, server, tl, ttfc, True, m, the_plan.mode, stats, r.gpu_info or None)


@dataclass
class _Restore:
    """One restore: its inputs, and what its steps hand each other."""

    opts: RestoreOptions
    tl: Timeline
    path: Path
    m: manifest.Manifest
    found: criu.Criu
    plan: RestorePlan  # what this restore does (restore/plan.py)
    early: HotReader | None
    on_bytes: Callable[[int], None] | None
    trusted: set[str]  # files this host checked before, unchanged since
    resident: residency.Sampled  # which of its files are in the page cache (sampled once)
    ahead: ReadAhead | None = None
    # Whether the tree faults its page images in itself, each fault reading its own page only
    # (CRIU's --mmap-pages-random), and so whether it may learn its hot set from them.
    paging: _Faults = field(default_factory=_Faults)
    # GPU: per process, the CUDA restore's and unlock's seconds ("cuda"); the loader's own
    # figures from each worker ("load": bytes, seconds, GB/s)
    gpu_info: dict[str, object] = field(default_factory=dict)
    # --gpus: (snapshot GPU UUID, this host's GPU UUID) pairs for the CUDA restore ([]: same GPUs)
    gpu_pairs: list[tuple[str, str]] = field(default_factory=list)
    cpu_move: threading.Thread | None = None  # the tree moved into the servers' cgroup (_after_criu)


def _read_ahead(op: journal.Operation, r: _Restore) -> None:
    """Start reading the snapshot's files ahead, in the order the restore needs them, checking
    them on the way; CRIU may start once the small images are checked. With --no-prefetch,
    check every file first. Undo: stop the read-ahead (`_stop_read_ahead`)."""
    if not r.opts.prefetch:
        if r.opts.verify:
            with r.tl.phase("verify_checksums"):
                unchecked_files = [f for f in r.m.files if f.path not in r.trusted]
                manifest.verify_files(r.path, unchecked_files, on_bytes=r.on_bytes)
        return
    manifest.check_sizes(r.path, r.m.files)  # a missing or truncated file fails before anything starts
    ordered, cold = _plan_read_ahead(r)
    ahead = ReadAhead(
        r.path,
        ordered,
        verify=r.opts.verify,
        threads=r.opts.prefetch_threads or warm.DEFAULT_THREADS,
        timeline=r.tl,
        on_bytes=r.on_bytes,
        trusted=r.trusted,
        hot=r.early,
    )
    if r.m.weights_file and r.resident.is_cold(r.m.weights_file):
        # From disk, reading the weight file beside CRIU's page images slows CRIU (3.3 s
        # instead of 2.4 s on the GPU machine); from the page cache, checking it during
        # CRIU is what saves the loader a checksum pass (0.25 s load instead of 2.8 s).
        ahead.hold(r.m.weights_file)  # released once CRIU has restored
    if r.plan.mode is CriuRestoreMode.MMAP:
        # CRIU maps the page images instead of reading them. From the page cache, hashing
        # them beside it only takes the CPU from its own work (0.67 s instead of 0.13-0.25 s
        # on the 2-core machine): they are checked once it has restored. From disk, they
        # are read at once: the restored tree will fault them in, sequential reads first
        # are faster than its random ones.
        for e in ordered:
            if order.is_page_image(e.path) and not cold[e.path]:
                ahead.hold(e.path)
    with signals.shielded():
        r.ahead = ahead.start()
        op.push(lambda _type, exc, _tb: _stop_read_ahead(ahead, exc))
    if r.opts.verify and (unchecked := order.before_pages(ordered) - r.trusted):
        # No process runs from an image whose small files (credentials, descriptors,
        # registers) are unchecked; only the page images are checked while CRIU runs.
        with r.tl.phase("check_metadata"):
            ahead.wait_for(unchecked)


def _big_files(m: manifest.Manifest) -> set[str]:
    """The snapshot's page images and weight files: what a restore spends its reads on."""
    return {f.path for f in m.files if order.is_page_image(f.path)} | set(m.all_weight_files())


def _big_files_cached(resident: residency.Sampled, m: manifest.Manifest) -> bool:
    """Whether every page image and weight file of the snapshot is in the page cache."""
    big = _big_files(m)
    return bool(big) and all(resident.is_cached(rel) for rel in big)


def _plan_read_ahead(r: _Restore) -> tuple[list[manifest.FileEntry], dict[str, bool]]:
    """What the read-ahead reads, in order, and which page images are cold; sets `r.paging`.
    A page image or weight file that is trusted (checked before on this host, unchanged) and
    already in the page cache is not read: reading cached pages again (the weight file mapped
    and populated whole) only competes with CRIU and the CUDA restore, a fifth of a warm GPU
    restore (docs/benchmarks/gpu-restore.md, "Where the CUDA restore's time goes")."""
    big = _big_files(r.m)
    ordered = [
        e
        for e in order.restore_order(r.path, r.m)
        if not (e.path in big and e.path in r.trusted and r.resident.is_cached(e.path))
    ]
    if r.plan.mode is not CriuRestoreMode.MMAP:
        return ordered, {}
    hot = r.early.hot if r.early is not None else None
    random_ok = criu.supports_mmap_random(r.found)
    cold = {e.path: r.resident.is_cold(e.path) for e in ordered if order.is_page_image(e.path)}
    # A page image with nothing to check is only read where the tree will touch it:
    # its hot ranges (0.23 of 1.4 GB for the tiny model), or nothing once cached. With
    # random faults, not even on the restore that learns the hot set: the tree's own
    # faults then read exactly its pages (1.27 s to first completion here, against 1.53 s
    # reading the images whole), and what it learns is not inflated by the kernel's
    # fault-around mapping neighbours a whole-file read had cached (225 MB against 334 MB).
    ordered = [
        e
        for e in ordered
        if not (
            order.is_page_image(e.path)
            and e.path in r.trusted
            and (hot is not None or random_ok or not cold[e.path])
        )
    ]
    whole = any(order.is_page_image(e.path) for e in ordered)  # read to be hashed
    r.paging = _Faults(random_ok and not whole, not random_ok or (any(cold.values()) and not whole))
    return ordered, cold


def _stop_read_ahead(ahead: ReadAhead, exc: BaseException | None) -> bool:
    """The read-ahead's undo, run last: a damaged file is the error to report."""
    ahead.release()
    if isinstance(exc, FastVLLMError) and not isinstance(exc, IntegrityError):
        # CRIU or the server failed: if a file is damaged, that is the cause to report,
        # so let the read-ahead finish its checks (the rest is in the page cache by now).
        try:
            ahead.wait()
        except IntegrityError as damaged:
            raise damaged from exc
    ahead.stop()
    return False


def _criu_restore(op: journal.Operation, r: _Restore) -> vllm_server.Server:
    """Put the snapshot's /dev/shm files back and CRIU-restore the tree. Undo: stop the tree by
    the snapshot's PIDs and the session they lead (CRIU restores it), so a tree whose root PID
    CRIU never reported (interrupted, failed) is stopped too; then remove those files."""
    m, path = r.m, r.path
    # Unique per restore, not just per PID: containers sharing a volume restore the same
    # snapshot as PID 1 each, and their logs must not be each other's.
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    logs = path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)  # private, as the rest of the snapshot
    server_log = logs / f"server-restored-{stamp}-{os.getpid()}.log"
    saved = path / "shm"
    with signals.shielded():
        put = [str(shm.SHM / f.name) for f in sorted(saved.iterdir())] if saved.is_dir() else []
        op.undo("remove_files", paths=put)  # no tree owns the queues put back for it
        # A failed CRIU restore can leave processes of the tree behind as zombies, holding PIDs.
        op.undo_local(proctree.wait_gone, m.server.tree_pids, 30.0, reaped=True)
        op.undo("stop_tree", pids=m.server.tree_pids, started=op.started)
    faults.at(faults.Point.CRIU_RESTORE, min(m.server.tree_pids, default=None))  # (fires in CRIU)
    # the put-back copies are CRIU's to open and unlink: no other dump or restore of this host
    # may take or unlink them in between (runtime/restore_lock.criu_exclusive)
    with r.tl.phase("criu_restore"), restore_lock.criu_exclusive():
        shm.put_back(saved)
        fd = os.open(server_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            pid = criu.restore(
                r.found,
                path / "criu",
                logs / f"criu-restore-{stamp}-{os.getpid()}.log",
                inherit={m.server.log_path_at_dump.lstrip("/"): fd},
                mode=r.plan.mode,
                random_faults=r.paging.random,
                own_cgroups=False,  # the tree joins the servers' cgroup right after (_after_criu)
            )
        finally:
            os.close(fd)
    # Its gate is closed (the image was taken closed): clients get 503 until the canary passed.
    return vllm_server.Server(pid, m.server.host, m.server.port, server_log, token=m.server.control_token)


def _after_criu(r: _Restore, nice: int) -> None:
    """Between CRIU and the server: the host copy of GPU memory in the page cache, the rest of
    the read-ahead released, the tree's CPU share (and affinity), the CUDA restore."""
    if r.early is not None and r.early.gpu_of is not None:
        # The CUDA restore reads the host copy of device memory whole: it is in the page cache
        # first, before the weight file's read-ahead (released below) takes the disk.
        with r.tl.phase("gpu_copy_wait"):
            r.early.wait_gpu()
    if r.ahead is not None:
        r.ahead.release()
    if r.opts.keep_affinity:  # CRIU restores TIDs, not the cores vLLM bound them to
        affinity.apply(r.m.affinity)
    # CRIU gave the tree its dumped PIDs, in this process's cgroups (own_cgroups=False); the
    # move into the servers' group (migrating every thread of the tree, ~9 ms on 2 cores) runs
    # beside the steps up to the health check, which waits for it (_wait_healthy)
    r.cpu_move = threading.Thread(
        target=cpu_share.yield_to_host, args=(r.m.server.tree_pids, nice), name="cpu-share", daemon=True
    )
    r.cpu_move.start()
    if r.m.cuda_pids:  # CRIU gave the processes back checkpointed and locked
        with r.tl.phase("cuda_restore"), _prefaulting(r) as mapping:
            r.gpu_info["cuda"] = cuda_checkpoint.resume(r.m.cuda_pids, pairs=r.gpu_pairs)
        if mapping is not None:
            r.gpu_info["prefault"] = mapping.as_dict()


def _prefaulting(r: _Restore) -> contextlib.AbstractContextManager[prefault.Populating | None]:
    """In mmap mode the host copy of device memory is a private mapping of the page images,
    which the driver's CUDA restore would fault in page by page: threads map it in from
    outside while the driver restores (runtime/prefault.py), until it is done."""
    threads = config.GPU_PREFAULT_THREADS.get()
    targets = cuda_checkpoint.recorded_host_copy(r.m.gpu_state, r.m.cuda_pids)
    if not (r.plan.prefault_host_copy and threads and any(targets.values())):
        return contextlib.nullcontext()
    return prefault.Populating(targets, threads)


def _wait_healthy(r: _Restore, server: vllm_server.Server, steps: list[hotset.Capture] | None) -> None:
    root = server.pid
    faults.at(faults.Point.HEALTH, root)
    with r.tl.phase("health"):
        vllm_server.wait_healthy(server, r.opts.health_timeout, alive=lambda: proctree.alive(root))
    if r.cpu_move is not None:
        r.cpu_move.join()  # the tree's CPU share settled before it works (a few ms, not a hang)
    if steps is not None:  # which pages each step needed: later restores read them in order
        with r.tl.phase("hot_set_capture"):
            steps.append(hotset.capture(proctree.session_pids(root)))


def _load_weights(r: _Restore, server: vllm_server.Server, steps: list[hotset.Capture] | None) -> None:
    """Give the server back what its snapshot released, as its plan says (restore/plan.py):
    the weights (fastvllm's loader, or vLLM's own reload with --reloader vllm) and, on a GPU,
    the KV cache."""
    m, ahead, how = r.m, r.ahead, r.plan.weights
    faults.at(faults.Point.WEIGHT_LOAD, server.pid)
    if how is WeightsBack.WAKE_UP:
        with r.tl.phase("wake_up"):
            vllm_server.wake_up(server)
    if how in (WeightsBack.VLLM_RELOAD, WeightsBack.LOADER) and r.plan.wake_weights_first:
        with r.tl.phase("wake_weights"):
            vllm_server.wake_up(server, "weights")
    if how is WeightsBack.VLLM_RELOAD:
        with r.tl.phase("load_weights"):
            if ahead is not None:  # vLLM reads the model's own files instead
                for f in m.all_weight_files():
                    ahead.claim(f)
            worker_rpc.vllm_reload_weights(server)
    elif how is WeightsBack.LOADER:
        with r.tl.phase("load_weights"):
            weights_path = r.path / str(m.weights_file)
            args = worker_rpc.ReloadArgs(
                str(weights_path),
                verify=_loader_verifies(r),
                threads=config.LOADER_THREADS.get() or (RELOAD_THREADS if m.cuda_pids else 0),
                copy_wait=config.LOADER_COPY_WAIT.get().value,
                reader_nice=config.LOADER_READER_NICE.get(),
                reads=config.LOADER_READS.get().value,
                held=_held_socket(weights_path) if m.cuda_pids else "",
            )
            r.gpu_info["load"] = [x.as_dict() for x in worker_rpc.reload(server, args)]
    if how in (WeightsBack.VLLM_RELOAD, WeightsBack.LOADER) and r.plan.wake_kv_cache:
        with r.tl.phase("wake_kv_cache"):
            vllm_server.wake_up(server, "kv_cache")
    if steps is not None and how is not WeightsBack.IN_IMAGE:
        with r.tl.phase("hot_set_capture"):
            steps.append(hotset.capture(proctree.session_pids(server.pid)))


def _held_socket(weights: Path) -> str:
    """Where the restored worker asks for its weights held in pinned memory: this process's
    socket if it is the agent holding them (`fastvllm agent --hold`), else "". Imported here:
    a CPU restore needs none of it."""
    from fastvllm.weights import held

    return held.socket_for(weights)


@contextlib.contextmanager
def _naming_ranks(r: _Restore, server: vllm_server.Server) -> Iterator[None]:
    """A parallel server's restore that fails after CRIU says which worker rank failed, before
    its undo stops the tree (runtime.ranks): the rank that died first, the rank whose PID the
    error names, or, for a canary that differs, the ranks whose weights differ from their files."""
    watch = ranks.Watch(r.m.worker_pids)
    try:
        with watch:
            yield
    except FastVLLMError as e:
        said = ranks.blame(e.message, r.m.worker_pids, first=watch.first)
        if not said and isinstance(e, CanaryMismatchError):
            said = _weights_differ(r, server)
        if said:
            e.message = f"{e.message}; {said}"
        raise


def _weights_differ(r: _Restore, server: vllm_server.Server) -> str:
    """The ranks whose live weights no longer match their weight files ('' if none, or if the
    workers cannot say): the diagnosis of a canary that differs."""
    if not r.m.weights_file or len(r.m.worker_pids) < 2:
        return ""
    try:
        got = worker_rpc.check_weights(server, r.path / r.m.weights_file)
    except FastVLLMError:
        return ""
    bad = [(x.rank, x.pid) for x in got if x.count]
    return ranks.describe("holds weights that differ from its weight file", bad)


def _loader_verifies(r: _Restore) -> bool:
    """The read-ahead stops at the weight files (every rank's) once the loader starts on them;
    where it had not checked one whole yet, the loaders check their per-tensor checksums."""
    files = r.m.all_weight_files()
    whole = {f for f in files if r.ahead is not None and r.ahead.claim(f)}  # claims every file
    if r.ahead is None:
        return False
    return r.opts.verify and any(f not in whole and f not in r.trusted for f in files)


def _prove(r: _Restore, server: vllm_server.Server) -> float:
    """The canary, then the gate opened to clients; returns the time to first completion."""
    m = r.m
    faults.at(faults.Point.CANARY, server.pid)
    # The canary runs while the read-ahead finishes the page images' checksums instead of
    # after them: the processes already run from them (only the small images had to be
    # checked before CRIU). The restore counts as serving only once both are in, so the time
    # to the first completion includes the wait; a damaged file is reported before the
    # canary's verdict (a canary run on damaged memory would only blame the server).
    with r.tl.phase("first_completion"):
        got = _canary(server, m, r.ahead)
    if r.ahead is not None:
        with r.tl.phase("readahead_wait"):
            r.ahead.wait()
    if got.token_ids != m.canary.token_ids:
        raise CanaryMismatchError(
            f"the restored server's canary differs: {len(m.canary.token_ids)} tokens recorded, first "
            f"difference at token {_first_difference(got.token_ids, m.canary.token_ids)}; it was stopped",
            hint="the snapshot does not reproduce its server; take a new one",
            detail=f"recorded: {m.canary.text!r}\nrestored: {got.text!r}",
        )
    # Clients are answered from here on, not before: the canary passed and every file checked.
    with r.tl.phase("open_gate"):
        vllm_server.set_gate(server, open=True)
    return r.tl.elapsed()


def _remember(
    opts: RestoreOptions,
    path: Path,
    m: manifest.Manifest,
    ahead: ReadAhead | None,
    trusted: set[str],
    pid: int,
    tl: Timeline,
    steps: list[hotset.Capture] | None,
) -> None:
    """Keep what this restore learned for the next one on this host: which files it checked
    (not hashed again while unchanged) and, when this restore learns one (`steps` is not None),
    the tree's hot set, staged by the `steps` captured as it went. Both after the time to first
    completion was taken, and both only hints: a failure here changes nothing."""
    if opts.verify:
        checked = set(ahead.stats.verified) if ahead is not None else {f.path for f in m.files}
        if checked - trusted:
            verified.record(path, [f for f in m.files if f.path in checked])
    if steps is not None:
        with tl.phase("learn_hot_set"):
            hotset.save(path, hotset.learn(proctree.session_pids(pid), path, steps))


def _canary(
    server: vllm_server.Server, m: manifest.Manifest, ahead: ReadAhead | None
) -> vllm_server.Completion:
    """The canary completion. While it runs, a damaged file found by the read-ahead ends the
    wait at once (a server running from damaged memory may never answer)."""
    if ahead is None:
        return vllm_server.complete(server, m.server.served_model_name, m.canary.prompt, m.canary.max_tokens)
    pool = ThreadPoolExecutor(1, thread_name_prefix="canary")
    try:
        fut = pool.submit(
            vllm_server.complete, server, m.server.served_model_name, m.canary.prompt, m.canary.max_tokens
        )
        while True:
            try:
                return fut.result(timeout=0.02)
            except FutureTimeout:
                if ahead.error is not None:
                    raise ahead.error from None
    finally:
        pool.shutdown(wait=False)  # the caller stops the tree, which ends a pending request


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
