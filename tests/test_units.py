"""Pure logic and small mechanisms, no vLLM: the tiny model, the manifest, checksums,
atomic publish, sparse /dev/shm copies, CRIU log filtering, process-session control."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastvllm.runtime import atomic, cpu_share, criu, manifest, proctree, shm, tiny_model
from fastvllm.runtime.errors import IntegrityError, NotASnapshotError, SnapshotExistsError, UsageError


def test_tiny_model_is_byte_identical_across_runs(tmp_path: Path) -> None:
    a = tiny_model.make_tiny(tmp_path / "a")
    b = tiny_model.make_tiny(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert manifest.model_identity(a).content_hash == manifest.model_identity(b).content_hash


def test_tiny_model_tokenizer_round_trips(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model.make_tiny(tmp_path / "m") / "tokenizer.json"))
    text = "The lighthouse keeper restored the cache."
    assert tok.get_vocab_size() == tiny_model.CONFIG["vocab_size"]
    assert tok.decode(tok.encode(text).ids) == text


def _sample_manifest() -> manifest.Manifest:
    return manifest.Manifest(
        identity=manifest.HostIdentity("4.2.1", "6.18", "3.11.7", "0.32.0"),
        model=manifest.ModelIdentity("/m", "c", "s", 1),
        server=manifest.ServerSpec("/m", "/m", "127.0.0.1", 8000, [], {}, "/x/server.log", [1, 2]),
        canary=manifest.Canary("p", 2, [5, 6], "ab"),
    )


def test_manifest_round_trip_and_identity_differences(tmp_path: Path) -> None:
    m = _sample_manifest()
    m.write(tmp_path)
    back = manifest.load(tmp_path)
    assert back == m
    other = manifest.HostIdentity("4.2.1", "6.19", "3.11.7", "0.33.0")
    diffs = m.identity.differences(other)
    assert len(diffs) == 2 and diffs[0].startswith("kernel:") and diffs[1].startswith("vllm:")


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "not a fastvllm snapshot"),
        (lambda d: (d.mkdir(), (d / "manifest.json").write_text("{nope")), "not valid JSON"),
        (
            lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"format_version": 99}')),
            "format version 99",
        ),
        (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"format_version": 1}')), "incomplete"),
    ],
)
def test_manifest_load_errors(tmp_path: Path, setup, needle: str) -> None:
    d = tmp_path / "snap"
    setup(d)
    with pytest.raises(NotASnapshotError, match=needle):
        manifest.load(d)


def test_verify_files_catches_missing_truncated_and_altered(tmp_path: Path) -> None:
    (tmp_path / "criu").mkdir()
    f = tmp_path / "criu" / "pages-1.img"
    f.write_bytes(os.urandom(3 << 20))
    entries = manifest.collect_files(tmp_path)
    assert [e.path for e in entries] == ["criu/pages-1.img"]
    manifest.verify_files(tmp_path, entries)  # intact

    data = bytearray(f.read_bytes())
    data[12345] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        manifest.verify_files(tmp_path, entries)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(IntegrityError, match="truncated"):
        manifest.verify_files(tmp_path, entries)
    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        manifest.verify_files(tmp_path, entries)


def test_collect_files_skips_manifest_and_logs(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "server.log").write_text("x")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "shm").mkdir()
    (tmp_path / "shm" / "psm_1").write_bytes(b"abc")
    # (with the /dev/shm copies' original modes, kept aside as they are made private)
    assert [e.path for e in manifest.collect_files(tmp_path)] == ["shm/.fastvllm-modes.json", "shm/psm_1"]


def test_publish_is_atomic_and_never_replaces(tmp_path: Path) -> None:
    out = tmp_path / "snap"
    st = atomic.staging_dir(out)
    assert (st.stat().st_mode & 0o777) == 0o700 and atomic.STAGING_MARK in st.name
    (st / "f").write_text("1")
    atomic.publish(st, out)
    assert (out / "f").read_text() == "1" and not st.exists()
    st2 = atomic.staging_dir(out)
    with pytest.raises(SnapshotExistsError):
        atomic.publish(st2, out)  # an empty-or-not existing directory is never replaced
    assert (out / "f").read_text() == "1"


def test_sparse_copy_keeps_bytes_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"hello")
        f.seek((64 << 20) - 3)
        f.write(b"end")
    dst = tmp_path / "dst"
    shm.copy_sparse(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 1 << 20  # holes stayed holes


def test_criu_log_tail_skips_benign_lines(tmp_path: Path) -> None:
    log = tmp_path / "restore.log"
    log.write_text(
        "(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n"
        + "".join(f"(00.{i:02d}) line {i}\n" for i in range(30))
        + "(00.50) Error (criu/cr-restore.c:1237): Can't fork for 42: File exists\n"
    )
    tail = criu.log_tail(log)
    assert "Can't fork for 42" in tail
    assert "RLIMIT_NOFILE" not in tail.splitlines()[0]


def test_stop_session_stops_the_whole_session_and_nothing_else() -> None:
    # a session leader with a child, like a vLLM server tree
    p = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,time; subprocess.Popen(['sleep','60']); time.sleep(60)"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 60  # a fresh interpreter on a busy host: seconds
    while len(proctree.session_pids(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = proctree.session_pids(p.pid)
    assert len(tree) == 2
    proctree.stop_session(p.pid, grace=2)
    p.wait()
    assert proctree.wait_gone(tree, 10) == []
    assert proctree.alive(os.getpid())


def test_shm_hook_script_copies_only_at_post_dump(tmp_path: Path) -> None:
    src = tmp_path / "psm_x"
    src.write_bytes(b"data")
    script = tmp_path / "hook.sh"
    script.write_text(shm.hook_script([src], tmp_path / "out"))
    script.chmod(0o700)
    subprocess.run([str(script)], env={**os.environ, "CRTOOLS_SCRIPT_ACTION": "pre-dump"}, check=True)
    assert not (tmp_path / "out").exists()
    subprocess.run([str(script)], env={**os.environ, "CRTOOLS_SCRIPT_ACTION": "post-dump"}, check=True)
    assert (tmp_path / "out" / "psm_x").read_bytes() == b"data"


def test_manifest_json_is_plain_json(tmp_path: Path) -> None:
    _sample_manifest().write(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["format_version"] == manifest.FORMAT_VERSION
    assert doc["server"]["tree_pids"] == [1, 2]


@pytest.mark.parametrize("layout", ["dense", "hole-first", "hole-last", "empty", "odd-sizes"])
@pytest.mark.parametrize("hasher", ["hash_file", "hash_file_mapped"])
def test_hash_file_treats_holes_as_zeros(tmp_path: Path, layout: str, hasher: str) -> None:
    import xxhash

    p = tmp_path / "f"
    with open(p, "wb") as f:
        if layout == "dense":
            f.write(os.urandom(3 << 20))
        elif layout == "hole-first":
            f.truncate(40 << 20)
            f.seek(30 << 20)
            f.write(os.urandom(1 << 20))
        elif layout == "hole-last":
            f.write(os.urandom(1 << 20))
            f.truncate(40 << 20)
        elif layout == "odd-sizes":  # windows past one chunk, data at an unaligned offset, a short tail
            f.write(os.urandom((17 << 20) + 123))
            f.seek((30 << 20) + 5000)
            f.write(os.urandom(777))
    seen: list[int] = []
    digest = getattr(manifest, hasher)(p, seen.append)
    assert digest == xxhash.xxh3_128(p.read_bytes()).hexdigest()
    assert sum(seen) == p.stat().st_size


def test_mapped_hash_stops_when_asked(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(20 << 20))
    assert manifest.hash_file_mapped(p, stop=lambda: True) is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [(None, cpu_share.DEFAULT_NICE), ("0", 0), (" 19 ", 19), ("-1", None), ("20", None), ("ten", None)],
)
def test_server_nice_setting(monkeypatch: pytest.MonkeyPatch, raw: str | None, want: int | None) -> None:
    if raw is None:
        monkeypatch.delenv(cpu_share.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_share.ENV, raw)
    if want is None:
        with pytest.raises(UsageError, match="FASTVLLM_SERVER_NICE"):
            cpu_share.server_nice()
    else:
        assert cpu_share.server_nice() == want


@pytest.mark.skipif(cpu_share.group_path() is None, reason="no cgroup hierarchy with the cpu controller here")
def test_yield_to_host_moves_a_tree_into_the_servers_cgroup() -> None:
    mine = cpu_share.group_of(os.getpid())
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a session of its own, like a server
    try:
        assert cpu_share.yield_to_host([p.pid], 0) is None  # 0 leaves it alone
        assert cpu_share.group_of(p.pid) == mine
        group = cpu_share.yield_to_host([p.pid], cpu_share.DEFAULT_NICE)
        assert group == cpu_share.group_path()
        assert cpu_share.group_of(p.pid) == "/" + cpu_share.CGROUP
        weights = [f.read_text().strip() for f in (group / "cpu.shares", group / "cpu.weight") if f.exists()]
        assert weights in (["110"], ["11"])  # nice 10 through the kernel's table (v1 shares, v2 weight)
        assert cpu_share.group_of(os.getpid()) == mine  # the caller stays where it was
    finally:
        p.kill()
        p.wait()
    assert cpu_share.yield_to_host([p.pid]) is None  # gone: no error, nothing moved


_BIND_PROBE = """
import json, os, socket
held = []
def take(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    held.append(s)
    return s.getsockname()[1]
mine = [take() for _ in range(3)]
r, w = os.pipe()
if os.fork() == 0:  # a child process of the same server draws from the same sequence
    os.write(w, " ".join(str(take()) for _ in range(4)).encode())
    os._exit(0)
os.wait()
child = [int(x) for x in os.read(r, 100).split()]
print(json.dumps([mine, child, take(socket.SOCK_DGRAM)]))
"""


@pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler to build the bind helper"
)
def test_bind_ports_helper_draws_port_zero_binds_from_the_servers_range(tmp_path: Path) -> None:
    from fastvllm.runtime import native_build

    env = dict(
        os.environ,
        LD_PRELOAD=str(native_build.build("bind_ports")),
        FASTVLLM_BIND_PORTS="20100-20105",
        FASTVLLM_BIND_FIRST="20102",
        FASTVLLM_BIND_STATE=str(tmp_path / "state"),
    )
    r = subprocess.run(
        [sys.executable, "-c", _BIND_PROBE], env=env, capture_output=True, text=True, check=True
    )
    parent_ports, child_ports, udp = json.loads(r.stdout)
    assert parent_ports == [20102, 20103, 20104]  # in sequence from the server's first port
    # the child went on from the shared sequence, wrapped around, and once the six ports were
    # all held fell back to the kernel's choice
    assert child_ports[:3] == [20105, 20100, 20101] and not 20100 <= child_ports[3] <= 20105
    assert not 20100 <= udp <= 20105  # only TCP is moved


@pytest.mark.skipif(os.geteuid() != 0, reason="kept for root's CRIU only")
def test_criu_kernel_cache_directory_is_kept_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CRIU trusts the kernel-feature cache it finds: a directory others can write, or a link
    planted where the directory belongs, is replaced by an empty private one."""
    import stat

    d = tmp_path / "kdat"
    monkeypatch.setattr(criu, "KDAT_DIR", d)
    criu._private_kdat_dir()
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    os.chmod(d, 0o777)
    (d / "criu.kdat").write_bytes(b"planted")
    criu._private_kdat_dir()
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and not list(d.iterdir())
    d.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    d.symlink_to(tmp_path / "elsewhere")
    criu._private_kdat_dir()
    assert not d.is_symlink() and d.is_dir() and (tmp_path / "elsewhere").is_dir()


def test_image_thread_ids_are_the_core_images() -> None:
    names = ["criu/core-12.img", "criu/core-7.img", "criu/mm-12.img", "criu/pagemap-3.img"]
    assert criu.image_thread_ids(names) == [7, 12]


def test_a_thread_id_held_elsewhere_fails_the_restore_before_criu() -> None:
    import threading

    started, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def hold() -> None:
        tid.append(threading.get_native_id())
        started.set()
        done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    started.wait(10)
    try:
        never = int(Path("/proc/sys/kernel/pid_max").read_text())  # IDs stay below it
        images = [f"criu/core-{tid[0]}.img", f"criu/core-{never}.img", f"criu/core-{os.getpid()}.img"]
        ids = criu.image_thread_ids(images)
        assert sorted(proctree.ids_taken(ids, [])) == sorted(
            [(tid[0], os.getpid()), (os.getpid(), os.getpid())]
        )
        # the tree's own PIDs, and their threads, are left to the caller: a stopped tree's
        # process is a zombie while its threads still exit, and the caller waits for its PID
        assert proctree.ids_taken(ids, [os.getpid()]) == []
        with pytest.raises(UsageError, match=f"thread ID {tid[0]} is in use by PID {os.getpid()}"):
            criu.check_ids_free(images[:2], [])
        # one of the tree's own PIDs alive: the snapshotted tree still runs
        with pytest.raises(UsageError, match=f"PID {os.getpid()} is in use"):
            criu.check_ids_free(images, [os.getpid()])
        criu.check_ids_free([f"criu/core-{never}.img"], [])  # nothing held: no error
    finally:
        done.set()
        t.join()


def test_criu_restores_take_turns_on_a_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `criu restore`s at once unlinked each other's /dev/shm link_remap files: CRIU's part
    of a restore holds a host lock; a second one waits for it, and one held too long is named."""
    import threading

    from fastvllm.runtime import restore_lock
    from fastvllm.runtime.errors import SnapshotBusyError

    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path))
    order: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def first() -> None:
        with restore_lock.criu_exclusive():
            order.append("first in")
            held.set()
            release.wait(30)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(30)
    monkeypatch.setattr(restore_lock, "CRIU_WAIT_S", 0.2)
    with (
        pytest.raises(SnapshotBusyError, match="another CRIU dump or restore"),
        restore_lock.criu_exclusive(),
    ):
        pass
    monkeypatch.setattr(restore_lock, "CRIU_WAIT_S", 60.0)
    release.set()
    with restore_lock.criu_exclusive(), restore_lock.criu_exclusive():  # nests in one thread
        order.append("second in")
    t.join(30)
    assert order == ["first in", "first out", "second in"]


def test_a_busy_restore_names_a_holder_that_writes_its_pid_a_moment_late(tmp_path: Path) -> None:
    """The holder takes the lock, then writes its PID: a second restore in between waits a moment
    for it rather than saying "another fastvllm process"."""
    import threading

    from fastvllm.runtime import restore_lock

    f = tmp_path / "lock"
    f.write_bytes(b"")
    fd = os.open(f, os.O_RDWR)
    try:
        assert restore_lock._holder(fd, wait_s=0.05) == ""  # never written: no PID to name
        threading.Timer(0.05, lambda: f.write_bytes(b"4321\n")).start()
        assert restore_lock._holder(fd, wait_s=5.0) == "4321"
    finally:
        os.close(fd)
