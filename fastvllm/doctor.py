"""`fastvllm doctor`: is this host ready to snapshot and restore? Each failing line says how
to fix it. Checks are cheap except the vLLM import, which runs in a child process so a
broken install cannot take the CLI down."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass

from fastvllm.runtime import config, criu, system, vllm_server
from fastvllm.runtime.errors import FastVLLMError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _criu_checks() -> list[Check]:
    try:
        found = criu.find_criu()
    except FastVLLMError as e:
        return [Check("CRIU >= 4.2", False, e.message, e.hint or "run scripts/setup.sh")]
    checks = [Check("CRIU >= 4.2", True, f"{found.version} at {found.path}")]
    if os.geteuid() == 0:
        ok, text = criu.criu_check(found)
        last = text.splitlines()[-1] if text else ""
        checks.append(
            Check(
                "criu check", ok, last, "" if ok else "see 'criu check' output; kernel features are missing"
            )
        )
    else:
        checks.append(Check("criu check", False, "needs root", "run 'sudo fastvllm doctor'"))
    checks.append(_restore_modes_check(found))
    return checks


def _restore_modes_check(found: criu.Criu) -> Check:
    """Which --criu-restore modes this CRIU can run: mmap needs fastvllm's patch (patches/criu)."""
    modes = criu.restore_modes(found)
    patched = "fastvllm-patched" if "mmap" in modes else "stock"
    default = criu.resolve_mode(found, "auto")
    return Check(
        "CRIU restore modes",
        "mmap" in modes,
        f"{', '.join(modes)} ({patched} CRIU; restore default: {default})",
        "" if "mmap" in modes else f"run scripts/setup.sh to build the patched CRIU into {criu.PATCHED_CRIU}",
        required=False,
    )


def _privilege_check() -> Check:
    if os.geteuid() != 0:
        return Check("privileges", False, "not root", "run as root (sudo) or in a --privileged container")
    missing = system.missing_capabilities()
    if missing:
        return Check(
            "privileges", False, "missing " + ", ".join(missing), "add them (docker run --cap-add ...)"
        )
    return Check("privileges", True, "root with CRIU's capabilities")


def _io_uring_check() -> Check:
    v = system.io_uring_disabled()
    if v is None or v == 2:
        return Check("io_uring", True, "disabled" if v == 2 else "kernel has no io_uring switch")
    can = os.geteuid() == 0
    return Check(
        "io_uring",
        can,
        f"kernel.io_uring_disabled={v}; fastvllm sets it to 2 when it launches a server"
        if can
        else f"kernel.io_uring_disabled={v}",
        "" if can else "run 'sysctl -w kernel.io_uring_disabled=2' as root (CRIU cannot dump io_uring)",
    )


def _vllm_check() -> Check:
    python = config.VLLM_PYTHON.get()
    try:
        r = subprocess.run(
            [python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check("vLLM import", False, "import took over 180 s", "check the installation")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        return Check("vLLM import", False, last[:160], "run scripts/setup.sh")
    vllm_v, torch_v = r.stdout.split()
    return Check("vLLM import", True, f"vllm {vllm_v}, torch {torch_v} ({python})")


def _cuda_checkpoint_check() -> Check:
    if not vllm_server.cuda_present():
        return Check("CUDA checkpoint", True, "no NVIDIA GPU: CPU snapshots only", required=False)
    try:
        from cuda.bindings import driver  # absent on CPU hosts: pyproject's mypy overrides say so
    except ImportError:
        return Check(
            "CUDA checkpoint", False, "cuda-bindings not installed", "pip install cuda-bindings", False
        )
    ok = hasattr(driver, "cuCheckpointProcessLock")
    return Check(
        "CUDA checkpoint",
        ok,
        "cuCheckpointProcess* available" if ok else "driver API lacks cuCheckpointProcess*",
        "" if ok else "needs NVIDIA driver >= 550 and cuda-bindings >= 12.8",
        False,
    )


def _leftovers_check() -> Check:
    """What interrupted operations and killed servers left: trees whose root died or that do
    not answer, operations whose owner died, /dev/shm files no process holds."""
    from fastvllm.runtime import instances, journal, shm

    found = []
    for inst, health in instances.known():
        if health is not instances.Health.SERVING:
            found.append(f"server {inst.pid} {health}")
    found += [f"an interrupted {e.kind} of {e.subject} (pid {e.owner_pid})" for e in journal.orphaned()]
    stray = shm.orphans(journal.claimed_files())
    if stray:
        found.append(f"{len(stray)} /dev/shm files no process holds")
    if not found:
        return Check("leftovers", True, "no stray server, partial operation or /dev/shm file", required=False)
    stop = [f.split()[1] for f in found if f.startswith("server ")]
    fix = "; ".join(["fastvllm gc", *(f"fastvllm stop {pid}" for pid in stop)])
    return Check("leftovers", False, "; ".join(found), fix, required=False)


def run_checks(import_vllm: bool = True) -> list[Check]:
    checks = [*_criu_checks(), _privilege_check(), _io_uring_check()]
    if import_vllm:
        checks.append(_vllm_check())
    checks.append(_cuda_checkpoint_check())
    checks.append(Check("kernel", True, system.kernel_release(), required=False))
    checks.append(_leftovers_check())
    return checks
