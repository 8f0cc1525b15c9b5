"""CRIU restore modes on a real process with every mapping shape (tests/progs/mmap_shapes.c):
private anonymous memory with holes, written and only-read pages, shared anonymous memory, a
written private file mapping, a growsdown stack, a 1 GiB range barely touched, the brk heap. The
process checks every byte itself after each restore. Uses real CRIU through fastvllm's plain
process mode; mmap mode needs fastvllm's patched CRIU (scripts/setup.sh builds it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastvllm.restore.process import restore_process_snapshot
from fastvllm.runtime import criu, manifest, mapped, proctree
from fastvllm.runtime.errors import CriuError, EnvironmentNotReadyError, IntegrityError
from fastvllm.snapshot.process import take_process_snapshot

from .conftest import FASTVLLM, needs_criu, page_image_vm_flags

PROG = Path(__file__).parent / "progs" / "mmap_shapes.c"


def _patched() -> criu.Criu | None:
    with contextlib.suppress(Exception):
        found = criu.find_criu()
        if criu.supports_mmap(found):
            return found
    return None


needs_patched = pytest.mark.skipif(
    _patched() is None, reason="needs fastvllm's patched CRIU (scripts/setup.sh builds it; or FASTVLLM_CRIU)"
)
pytestmark = [pytest.mark.slow, needs_criu]


@pytest.fixture(scope="module")
def shapes_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (scripts/setup.sh installs build-essential)")
    out = tmp_path_factory.mktemp("bin") / "mmap_shapes"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(PROG)], check=True)
    return out


class Shapes:
    """The test process, driven through files in its work directory."""

    def __init__(self, binary: Path, work: Path) -> None:
        self.work = work
        work.mkdir()
        with open(work / "prog.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), str(work)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self._wait(work / "ready")

    def _wait(self, path: Path, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                log = (self.work / "prog.log").read_text(errors="replace")
                raise AssertionError(f"{path.name} did not appear within {timeout:.0f} s; log: {log}")
            time.sleep(0.02)

    def check(self, gen: int) -> str:
        """Ask the process to check every byte against generation `gen` (then move on)."""
        (self.work / f"go-{gen}").write_text("1")
        self._wait(self.work / f"out-{gen}")
        return (self.work / f"out-{gen}").read_text().strip()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # a restored copy has the same PID, maybe not the group
        with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        proctree.wait_gone([self.pid], 30.0, reaped=True)


@pytest.fixture
def shapes(shapes_bin: Path, tmp_path: Path) -> Iterator[Shapes]:
    s = Shapes(shapes_bin, tmp_path / "work")
    try:
        yield s
    finally:
        s.kill()


def _snapshot(s: Shapes, out: Path) -> manifest.ProcessManifest:
    take_process_snapshot(s.pid, out)
    proctree.wait_gone([s.pid], 30.0, reaped=True)  # the dump stopped it
    with contextlib.suppress(ChildProcessError):
        s.proc.wait(timeout=1)
    assert not proctree.alive(s.pid)
    return manifest.load_process(out)


def _page_images(snap: Path) -> dict[str, str]:
    return {p.name: manifest.hash_file(p) for p in sorted((snap / "criu").glob("pages-*.img"))}


def _mapped_images(pid: int) -> set[str]:
    return {
        line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/pages-" in line
    }


@pytest.mark.parametrize(
    "mode",
    [pytest.param("mmap", marks=needs_patched), "copy", "lazy"],
)
def test_every_byte_survives_a_restore(mode: str, shapes: Shapes, tmp_path: Path) -> None:
    found = criu.find_criu()
    if mode == "lazy" and not criu.supports_lazy(found):
        pytest.skip("CRIU's lazy restore needs userfaultfd (criu check --feature uffd-noncoop)")
    snap = tmp_path / "snap"
    _snapshot(shapes, snap)
    before = _page_images(snap)
    res = restore_process_snapshot(snap, criu_restore=mode)
    assert res.pid == shapes.pid and res.criu_restore == mode
    maps = _mapped_images(shapes.pid)
    if mode == "mmap":
        assert maps and all(p.startswith(str(snap / "criu")) for p in maps), maps
        assert [u.pid for u in mapped.snapshot_mappers(snap)] == [shapes.pid]
    else:
        assert not maps
    assert shapes.check(1).startswith("ok")
    # the process has written into pages that were mapped from the images: copies, not the files
    assert shapes.check(2).startswith("ok")
    assert _page_images(snap) == before


@needs_patched
def test_every_byte_with_every_run_mapped(
    shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mmap-pages-min 1: even single pages between holes come from the image file."""
    monkeypatch.setattr(criu, "COMMON_FLAGS", [*criu.COMMON_FLAGS, "--mmap-pages-min", "1"])
    snap = tmp_path / "snap"
    _snapshot(shapes, snap)
    restore_process_snapshot(snap, criu_restore="mmap")
    log = max((snap / "logs").glob("criu-restore-*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "nr_mapped_pages" in log
    assert shapes.check(1).startswith("ok")


def _maps(pid: int) -> list[tuple[int, int, str]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[5] if len(parts) > 5 else ""))
    return out


@needs_patched
@pytest.mark.parametrize("file_too", [True, False])
def test_written_pages_of_a_private_file_mapping_come_from_the_image(
    file_too: bool, shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mmap-pages-file (patch 0004): the pages a process wrote into its private mapping of
    backing.bin are mapped from the pages image, splitting that mapping into file-backed and
    image-backed parts; every byte is the same, the process's later writes reach neither file,
    and a snapshot of it restores again without the first. Without the option (the other
    case) the file mapping stays whole. --mmap-pages-min 1: the program writes every other
    page, runs of one page."""
    found = criu.find_criu()
    if not criu.supports_mmap_file(found):
        pytest.skip(f"{found.path} predates patch 0004 (scripts/setup.sh rebuilds it)")
    monkeypatch.setattr(criu, "COMMON_FLAGS", [*criu.COMMON_FLAGS, "--mmap-pages-min", "1"])
    monkeypatch.setattr(criu, "supports_mmap_file", lambda c: file_too)
    backing = shapes.work / "backing.bin"
    file_bytes = manifest.hash_file(backing)
    snap = tmp_path / "snap"
    _snapshot(shapes, snap)
    before = _page_images(snap)
    restore_process_snapshot(snap, criu_restore="mmap")
    maps = _maps(shapes.pid)
    spans = [(lo, hi) for lo, hi, path in maps if path == str(backing)]
    assert spans, maps
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    inside = [path for a, b, path in maps if lo <= a and b <= hi and path != str(backing)]
    if file_too:
        assert inside and all(p.startswith(str(snap / "criu" / "pages-")) for p in inside), inside
    else:
        assert spans == [(lo, hi)] and not inside, maps
    assert shapes.check(1).startswith("ok")
    assert shapes.check(2).startswith("ok")  # written again: copies, in memory only
    assert _page_images(snap) == before and manifest.hash_file(backing) == file_bytes
    again = tmp_path / "again"
    _snapshot(shapes, again)
    restore_process_snapshot(again, criu_restore="copy")
    assert shapes.check(3).startswith("ok")


@needs_patched
def test_every_byte_with_random_faults(
    shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mmap-pages-random (patch 0003): the mapped runs are advised MADV_RANDOM (VmFlags "rr"),
    and the contents are the same."""
    found = criu.find_criu()
    if not criu.supports_mmap_random(found):
        pytest.skip(f"{found.path} predates patch 0003 (scripts/setup.sh rebuilds it)")
    snap = tmp_path / "snap"
    _snapshot(shapes, snap)
    plain = criu.restore  # process mode does not ask for random faults itself
    monkeypatch.setattr(criu, "restore", lambda *a, **k: plain(*a, **{**k, "random_faults": True}))
    restore_process_snapshot(snap, criu_restore="mmap")
    flags = page_image_vm_flags([shapes.pid])
    assert flags and all("rr" in f for f in flags), flags
    assert shapes.check(1).startswith("ok")
    assert shapes.check(2).startswith("ok")


@needs_patched
def test_a_mmap_restored_process_snapshots_again_without_the_old_images(
    shapes: Shapes, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _snapshot(shapes, first)
    restore_process_snapshot(first, criu_restore="mmap")
    assert shapes.check(1).startswith("ok")  # memory is now at generation 2, partly copied-on-write
    assert mapped.snapshot_mappers(first)

    _snapshot(shapes, second)
    dump_log = (second / "logs" / "criu-dump.log").read_text()
    assert "maps the CRIU image" in dump_log  # the patched dump turned those mappings into memory
    # The new snapshot must not need the old one: move it out of reach before restoring.
    first.rename(tmp_path / "first-moved")
    restore_process_snapshot(second, criu_restore="mmap")
    assert shapes.check(2).startswith("ok")
    assert all(p.startswith(str(second / "criu")) for p in _mapped_images(shapes.pid))
    assert not mapped.snapshot_mappers(tmp_path / "first-moved")

    # And once more in copy mode, from the re-dumped images
    _snapshot(shapes, tmp_path / "third")
    restore_process_snapshot(tmp_path / "third", criu_restore="copy")
    assert shapes.check(3).startswith("ok")
    assert not _mapped_images(shapes.pid)


def _largest_pages_image(snap: Path) -> Path:
    return max((snap / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)


@needs_patched
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_pages_image_fails_before_any_process_runs(
    damage: str, shapes: Shapes, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    m = _snapshot(shapes, snap)
    img = _largest_pages_image(snap)
    if damage == "truncated":
        os.truncate(img, img.stat().st_size - 64 * 4096)
    else:
        img.unlink()
    # fastvllm's own check names the file
    with pytest.raises(IntegrityError) as e:
        restore_process_snapshot(snap, criu_restore="mmap")
    assert img.name in e.value.message
    assert not any(proctree.alive(p) for p in m.tree_pids)
    # without it, CRIU itself refuses (a mapped run past the end would only fault later)
    with pytest.raises(CriuError) as e:
        restore_process_snapshot(snap, criu_restore="mmap", verify=False)
    assert ("truncated" if damage == "truncated" else "pages") in e.value.message + (e.value.detail or "")
    assert not any(proctree.alive(p) for p in m.tree_pids)


def test_mmap_mode_with_a_stock_criu_is_refused(shapes: Shapes, tmp_path: Path) -> None:
    stock = next(
        (
            c
            for c in ("/usr/local/sbin/criu", "/usr/sbin/criu")
            if os.access(c, os.X_OK) and not criu.supports_mmap(criu.Criu(c, criu.criu_version(c)))
        ),
        None,
    )
    if stock is None:
        pytest.skip("no stock CRIU (without --mmap-pages) on this host to refuse")
    snap = tmp_path / "snap"
    m = _snapshot(shapes, snap)
    env = {**os.environ, "FASTVLLM_CRIU": stock}
    r = subprocess.run(
        [*FASTVLLM, "restore", str(snap), "--criu-restore", "mmap"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == EnvironmentNotReadyError.exit_code, r.stderr
    assert "mmap" in r.stderr and "--criu-restore copy" in r.stderr
    assert not any(proctree.alive(p) for p in m.tree_pids)
    # auto falls back to copy with that CRIU and restores
    r = subprocess.run(
        [*FASTVLLM, "restore", str(snap), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["criu_restore"] == "copy"
    assert shapes.check(1).startswith("ok")


@needs_patched
def test_deleted_page_images_still_back_the_process_and_dump_as_memory(
    shapes: Shapes, tmp_path: Path
) -> None:
    """Unlinking the images under a mmap-restored process (what `fastvllm rm` refuses, but a
    user's rm -rf does not) keeps its memory: the inodes live on, and a new dump copies them."""
    first, second = tmp_path / "first", tmp_path / "second"
    _snapshot(shapes, first)
    restore_process_snapshot(first, criu_restore="mmap")
    shutil.rmtree(first)
    assert all(
        p.endswith("(deleted)")
        for p in Path(f"/proc/{shapes.pid}/maps").read_text().splitlines()
        if "/pages-" in p
    )
    assert shapes.check(1).startswith("ok")
    _snapshot(shapes, second)
    restore_process_snapshot(second, criu_restore="copy")
    assert shapes.check(2).startswith("ok")
