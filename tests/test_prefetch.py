"""`fastvllm.prefetch` and `fastvllm prefetch`: page counts equal vmtouch's, warm/evict/lock do
what they say, and every bad input is one line naming the path or the budget.

Files live under /var/tmp, on disk: on tmpfs the page cache IS the file, so eviction and
residency mean nothing there (and /tmp may be tmpfs). Each test evicts only its own files."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastvllm.prefetch import files, residency, warm
from fastvllm.runtime import manifest, sparse, units
from fastvllm.runtime.errors import UsageError
from typer.testing import CliRunner

from fastvllm import cli

from .conftest import FASTVLLM, run_cli

PAGE = os.sysconf("SC_PAGESIZE")
NOBODY = 65534


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A fresh directory on a disk filesystem, traversable by any user (for the unprivileged test)."""
    d = Path(tempfile.mkdtemp(prefix="fastvllm-prefetch-test-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            if p.is_file() and not p.is_symlink():
                warm.evict([p])  # leave no cached pages behind either
        shutil.rmtree(d, ignore_errors=True)


def _write(path: Path, size: int) -> Path:
    """Random bytes, flushed, then evicted: a cold file."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def _vmtouch(path: Path) -> tuple[int, int]:
    if shutil.which("vmtouch") is None:
        pytest.skip("vmtouch is not installed; `bash scripts/setup.sh` installs it (apt-get install vmtouch)")
    out = subprocess.run(["vmtouch", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Resident Pages: (\d+)/(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def _read_first_half(path: Path) -> None:
    """Read exactly the first half of the pages: POSIX_FADV_RANDOM turns readahead off for this
    descriptor, so the kernel reads no page beyond those asked for."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        half = path.stat().st_size // PAGE // 2 * PAGE
        done = 0
        while done < half:
            done += len(os.pread(fd, min(1 << 20, half - done), done))
    finally:
        os.close(fd)


# ---- residency ---------------------------------------------------------------------------


def test_residency_equals_vmtouch(disk_dir: Path) -> None:
    f = _write(disk_dir / "w", 3 * (1 << 20) + 123)  # a partial last page counts as a page
    (disk_dir / "empty").touch()
    total = (f.stat().st_size + PAGE - 1) // PAGE

    def both() -> tuple[tuple[int, int], tuple[int, int]]:
        [r] = residency.of_files([f])
        return (r.resident_pages, r.pages), _vmtouch(f)

    ours, theirs = both()  # evicted
    assert ours == theirs == (0, total)
    _read_first_half(f)
    ours, theirs = both()
    assert ours == theirs and 0 < ours[0] < total, ours
    warm.warm([f])
    ours, theirs = both()
    assert ours == theirs == (total, total)
    [e] = residency.of_files([disk_dir / "empty"])
    assert (e.resident_pages, e.pages, e.fraction) == (0, 0, 1.0)
    assert _vmtouch(disk_dir / "empty")[1] == 0
    assert residency.resident_pages(f) == (total, total)  # the loader's entry point agrees


def test_status_json_totals(disk_dir: Path) -> None:
    _write(disk_dir / "a", 1 << 20)
    (disk_dir / "sub").mkdir()
    _write(disk_dir / "sub" / "b", 5000)
    warm.warm([disk_dir / "a"])
    # held in RAM while the two commands start (seconds each): a busy host's reclaim could
    # otherwise take some of a's pages before they are counted
    with warm.lock([disk_dir / "a"]):
        r = run_cli("prefetch", "status", str(disk_dir), "--json", timeout=60)
        r2 = run_cli("prefetch", "status", str(disk_dir), timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [Path(x["path"]).name for x in doc["files"]] == ["a", "b"]
    assert doc["total"] | {"fraction": 0} == {
        "files": 2,
        "bytes": (1 << 20) + 5000,
        "resident_pages": 256,
        "pages": 258,
        "fraction": 0,
    }
    assert r2.returncode == 0 and "total" in r2.stdout and "256/258" in r2.stdout


# ---- paths -------------------------------------------------------------------------------


def test_expand_sorts_dedupes_and_skips_non_files(disk_dir: Path) -> None:
    for name in ("b", "a", "d/z", "d/c"):
        (disk_dir / name).parent.mkdir(exist_ok=True)
        (disk_dir / name).write_bytes(b"x")
    os.mkfifo(disk_dir / "fifo")
    (disk_dir / "link").symlink_to(disk_dir / "a")  # inside a directory: not followed
    got = files.expand([disk_dir, disk_dir / "a", disk_dir / "link"])
    assert [p.relative_to(disk_dir).as_posix() for p in got] == ["a", "b", "d/c", "d/z"]
    with pytest.raises(UsageError, match="does not exist"):
        files.expand([disk_dir / "nope"])


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("4G", 4 << 30),
        ("512M", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("100", 100),
        ("2k", 2048),
        ("1 TB", 1 << 40),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert units.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "G", "4Q", "-1G", "0", "four"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        units.parse_size(text)


# ---- warm, evict, stop ---------------------------------------------------------------------


@pytest.mark.parametrize("method", warm.METHODS)
def test_warm_then_evict(disk_dir: Path, method: str) -> None:
    f = _write(disk_dir / "w", 6 * (1 << 20) + 5)
    [r] = residency.of_files([f])
    assert r.resident_pages == 0
    seen: list[int] = []
    st = warm.warm([f], method=method, threads=3, chunk=1 << 20, on_bytes=seen.append)
    assert st.bytes == sum(seen) == f.stat().st_size and st.skipped_bytes == 0
    [r] = residency.of_files([f])
    assert r.resident_pages == r.pages
    assert warm.evict([f]) == r.pages * PAGE
    # Clean, unmapped pages of an ext4/xfs file all go; allow a sliver for filesystems that keep some.
    [r] = residency.of_files([f])
    assert r.resident_pages <= r.pages // 100


def test_warm_takes_files_in_order(disk_dir: Path) -> None:
    fs = [_write(disk_dir / f"f{i}", 2 << 20) for i in range(4)]
    asked: list[Path] = []
    warm.warm(fs, threads=1, chunk=1 << 20, should_stop=lambda p: asked.append(p) or False)
    assert asked == [p for p in fs for _ in range(2)]  # chunk by chunk, earlier files first


def test_should_stop_skips_the_file(disk_dir: Path) -> None:
    big = _write(disk_dir / "big", 8 << 20)
    small = _write(disk_dir / "small", 1 << 20)
    st = warm.warm([big, small], threads=2, chunk=1 << 20, should_stop=lambda p: p == big)
    assert st.stopped == [big] and st.bytes == 1 << 20 and st.skipped_bytes == 8 << 20
    got = {r.path.name: r.resident_pages for r in residency.of_files([big, small])}
    assert got["small"] == 256 and got["big"] <= 8  # nothing read, at most a stray readahead
    stop = threading.Event()
    stop.set()
    assert warm.warm([big], stop=stop).bytes == 0


def _sparse_file(disk_dir: Path) -> Path:
    """64 MiB: 1 MiB data, 32 MiB hole, 1 MiB data, a 30 MiB hole at the end; evicted."""
    f = disk_dir / "sparse"
    mib = 1 << 20
    with open(f, "wb") as out:
        out.write(os.urandom(mib))
        out.seek(33 * mib)
        out.write(os.urandom(mib))
        out.truncate(64 * mib)
        out.flush()
        os.fsync(out.fileno())  # dirty pages are not evicted
    size, _, extents = sparse.file_extents(f)
    if len(extents) == 1:
        pytest.skip(f"{disk_dir} does not report holes (SEEK_DATA)")
    assert size == 64 * mib and extents == [(0, mib), (33 * mib, mib)]
    warm.evict([f])
    [r] = residency.of_files([f])
    if r.resident_pages:
        pytest.skip(f"{disk_dir} keeps evicted pages cached (tmpfs?): residency cannot tell")
    return f


@pytest.mark.parametrize("method", warm.METHODS)
def test_warm_reads_data_and_leaves_holes(disk_dir: Path, method: str) -> None:
    f = _sparse_file(disk_dir)
    mib = 1 << 20
    st = warm.warm([f], chunk=mib, method=method)
    assert st.bytes == 2 * mib and st.hole_bytes == 62 * mib and st.skipped_bytes == 0
    [r] = residency.of_files([f])
    # The data's 512 pages and not one more: the kernel's read-around of each run (up to
    # read_ahead_kb) used to zero-fill the hole behind it, 8 MiB per run here.
    assert r.resident_pages == 512, r.resident_pages


def test_hashing_a_sparse_file_reads_only_its_data(disk_dir: Path) -> None:
    f = _sparse_file(disk_dir)
    assert manifest.hash_file_mapped(f) == manifest.hash_file(f)  # holes hash as zeroes
    warm.evict([f])
    manifest.hash_file_mapped(f)
    [r] = residency.of_files([f])
    assert r.resident_pages == 512, r.resident_pages


def test_populate_falls_back_to_read_on_old_kernels(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def einval(addr: int, nbytes: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "madvise(22) failed")  # what a kernel before 5.14 answers

    monkeypatch.setattr(warm, "advise", einval)
    f = _write(disk_dir / "w", 3 << 20)
    st = warm.warm([f], method="populate", threads=2, chunk=1 << 20)
    assert st.method == "read" and st.bytes == 3 << 20
    assert residency.resident_fraction(f) == 1.0


def test_bad_method_and_chunk() -> None:
    with pytest.raises(UsageError, match="unknown warm method"):
        warm.warm([], method="mmap")
    with pytest.raises(UsageError, match="multiple of the page size"):
        warm.warm([], chunk=1000)


# ---- lock ----------------------------------------------------------------------------------


def test_lock_over_budget_locks_nothing(disk_dir: Path) -> None:
    f = _write(disk_dir / "w", 2 << 20)
    with pytest.raises(UsageError, match=r"needs 2\.0 MiB, over the budget of 1\.0 MiB"):
        warm.lock([f], budget=1 << 20)
    assert residency.of_files([f])[0].resident_pages == 0  # not even read


def test_lock_holds_pages_until_closed(disk_dir: Path) -> None:
    f = _write(disk_dir / "w", 2 << 20)
    with warm.lock([f], budget=1 << 30) as locked:
        assert locked.bytes == 2 << 20
        warm.evict([f])  # locked pages are not evicted
        assert residency.resident_fraction(f) == 1.0
    assert warm.evict([f]) > 0


def test_mlock_failure_names_the_limit(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = [_write(disk_dir / "a", 1 << 20), _write(disk_dir / "b", 1 << 20)]
    calls = []

    def mlock(addr: int, size: int) -> int:
        calls.append(addr)
        if len(calls) == 1:
            return 0
        ctypes.set_errno(errno.ENOMEM)  # what an unprivileged user over RLIMIT_MEMLOCK gets
        return -1

    monkeypatch.setattr(warm._libc, "mlock", mlock)
    with pytest.raises(UsageError, match="RLIMIT_MEMLOCK") as e:
        warm.lock(fs, budget=1 << 30)
    assert str(fs[1]) in e.value.message and "ulimit -l" in (e.value.hint or "")


def test_cli_lock_until_sigterm(disk_dir: Path) -> None:
    f = _write(disk_dir / "w", 1 << 20)
    p = subprocess.Popen(
        [*FASTVLLM, "prefetch", "lock", str(f), "--budget", "64M", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        lines = []
        while not lines or lines[-1] != "}\n":  # one pretty-printed JSON document
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            lines.append(line)
        doc = json.loads("".join(lines))
        assert doc["bytes"] == 1 << 20 and doc["budget"] == 64 << 20 and doc["pid"] == p.pid
        warm.evict([f])
        assert residency.resident_fraction(f) == 1.0
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert warm.evict([f]) == 1 << 20  # unlocked: the pages can go now


# ---- CLI errors ----------------------------------------------------------------------------


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("cmd", ["status", "warm", "evict", "lock"])
def test_cli_missing_path(disk_dir: Path, cmd: str) -> None:
    missing = disk_dir / "no-such-file"
    _one_line_error(run_cli("prefetch", cmd, str(missing), timeout=60), str(missing), "does not exist")


def test_cli_lock_over_budget_and_bad_budget(disk_dir: Path) -> None:
    f = _write(disk_dir / "w", 2 << 20)
    r = run_cli("prefetch", "lock", str(f), "--budget", "1M", timeout=60)
    _one_line_error(r, "budget of 1.0 MiB", "--budget")
    r = run_cli("prefetch", "lock", str(f), "--budget", "lots", timeout=60)
    _one_line_error(r, "'lots'", "4G")
    assert residency.of_files([f])[0].resident_pages == 0


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _cli_as_nobody(*args: str) -> tuple[int, str]:
    """Run the CLI in a forked child that has dropped to uid/gid 65534: (exit code, stderr).

    Forked, not a fresh `python` process, because that user may not be able to exec the venv's
    interpreter at all (here it links into /root, mode 0700). The same command runs first as
    root, so every module it imports lazily (typer's parsers) is loaded before the fork and the
    child fails only on the paths under test, as a real user would."""
    CliRunner().invoke(cli.app, list(args))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            _as_nobody()
            res = CliRunner().invoke(cli.app, list(args))
            msg = json.dumps([res.exit_code, res.stderr])
        except BaseException as e:
            msg, code = json.dumps([-1, repr(e)]), 1
        os.write(w, msg.encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    rc, err = json.loads(data)
    return rc, err


def _one_line_error_rc(rc: int, stderr: str, *needles: str) -> None:
    _one_line_error(subprocess.CompletedProcess([], rc, "", stderr), *needles)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_cli_permission_denied(disk_dir: Path) -> None:
    closed = disk_dir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "f").write_bytes(b"x" * 10)
    secret = disk_dir / "secret"
    secret.write_bytes(b"x" * 10)
    secret.chmod(0o600)
    assert closed.stat().st_uid == 0 and stat.S_IMODE(closed.stat().st_mode) == 0o700
    rc, err = _cli_as_nobody("prefetch", "status", str(closed))
    _one_line_error_rc(rc, err, str(closed), "permission denied", "cannot be listed")
    rc, err = _cli_as_nobody("prefetch", "warm", str(secret))
    _one_line_error_rc(rc, err, str(secret), "permission denied", "cannot be read")
    rc, err = _cli_as_nobody("prefetch", "status", str(disk_dir))  # found while walking a directory
    _one_line_error_rc(rc, err, str(closed), "permission denied")
    assert files.expand([closed]) == [closed / "f"]  # root may read it: the same path is fine


def test_a_file_counts_as_cached_only_while_nearly_all_of_it_is_in_the_page_cache(tmp_path: Path) -> None:
    """What lets a warm restore skip its read-ahead: a file just written is cached; once
    evicted, or half evicted, it is not, and a file that cannot be mapped is not either."""
    f = tmp_path / "weights.bin"
    with open(f, "wb") as fh:
        fh.write(os.urandom(8 << 20))
        fh.flush()
        os.fsync(fh.fileno())  # dirty pages are not dropped
    assert residency.is_cached(f)
    with open(f, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 4 << 20, 4 << 20, os.POSIX_FADV_DONTNEED)
    if residency.resident_fraction(f) == 1.0:
        pytest.skip("the page cache could not be evicted here (tmpfs-like filesystem)")
    assert not residency.is_cached(f)
    warm.evict([f])
    assert not residency.is_cached(f)
    assert not residency.is_cached(tmp_path / "missing.bin")
