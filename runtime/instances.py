"""Records of servers fastvllm launched or restored and left serving, keyed by root PID.

A restored tree is not our child and carries no label; the record says which snapshot it
came from and how it was launched, so `fastvllm snapshot --pid` can snapshot it again and
`fastvllm stop` can stop exactly it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fastvllm.runtime import proctree, shm
from fastvllm.runtime.errors import UsageError
from fastvllm.runtime.proctree import alive


def instances_dir() -> Path:
    return Path(
        os.environ.get("FASTVLLM_RUN_DIR", "/run/fastvllm" if os.geteuid() == 0 else "/tmp/fastvllm-run")
    )


@dataclass
class Instance:
    pid: int
    host: str
    port: int
    model: str
    served_model_name: str
    vllm_args: list[str]
    env: dict[str, str]
    snapshot: str | None  # the snapshot it was restored from, if any
    log_path: str
    worker_extension: bool = False
    # "mmap": the tree maps its snapshot's page images (the snapshot must stay in place)
    criu_restore: str = "copy"


def record(inst: Instance) -> Path:
    d = instances_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{inst.pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(inst), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def forget(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (instances_dir() / f"{pid}.json").unlink()


def get(pid: int) -> Instance:
    path = instances_dir() / f"{pid}.json"
    if not path.is_file() or not alive(pid):
        forget(pid)
        raise UsageError(
            f"PID {pid} is not a vLLM server fastvllm launched or restored",
            hint="'fastvllm ps' lists them",
        )
    return Instance(**json.loads(path.read_text()))


def running() -> list[Instance]:
    out = []
    d = instances_dir()
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        try:
            inst = Instance(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if alive(inst.pid):
            out.append(inst)
        else:
            forget(inst.pid)
    return out


def stop(pid: int, grace: float = 10.0) -> None:
    """Stop a server tree by its session id and clean up what a killed tree leaves behind:
    its /dev/shm files and its record. The one way every stage stops a server."""
    files = shm.files_of(proctree.session_pids(pid))
    proctree.stop_session(pid, grace)
    shm.remove(files)
    forget(pid)
