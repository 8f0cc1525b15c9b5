"""The README and docs/ stay usable: the README is short and opens with the two commands CI
runs, every relative link resolves (file and heading), and the environment-variable table in
docs/operations.md is the one runtime/config.py renders. Pure file reading: fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastvllm.runtime import config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TWO_COMMANDS = [
    "bash scripts/setup.sh && .venv/bin/fastvllm demo",
    "bash scripts/setup.sh && .venv/bin/python -m pytest tests",
]
# Where the code that reads environment variables lives (tests are declared too, as TEST).
CODE_DIRS = ("fastvllm", "runtime", "snapshot", "restore", "weights", "prefetch", "scheduler", "scripts")

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, lower
    case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in _prose_lines(path):
        for m in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            out.append((n, target))
    return out


def broken_links(path: Path) -> list[str]:
    bad = []
    for n, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    return bad


def test_slug_follows_github() -> None:
    assert slug("Servers' CPU share and ports") == "servers-cpu-share-and-ports"
    assert slug("The `io_uring` switch is global") == "the-io_uring-switch-is-global"
    assert slug("Second run, with the CRIU restore modes (2026-11-21)") == (
        "second-run-with-the-criu-restore-modes-2026-11-21"
    )
    assert slug("See [the page](x.md) now") == "see-the-page-now"


def test_broken_links_are_found(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title here\n")
    page.write_text(
        "# A\n[ok](b.md) [ok](b.md#title-here) [ok](#a) [web](https://x.y/z)\n"
        "[gone](c.md) [no heading](b.md#nope)\n```\n[in code](d.md)\n```\n`[inline](e.md)`\n"
    )
    found = [t for _, t in relative_links(page)]
    assert found == ["b.md", "b.md#title-here", "#a", "c.md", "b.md#nope"]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        bad = broken_links(page)
    finally:
        ROOT = saved
    assert [b.split(": ", 1)[1] for b in bad] == [
        "c.md (no such file)",
        "b.md#nope (no heading #nope in b.md)",
    ]


def test_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    first = next(i for i, line in enumerate(lines) if _FENCE.match(line))
    block = []
    for line in lines[first + 1 :]:
        if _FENCE.match(line):
            break
        block.append(line.split("#", 1)[0].strip())
    assert block == TWO_COMMANDS, "the README's first code block must be the two commands CI runs"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_environment_table_matches_the_configuration_module() -> None:
    doc = DOCS / "operations.md"
    table = config.table_in(doc.read_text())
    assert table is not None, f"{doc.relative_to(ROOT)} lacks the markers {config.TABLE_START!r}"
    assert table == config.markdown_table(), (
        "docs/operations.md's environment table differs from runtime/config.py: run "
        "'python -m fastvllm.scripts.env_table --update docs/operations.md'"
    )


def _code_files() -> list[Path]:
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".c")]
    return [*files, *(ROOT / "tests").glob("*.py"), ROOT / "Dockerfile.criu"]


def test_every_fastvllm_variable_is_declared() -> None:
    declared = {v.name for v in config.ALL}
    used: dict[str, str] = {}
    for path in _code_files():
        if path.name == "test_config.py":  # made-up names for the module's own tests
            continue
        for name in re.findall(r"\bFASTVLLM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            used.setdefault(name, str(path.relative_to(ROOT)))
    missing = {n: p for n, p in used.items() if n not in declared}
    assert not missing, f"declare these in runtime/config.py: {missing}"


def test_docs_pages_named_in_the_code_exist() -> None:
    """Comments state a decision and point at the page with its measurements: that page must exist."""
    missing = []
    for path in _code_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in re.findall(r"\bdocs/[\w./-]*\w\.md\b", line):
                if not (ROOT / ref).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    assert not missing, "\n".join(missing)


# Standard-library-only modules that run before anything else is imported (tests/test_startup.py):
# they read their few variables themselves, as runtime/config.py declares them.
STDLIB_ONLY = ("fastvllm/launcher.py", "fastvllm/resident_client.py")


def test_code_reads_fastvllm_variables_through_the_configuration_module() -> None:
    ad_hoc = re.compile(r"""(environ(\.get)?\s*[\[(]|getenv\(|environ\.setdefault\()\s*["']FASTVLLM_""")
    found = []
    for path in _code_files():
        if path.suffix != ".py" or path.parent.name == "tests" or path.name == "config.py":
            continue
        if str(path.relative_to(ROOT)) in STDLIB_ONLY:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ad_hoc.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "read these through fastvllm.runtime.config:\n" + "\n".join(found)
