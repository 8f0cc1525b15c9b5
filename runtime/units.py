"""Byte counts for people: one formatter for every message and table, one parser for sizes
given on the command line (a lock budget)."""

from __future__ import annotations

import re

from fastvllm.runtime.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '100000' -> bytes (binary units, as vmtouch reads them)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"cannot read {text!r} as a size", hint="write it like 4G, 512M or 1.5GiB")
    n = int(float(m.group(1)) * 1024 ** "_kmgtp".index((m.group(2) or "_").lower()))
    if n <= 0:
        raise UsageError(f"size {text!r} is not positive", hint="write it like 4G, 512M or 1.5GiB")
    return n
