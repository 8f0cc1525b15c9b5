"""The CPU share of fastvllm's vLLM servers against the rest of the host, and among themselves.

Why: vLLM's engine core and workers busy-poll their shared-memory queues (`sched_yield` for a
second after each message), and every server runs in a session of its own (CRIU needs that).
Under Linux's autogroup scheduler (`kernel.sched_autogroup_enabled=1`, the default of most
kernels) the CPU is shared between sessions, and on this project's 2-core host that starved
whatever was not polling (measured with ad-hoc scripts, thread schedstat sampled every 10 ms):

- a client streaming 600 tokens six times from one tiny-model server spent 5.9 s of 9 s
  runnable but not running, and its streams stalled 0.2-0.9 s at a time;
- with one server streaming, a second, idle server took 66 ms (median) to 3.6 s to answer a
  one-token request, and with both sessions at autogroup nice 10 (a first attempt at a fix)
  it did not answer within 20 s: its API server waited 11.7 s runnable and ran 21 ms.

Every server therefore joins one shared cgroup (`fastvllm` under the cpu controller, v1 or v2)
with a low weight. A task in a cgroup other than the root is not autogrouped, so inside it the
servers' threads share the CPU thread by thread, where the polls yield to the woken threads;
and the group as a whole yields to the host's other work (clients, the router, the restore's
own read-ahead) while taking every cycle nobody else wants. Measured the same way: the idle
server answered in 22-26 ms (median, max 38-144 ms) while the other streamed, and the client
of the streaming one never stalled.

The weight is `FASTVLLM_SERVER_NICE` (0-19, default 10) read as a nice value through the
kernel's nice-to-weight table (nice 10 is 110 against 1024); 0 makes fastvllm move nothing
(a restored tree then stays in the cgroups of the command that restored it: the restore asks
CRIU to leave cgroups alone, see runtime.criu.restore). Where no
cgroup can be made (a container with a read-only cgroupfs), servers stay put: in a
container's cgroup autogroup does not apply anyway.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastvllm.runtime import config

ENV = config.SERVER_NICE.name
DEFAULT_NICE = config.SERVER_NICE.default()
CGROUP = "fastvllm"
# The kernel's sched_prio_to_weight for nice 0..19 (kernel/sched/core.c).
_NICE_WEIGHT = (1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


def server_nice() -> int:
    """The servers' nice value from the environment (0: leave them alone)."""
    return config.SERVER_NICE.get()


def _cpu_hierarchy() -> tuple[Path, int] | None:
    """(mount point, version) of the cgroup hierarchy with the cpu controller, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) < 5 or len(post_fields) < 3:
            continue
        fstype, options = post_fields[0], post_fields[2].split(",")
        if fstype == "cgroup" and "cpu" in options:
            return Path(fields[4]), 1
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
    if v2 is not None:
        try:
            if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
                return v2, 2
        except OSError:
            return None
    return None


def group_path() -> Path | None:
    """Where the servers' cgroup is, or would be (None without a cpu controller)."""
    found = _cpu_hierarchy()
    return None if found is None else found[0] / CGROUP


def _ensure_group(nice: int) -> Path | None:
    found = _cpu_hierarchy()
    if found is None:
        return None
    root, version = found
    group = root / CGROUP
    weight = _NICE_WEIGHT[nice]
    try:
        group.mkdir(exist_ok=True)
        if version == 1:
            (group / "cpu.shares").write_text(str(weight))
        else:  # cpu.weight 100 is the default, as 1024 is for shares
            (group / "cpu.weight").write_text(str(max(1, math.ceil(weight * 100 / 1024))))
    except OSError:
        return None
    return group


def yield_to_host(pids: list[int], nice: int | None = None) -> Path | None:
    """Move the processes `pids` (a server's tree; children forked later follow their parent)
    into the servers' shared cgroup. Returns the cgroup, or None where servers stay put (nice
    0, no cpu controller, a read-only cgroupfs, or the processes are gone): that only costs
    latency on a crowded host, so it is not an error."""
    nice = server_nice() if nice is None else nice
    if nice == 0:
        return None
    group = _ensure_group(nice)
    if group is None:
        return None
    moved = 0
    for pid in pids:
        try:
            (group / "cgroup.procs").write_text(str(pid))
            moved += 1
        except OSError:
            continue
    return group if moved else None


def group_of(pid: int) -> str | None:
    """The cpu cgroup path of `pid` ("/fastvllm" once it joined), None if it cannot be read."""
    found = _cpu_hierarchy()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (found is not None and found[1] == 2 and controllers == "") or "cpu" in controllers.split(","):
            return path
    return None
