"""Pure logic of the CRIU restore modes, no CRIU run: mode resolution against a binary that has
or lacks --mmap-pages, finding page-image mappings in /proc maps, rm of a snapshot nobody maps."""

from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path

import pytest
from fastvllm.runtime import criu, manifest, mapped
from fastvllm.runtime.errors import EnvironmentNotReadyError, NotASnapshotError, UsageError

import fastvllm


def _fake_criu(tmp_path: Path, help_text: str) -> criu.Criu:
    """A script that answers --help like a CRIU with or without the patch."""
    path = tmp_path / "criu"
    path.write_text(f"#!/bin/sh\necho '{help_text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return criu.Criu(str(path), "4.2.1")


def _fake_snapshot(tmp_path: Path) -> Path:
    """A directory `manifest.kind` accepts (nothing here reads more of it)."""
    snap = tmp_path / "snap"
    (snap / "criu").mkdir(parents=True)
    doc = {"format_version": manifest.FORMAT_VERSION, "kind": "process"}
    (snap / manifest.MANIFEST).write_text(json.dumps(doc))
    return snap


def test_auto_is_mmap_with_the_patch_and_copy_without(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    patched = _fake_criu(tmp_path / "p", "  --mmap-pages          on restore, map ...")
    stock = _fake_criu(tmp_path / "s", "  --auto-dedup          when used on dump ...")
    assert criu.resolve_mode(patched, "auto") == "mmap"
    assert criu.resolve_mode(stock, "auto") == "copy"
    assert criu.resolve_mode(stock, "copy") == "copy"
    with pytest.raises(EnvironmentNotReadyError) as e:
        criu.resolve_mode(stock, "mmap")
    assert "--criu-restore copy" in (e.value.hint or "") and "setup.sh" in (e.value.hint or "")
    with pytest.raises(UsageError):
        criu.resolve_mode(patched, "fast")


def test_page_image_mappings_are_found_and_others_not(tmp_path: Path) -> None:
    snap = _fake_snapshot(tmp_path)
    img = snap / "criu" / "pages-3.img"
    other = snap / "criu" / "pages-3.img.bak"
    for f in (img, other):
        f.write_bytes(b"x" * 3 * mmap.PAGESIZE)
    with open(img, "rb") as a, open(other, "rb") as b:
        ma = mmap.mmap(a.fileno(), 0, prot=mmap.PROT_READ)
        mb = mmap.mmap(b.fileno(), 0, prot=mmap.PROT_READ)
        try:
            users = mapped.snapshot_mappers(snap)
            assert [u.pid for u in users] == [os.getpid()]
            assert users[0].files == {"pages-3.img"} and users[0].mapped_bytes == 3 * mmap.PAGESIZE
            assert mapped.pages_image_mappers([os.getpid()]) == [os.getpid()]
            with pytest.raises(UsageError, match="in use"):
                fastvllm.api.remove(snap)
        finally:
            ma.close()
            mb.close()
    assert mapped.snapshot_mappers(snap) == []


def test_rm_removes_only_snapshots(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotASnapshotError):
        fastvllm.api.remove(tmp_path / "plain")
    assert (tmp_path / "plain").is_dir()
    snap = _fake_snapshot(tmp_path)
    fastvllm.api.remove(snap)
    assert not snap.exists()


def test_auto_is_mmap_for_gpu_snapshots_too(tmp_path: Path) -> None:
    patched = _fake_criu(tmp_path, "  --mmap-pages          on restore, map ...")
    assert criu.resolve_mode(patched, "auto", gpu=True) == "mmap"
    assert criu.resolve_mode(patched, "copy", gpu=True) == "copy"  # asked for: done


def test_a_criu_probe_is_kept_until_the_binary_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore no longer runs `criu --version` and `--help` each time: what they said is kept
    in fastvllm's home under the binary's identity, and asked again once the binary changes."""
    runs = tmp_path / "runs"
    path = tmp_path / "criu"

    def write(version: str) -> None:
        path.write_text(
            f"#!/bin/sh\necho run >> {runs}\n"
            f'case "$1" in --version) echo "Version: {version}";;\n'
            '  *) echo "  --mmap-pages  on restore";; esac\n'
        )
        path.chmod(0o755)

    write("4.2.1")
    monkeypatch.setenv("FASTVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTVLLM_CRIU", str(path))
    monkeypatch.setattr(criu, "_PROBED", {})
    found = criu.find_criu()
    assert found == criu.Criu(str(path), "4.2.1") and criu.supports_mmap(found)
    probed = runs.read_text().count("run")
    assert probed == 2  # --version and --help
    assert (tmp_path / "home" / criu.PROBE_FILE).is_file()
    monkeypatch.setattr(criu, "_PROBED", {})  # as a new process would start
    assert criu.find_criu().version == "4.2.1" and criu.supports_mmap(found)
    assert runs.read_text().count("run") == probed  # answered from the kept probe
    write("4.3.10")  # a new binary (a new size and ctime): probed again
    monkeypatch.setattr(criu, "_PROBED", {})
    assert criu.find_criu().version == "4.3.10"
    assert runs.read_text().count("run") > probed
