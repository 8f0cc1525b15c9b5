"""Reads a snapshot's files in the background while the restore runs, in the order the restore
needs them (`restore.order`): CRIU and the weight loader then find their bytes in the page
cache instead of waiting on the disk, and the time to read the files hides behind CRIU's
own work.

With verification on, the read-ahead is also the checksum check: each file is hashed as it is
read, so the restore no longer reads everything once up front before CRIU may start. The
restore waits for the result before it calls the server serving (its canary runs meanwhile),
and a mismatch stops the restored tree.
When the weight loader starts on the weight file, it claims it: the read-ahead stops reading
that file (two readers of one file only slow each other down), and the loader checks the
file's own per-tensor checksums instead.

Files this host already checked and that have not changed since (`runtime.verified`) are read
but not hashed. Beside the files, a second reader (`HotReader`, started earlier) brings in the
hot set (`restore.hotset`): the ranges of page images and libraries the tree needed last time,
so its first faults find them in the page cache.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from fastvllm.prefetch import warm
from fastvllm.restore import hotset
from fastvllm.runtime import criu_images, cuda_checkpoint, manifest
from fastvllm.runtime.errors import FastVLLMError, IntegrityError
from fastvllm.runtime.timeline import Timeline


@dataclass
class ReadAheadStats:
    bytes: int = 0
    seconds: float = 0.0
    verified: list[str] = field(default_factory=list)  # files whose checksum matched
    hot_bytes: int = 0  # of the hot set, read by its own reader
    hot_seconds: float = 0.0
    hot_planned_bytes: int = 0  # the hot set learned by an earlier restore (0: none yet)
    gpu_bytes: int = 0  # of the CUDA checkpoint's host copy in the page images, read ahead whole
    gpu_seconds: float = 0.0  # from the hot reader's start until that copy was in
    trusted: int = 0  # files checked before on this host and unchanged: read, not hashed

    def as_dict(self) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "hashed_files": len(self.verified),
            "trusted_files": self.trusted,
            "hot_planned_bytes": self.hot_planned_bytes,
            "hot_bytes": self.hot_bytes,
            "hot_seconds": round(self.hot_seconds, 4),
            "gpu_bytes": self.gpu_bytes,
            "gpu_seconds": round(self.gpu_seconds, 4),
        }

    stopped: list[str] = field(default_factory=list)  # files left to a claimant part-way

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class HotReader:
    """Reads what a restore needs first, on a thread of its own: the snapshot's small images
    (`first`, queued whole, not waited for), then the hot set (`restore.hotset`): what CRIU
    reads as it restores, then the CUDA checkpoint's host copy of device memory (`gpu_of`, a
    GPU snapshot restored in mmap mode: `gpu_host_copy`), then what the running tree faults in.

    Why its own reader, started as soon as the manifest is read: the rest of a restore's
    checks (the host's identity, its ports and PIDs, which files are cold) and setting up the
    read-ahead took 0.04 s of a cold 0.34 s restore here, with the disk idle; CRIU then started
    and waited on the hot set's first stages. A restore that fails its checks stops the reader
    (`stop`)."""

    def __init__(
        self,
        root: Path,
        hot: hotset.HotSet | None,
        first: list[str | Path],
        *,
        timeline: Timeline | None = None,
        on_bytes: Callable[[int], None] | None = None,
        gpu_of: manifest.Manifest | None = None,
    ) -> None:
        self.root = root
        self.hot = hot
        self.first = first
        self.gpu_of = gpu_of
        self.gpu_bytes = 0
        self.gpu_seconds = 0.0
        self._gpu_done = threading.Event()
        if gpu_of is None:
            self._gpu_done.set()
        self.timeline = timeline
        self.on_bytes = on_bytes
        self.bytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HotReader:
        self._thread = threading.Thread(target=self._run, name="readahead-hot", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The hot set is a hint: once the tree has served (or the restore failed), what is
        left is not needed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def wait_gpu(self, timeout: float | None = None) -> bool:
        """Block until the CUDA checkpoint's host copy is in the page cache (or the reader
        stopped); False on timeout. The CUDA restore reads that copy whole right after CRIU:
        from a cold cache, faulting it in page by page (the page images are mapped with
        MADV_RANDOM) made a host's first 3B restore three times slower
        (docs/decisions/mmap-restore.md)."""
        return self._gpu_done.wait(timeout)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            with _phase(self.timeline, "readahead_hot"):
                self._read(t0)
        finally:
            self._gpu_done.set()
            self.seconds = time.perf_counter() - t0

    def _read(self, t0: float) -> None:
        hotset.advise(self.first)
        files = self.hot.files if self.hot is not None else []
        # What CRIU reads while it restores first (the library pages it writes private copies
        # of, then the page-image runs it copies), then the host copy of device memory the CUDA
        # restore reads next, then what the tree faults in.
        early = [f for f in files if f.stage <= hotset.STAGE_CRIU]
        late = [f for f in files if f.stage > hotset.STAGE_CRIU]
        self.bytes += self._hot(early)
        if self.gpu_of is not None and not self._stop.is_set():
            with _phase(self.timeline, "readahead_gpu"):
                self.gpu_bytes = self._hot(gpu_host_copy(self.root, self.gpu_of))
                self.bytes += self.gpu_bytes
            self.gpu_seconds = time.perf_counter() - t0
        self._gpu_done.set()
        self.bytes += self._hot(late)

    def _hot(self, files: list[hotset.HotFile]) -> int:
        if not files:
            return 0
        return hotset.read(
            self.root,
            hotset.HotSet(files),
            order=lambda f: (f.stage, f.path),
            stop=self._stop.is_set,
            on_bytes=self.on_bytes,
        )


def gpu_host_copy(root: Path, m: manifest.Manifest) -> list[hotset.HotFile]:
    """The ranges of the snapshot's page images that hold the CUDA checkpoint's host copy of
    each checkpointed process's device memory, from the address ranges the snapshot recorded
    (`runtime.cuda_checkpoint.suspend`) and the processes' pagemaps. A snapshot that recorded
    none (taken before they were) has its checkpointed processes' page images read whole."""
    recorded = cuda_checkpoint.recorded_host_copy(m.gpu_state, m.cuda_pids)
    pagemaps = criu_images.load_pagemaps(root / "criu")
    out = []
    for pid in m.cuda_pids:
        pm = pagemaps.get(pid)
        if pm is None:
            continue
        rel = f"criu/{pm.pages_file}"
        try:
            size = (root / rel).stat().st_size
        except OSError:
            continue
        got = recorded.get(pid)
        ranges = criu_images.file_ranges(pm, got) if got is not None else [(0, size)]
        if ranges:
            out.append(hotset.HotFile(rel, size, 0, ranges, hotset.STAGE_CRIU))
    return out


