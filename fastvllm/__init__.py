"""fastvllm: cold start of a vLLM server in about a second, from a CRIU snapshot.

    import fastvllm
    snap = fastvllm.snapshot("tiny", out="/srv/snaps/tiny")
    srv = fastvllm.restore("/srv/snaps/tiny")

`fastvllm.snapshot` and `fastvllm.restore` are also the subpackages that hold the pipelines
(the layout the user asked for). Rebinding those names to functions would break
`import fastvllm.snapshot.pipeline`, so the two package modules are made callable instead:
calling them calls `fastvllm.api.snapshot` / `fastvllm.api.restore`.
"""

import sys
import types
from typing import Any

from fastvllm import api
from fastvllm.api import running, snapshot_process, stop
from fastvllm.restore.pipeline import RestoreResult
from fastvllm.runtime.errors import FastVLLMError
from fastvllm.snapshot.pipeline import SnapshotResult


class _CallablePackage(types.ModuleType):
    """A package that is also the API function of the same name."""

    _api_call: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_call(*args, **kwargs)


for _name in ("snapshot", "restore"):
    _mod = sys.modules[f"fastvllm.{_name}"]
    _mod.__class__ = _CallablePackage
    _mod._api_call = getattr(api, _name)

__all__ = ["FastVLLMError", "RestoreResult", "SnapshotResult", "api", "running", "snapshot_process", "stop"]
__version__ = "0.1.0"
