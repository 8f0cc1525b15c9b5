"""The modes users pick, as enums every layer shares (the CLI's choices are these values).

Kept free of imports beyond the standard library: the CLI builds its options from them before
it imports anything heavy. Each is a StrEnum, so a member equals its string, prints as it, and
serialises to JSON as it: `--json` output and manifests keep their plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class CriuRestoreMode(StrEnum):
    """How CRIU fills a restored tree's memory (runtime.criu.resolve_mode turns AUTO into one of
    the others). MMAP maps the page images copy-on-write (fastvllm's patched CRIU: the snapshot
    must stay in place while the tree runs); COPY reads every page (stock CRIU); LAZY is CRIU's
    userfaultfd restore (pages served on first touch by a `criu lazy-pages` daemon)."""

    AUTO = "auto"
    MMAP = "mmap"
    COPY = "copy"
    LAZY = "lazy"


class LoadMode(StrEnum):
    """How weights.loader.load fills fresh tensors. MAP (CPU only) makes them copy-on-write views
    of the file; COPY reads into private memory; AUTO maps on CPU and copies on a GPU."""

    AUTO = "auto"
    MAP = "map"
    COPY = "copy"


class Reloader(StrEnum):
    """What refills a GPU sleep-2 snapshot's weights on restore: FASTVLLM is the snapshot's own
    weight file through fastvllm's loader; VLLM is vLLM's `reload_weights` from the model
    directory (the benchmarks compare them)."""

    FASTVLLM = "fastvllm"
    VLLM = "vllm"


class SnapshotKind(StrEnum):
    """What a snapshot holds, as its manifest records it: a served model (with a canary), or a
    plain process tree (`fastvllm snapshot --pid ... --process`, restored without vLLM steps)."""

    VLLM = "vllm"
    PROCESS = "process"