def _phase(timeline: Timeline | None, name: str) -> AbstractContextManager[object]:
    """The timeline's phase `name`, or nothing where there is no timeline."""
    return timeline.phase(name) if timeline is not None else contextlib.nullcontext()


class ReadAhead:
    """One background reader over `entries` (relative to `root`), earliest-needed first.

    `threads` readers take whole files from the head of the list (a file is read start to end
    by one reader, which its checksum needs; the measured default is one, see
    `prefetch.warm.DEFAULT_THREADS`)."""

    def __init__(
        self,
        root: Path,
        entries: list[manifest.FileEntry],
        *,
        verify: bool,
        threads: int = warm.DEFAULT_THREADS,
        timeline: Timeline | None = None,
        on_bytes: Callable[[int], None] | None = None,
        trusted: set[str] | frozenset[str] = frozenset(),
        hot: HotReader | None = None,
    ) -> None:
        self.root = root
        self.entries = entries
        self.verify = verify
        self.trusted = trusted  # checked before on this host, unchanged since: read, not hashed
        self.hot = hot  # started before this read-ahead; stopped with it
        self._hot_ended = False
        self.threads = max(1, threads)
        self.timeline = timeline
        self.on_bytes = on_bytes
        planned = hot.hot.bytes if hot is not None and hot.hot is not None else 0
        self.stats = ReadAheadStats(trusted=len(trusted), hot_planned_bytes=planned)
        self._claimed: set[str] = set()
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a file finished, or the readers stopped
        self._finished = False
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._next = 0
        self._thread: threading.Thread | None = None
        self._held: set[str] = set()
        self._go_on = threading.Event()
        self._go_on.set()

    def hold(self, rel: str) -> ReadAhead:
        """Do not start on file `rel` before `release()`: from a cold disk, reading the weight file
        while CRIU still reads its page images only slows CRIU down (measured on the GPU machine:
        CRIU 3.3 s instead of 2.4 s), and the loader reads that file itself soon after. (From
        the page cache, holding it costs more: see restore.pipeline.)"""
        self._held.add(rel)
        self._go_on.clear()
        return self

    def release(self) -> None:
        self._go_on.set()

    def start(self) -> ReadAhead:
        # A held file does not block the files behind it: they are read first. (In mmap mode
        # the page images are held while CRIU maps them; the weight file behind them must still
        # be checked during CRIU, or the loader pays a checksum pass of its own: 3.3 s instead
        # of 0.27 s for a 3B model on the GPU machine.)
        self.entries = [e for e in self.entries if e.path not in self._held] + [
            e for e in self.entries if e.path in self._held
        ]
        self._thread = threading.Thread(target=self._run, name="readahead", daemon=True)
        self._thread.start()
        return self

    def _end_hot(self) -> None:
        """Stop the hot set's reader and count what it read (once)."""
        if self.hot is None or self._hot_ended:
            return
        self.hot.stop()
        self._hot_ended = True
        with self._lock:
            self.stats.hot_bytes = self.hot.bytes
            self.stats.hot_seconds = self.hot.seconds
            self.stats.gpu_bytes = self.hot.gpu_bytes
            self.stats.gpu_seconds = self.hot.gpu_seconds
            self.stats.bytes += self.hot.bytes

    def claim(self, rel: str) -> bool:
        """A reader of its own takes over file `rel`: stop reading it. Returns True when the
        read-ahead had already read it whole (and, when verifying, found its checksum right)."""
        with self._lock:
            self._claimed.add(rel)
            return rel in self._done

    def wait_for(self, rels: set[str]) -> None:
        """Block until every file in `rels` was read whole (and checked, when verifying), or the
        read-ahead stopped; raise what went wrong. The restore lets CRIU start only once the
        small images that say what the processes are (credentials, files, registers) passed."""
        with self._changed:
            while not rels <= self._done and self._error is None and not self._finished:
                self._changed.wait()
        if self._error is not None:
            raise self._error

    def wait(self) -> ReadAheadStats:
        """Block until every file was read (or handed to a claimant); raise what went wrong."""
        if self._thread is not None:
            self._thread.join()
        self._end_hot()
        if self._error is not None:
            raise self._error
        return self.stats

    @property
    def error(self) -> BaseException | None:
        """What stopped the read-ahead (a checksum mismatch, an unreadable file), if anything."""
        return self._error

    def stop(self) -> None:
        """Abandon the rest (the restore failed) and wait for the readers to notice."""
        self._stop.set()
        self._go_on.set()
        if self._thread is not None:
            self._thread.join()
        self._end_hot()

    def _count(self, n: int) -> None:
        with self._lock:
            self.stats.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def _take(self) -> manifest.FileEntry | None:
        with self._lock:
            while self._next < len(self.entries) and not self._stop.is_set():
                e = self.entries[self._next]
                if e.path in self._held and not self._go_on.is_set():
                    break
                self._next += 1
                if e.path not in self._claimed:
                    return e
            else:
                return None
        while not self._go_on.wait(0.05):  # a held file is next: wait for release (or stop)
            if self._stop.is_set():
                return None
        return self._take()

    def _one(self, e: manifest.FileEntry) -> None:
        def left() -> bool:
            return self._stop.is_set() or e.path in self._claimed

        path = self.root / e.path
        if self.verify and e.path not in self.trusted:
            # Hashed through a mapping: no copy into a buffer, half the CPU of read() (the
            # restored server and CRIU need the same two cores here).
            digest = manifest.hash_file_mapped(path, self._count, stop=left)
            if digest is None:
                with self._lock:
                    self.stats.stopped.append(e.path)
                return
            manifest.check_digest(e, digest)
            with self._changed:
                self.stats.verified.append(e.path)
                self._done.add(e.path)
                self._changed.notify_all()
            return
        st = warm.warm([path], should_stop=lambda _p: left(), stop=self._stop, on_bytes=self._count)
        with self._changed:
            if st.stopped or st.skipped_bytes:
                self.stats.stopped.append(e.path)
            else:
                self._done.add(e.path)
                self._changed.notify_all()

    def _worker(self) -> None:
        try:
            while self._error is None and (e := self._take()) is not None:
                self._one(e)
        except (FastVLLMError, OSError) as exc:
            self._error = (
                exc
                if isinstance(exc, FastVLLMError)
                else IntegrityError(
                    f"cannot read a snapshot file: {exc}", hint="the snapshot is damaged; take a new one"
                )
            )
            self._stop.set()
            with self._changed:
                self._changed.notify_all()

    def _run(self) -> None:
        t0 = time.perf_counter()
        with _phase(self.timeline, "readahead"):
            try:
                workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.threads)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            finally:
                self.stats.seconds = time.perf_counter() - t0
                with self._changed:
                    self._finished = True
                    self._changed.notify_all()
