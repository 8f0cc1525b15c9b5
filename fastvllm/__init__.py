"""fastvllm: cold start of a vLLM server in about a second, from a CRIU snapshot.

    import fastvllm
    snap = fastvllm.snapshot("tiny", out="/srv/snaps/tiny")
    srv = fastvllm.restore("/srv/snaps/tiny")

`fastvllm.snapshot` and `fastvllm.restore` are also the subpackages that hold the pipelines
(the layout the user asked for). Rebinding those names to functions would break
`import fastvllm.snapshot.pipeline`, so the two package modules are made callable instead:
calling them calls `fastvllm.api.snapshot` / `fastvllm.api.restore`.

Nothing heavy is imported here: this package is also imported inside every vLLM server
fastvllm launches (the control guard middleware), and by the CLI before it knows which
command runs. The API's names resolve on first use (PEP 562).
"""

import importlib
import types
from typing import Any, cast


class _CallablePackage(types.ModuleType):
    """A package that is also the API function of the same name."""

    _api_name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("fastvllm.api"), self._api_name)(*args, **kwargs)


for _name in ("snapshot", "restore"):
    _mod = importlib.import_module(f"fastvllm.{_name}")  # the packages' __init__ only: light
    _mod.__class__ = _CallablePackage
    cast(_CallablePackage, _mod)._api_name = _name

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "api": ("fastvllm.api", None),
    "running": ("fastvllm.api", "running"),
    "snapshot_process": ("fastvllm.api", "snapshot_process"),
    "restore_process": ("fastvllm.api", "restore_process"),
    "snapshot_kind": ("fastvllm.api", "snapshot_kind"),
    "stop": ("fastvllm.api", "stop"),
    "RestoreResult": ("fastvllm.restore.pipeline", "RestoreResult"),
    "ProcessRestoreResult": ("fastvllm.restore.process", "ProcessRestoreResult"),
    "CriuRestoreMode": ("fastvllm.runtime.modes", "CriuRestoreMode"),
    "SnapshotKind": ("fastvllm.runtime.modes", "SnapshotKind"),
    "SnapshotResult": ("fastvllm.snapshot.pipeline", "SnapshotResult"),
    "FastVLLMError": ("fastvllm.runtime.errors", "FastVLLMError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastvllm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


__all__ = [
    "CriuRestoreMode",
    "FastVLLMError",
    "ProcessRestoreResult",
    "RestoreResult",
    "SnapshotKind",
    "SnapshotResult",
    "api",
    "restore_process",
    "running",
    "snapshot_kind",
    "snapshot_process",
    "stop",
]
__version__ = "0.1.0"
