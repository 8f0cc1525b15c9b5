"""Type-check the installed packages with mypy (settings in pyproject.toml's [tool.mypy]).

Usage:
    python scripts/typecheck.py            # exit status 0 when clean; errors name the repository's files

mypy maps modules to files by directory, and has no equivalent of setuptools' package-dir, so
`fastvllm.runtime` would be checked as a top-level `runtime`. This lays the packages out as they are
installed (a tree of symbolic links under build/typecheck/), runs `python -m mypy -p fastvllm` over
every package pyproject.toml installs, and rewrites the reported paths back to the repository's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, Path]:
    """Installed package name -> its source folder, from pyproject.toml's setuptools section."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = conf["package-dir"]
    return {name: ROOT / mapping.get(name, name.replace(".", "/")) for name in conf["packages"]}


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target`, replacing whatever is there (atomically, so parallel runs agree)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def build_tree(packages: dict[str, Path]) -> None:
    """Mirror each package's modules at its installed dotted path, as links to the real files
    (a package pyproject.toml no longer installs leaves the tree)."""
    wanted_dirs = {TREE.joinpath(*name.split(".")) for name in packages}
    for top in {TREE / name.split(".")[0] for name in packages}:
        for d in sorted(top.rglob("*"), reverse=True):
            if d.is_dir() and d not in wanted_dirs and not any(w.is_relative_to(d) for w in wanted_dirs):
                shutil.rmtree(d, ignore_errors=True)
    for name, src in packages.items():
        dest = TREE.joinpath(*name.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        wanted = {p.name for p in src.glob("*.py")}
        for old in dest.iterdir():
            if old.is_symlink() and old.suffix == ".py" and old.name not in wanted:
                old.unlink()
        for mod in sorted(wanted):
            _link(src / mod, dest / mod)


def main() -> int:
    packages = package_dirs()
    build_tree(packages)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(TREE / ".mypy_cache")]
    for name in packages:  # -p is recursive: name only the top-level packages
        if not any(name.startswith(other + ".") for other in packages):
            cmd += ["-p", name]
    proc = subprocess.run(cmd, cwd=TREE, capture_output=True, text=True)
    # Longest installed path first, so fastvllm.runtime's files are not taken for fastvllm's.
    prefixes = sorted(
        ((n.replace(".", "/") + "/", os.path.relpath(s, ROOT) + "/") for n, s in packages.items()),
        key=lambda p: -len(p[0]),
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        for installed, real in prefixes:
            if line.startswith(installed):
                line = real + line[len(installed) :]
                break
        print(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
