"""The shape docs/architecture.md draws, checked on the source's syntax trees (nothing imported):
short functions in the pipelines, and imports that run one way, top to bottom:
the front door (fastvllm/) -> scheduler/ -> snapshot/, restore/ -> weights/ -> runtime/, prefetch/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
STAGES = ("runtime", "prefetch", "weights", "snapshot", "restore", "scheduler", "scripts")
FRONT = "front door"  # fastvllm/ itself: fastvllm.api, fastvllm.cli, ...
# What each stage may not import (the stages above it).
FORBIDDEN: dict[str, set[str]] = {
    "runtime": {"weights", "snapshot", "restore", "scheduler", "scripts", FRONT},
    "prefetch": {"weights", "snapshot", "restore", "scheduler", "scripts", FRONT},
    "weights": {"snapshot", "restore", "scheduler", "scripts", FRONT},
    "snapshot": {"scheduler", "scripts", FRONT},
    "restore": {"scheduler", "scripts", FRONT},
    "scheduler": {"scripts", FRONT},
}


def _sources(stage: str) -> list[Path]:
    return sorted((ROOT / stage).glob("*.py"))


def _layer(module: str) -> str | None:
    """The layer an absolute module name belongs to (None: not fastvllm's)."""
    parts = module.split(".")
    if parts[0] != "fastvllm":
        return None
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return FRONT


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth (function-level ones too)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "fastvllm":  # `from fastvllm import api`: the names are modules
                out += [(node.lineno, f"fastvllm.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_no_function_in_the_pipelines_is_long() -> None:
    """Pipelines read as a plan and short steps (issue 24): no function over 80 lines."""
    long = []
    for stage in ("snapshot", "restore"):
        for path in _sources(stage):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_imports_run_one_way(stage: str) -> None:
    """Nothing below imports anything above it (the scheduler's agent calls the restore
    pipeline, not the front door; the pipelines reach the workers through runtime/)."""
    bad = []
    for path in _sources(stage):
        for line, module in _imports(ast.parse(path.read_text(), str(path))):
            layer = _layer(module)
            if layer in FORBIDDEN[stage]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({layer})")
    assert not bad, f"{stage}/ imports from above it:\n" + "\n".join(bad)


def test_scripts_hold_only_scripts() -> None:
    """What the CLI, the stages or the tests import lives in a stage package; scripts/ holds
    commands (a script there may be a thin command over a stage module)."""
    bad = []
    for folder in ("fastvllm", *sorted(FORBIDDEN), "tests"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for line, module in _imports(ast.parse(path.read_text(), str(path))):
                if _layer(module) == "scripts":
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "move what these import out of scripts/ into its stage package:\n" + "\n".join(bad)


def test_the_layers_cover_every_package() -> None:
    """A new top-level folder gets a place in the order above (and in pyproject.toml)."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = {name.split(".")[1] for name in conf["packages"] if name.count(".") == 1}
    assert installed <= set(STAGES), f"packages with no place in the layers: {installed - set(STAGES)}"
