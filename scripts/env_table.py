"""Print the environment-variable table of docs/operations.md, or rewrite it in place.

    python -m fastvllm.scripts.env_table                            # print it
    python -m fastvllm.scripts.env_table --update docs/operations.md  # replace it between markers

The table comes from fastvllm.runtime.config, where every FASTVLLM_* variable is declared;
tests/test_docs.py fails while the document's copy differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastvllm.runtime import config


def update(path: Path) -> bool:
    """Replace the table between the markers; True if the file changed."""
    text = path.read_text()
    start, end = text.find(config.TABLE_START), text.find(config.TABLE_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {config.TABLE_START!r} ... {config.TABLE_END!r} markers")
    new = f"{text[: start + len(config.TABLE_START)]}\n{config.markdown_table()}\n{text[end:]}"
    if new == text:
        return False
    path.write_text(new)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", type=Path, metavar="FILE.md", help="rewrite the table in FILE.md")
    args = ap.parse_args()
    if args.update is None:
        print(config.markdown_table())
    else:
        print(f"{args.update}: {'updated' if update(args.update) else 'already current'}")


if __name__ == "__main__":
    main()
