"""The snapshot's last step: a trial restore that learns the hot set, and proves the snapshot
restores.

Why: the first restore of a snapshot on a host has no hot set (restore.hotset): from a cold
page cache its tree faults its pages in one by one, and that first restore took about twice
as long as the later ones. The snapshot's own host can learn the set right away: restore the
just-published snapshot once, its page images evicted from the page cache first (a restore
learns only from a tree that faulted its page images in from the disk: restore.pipeline
_Faults), let it learn and save the set as every first restore does, then stop the tree.
Every later restore, the first included, reads the set ahead. The trial's canary also shows
the snapshot reproduces its server on this host before the command reports success.

It runs on the snapshot's undo stack: a failure or Ctrl-C during it stops the trial's tree
(and the restore's own stack undoes what the restore had started). The published snapshot is
kept either way: it is whole, and the error says how to retry or skip the trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastvllm.runtime import journal, manifest, proctree
from fastvllm.runtime.errors import FastVLLMError
from fastvllm.runtime.timeline import Timeline

PHASE = "learn_hot_set"
STOP_GRACE_S = 1.0


def trial_restore(op: journal.Operation, out: Path, m: manifest.Manifest, tl: Timeline) -> dict[str, Any]:
    """Evict the snapshot's page images, restore it (learning its hot set), stop the tree;
    returns what the trial saw (its time to first completion, the hot set's size)."""
    # snapshot/ and restore/ are siblings: the restore pipeline is imported only when a
    # snapshot runs this step.
    from fastvllm.prefetch import warm
    from fastvllm.restore import hotset
    from fastvllm.restore.pipeline import RestoreOptions, restore_snapshot

    with tl.phase(PHASE):
        # fdatasync, then DONTNEED: the images were just written and may be dirty still
        evicted = warm.evict(sorted((out / "criu").glob("pages-*.img")))
        # The trial's tree is thrown away: it gets STOP_GRACE_S to exit before SIGKILL (vLLM's
        # own shutdown takes seconds); its /dev/shm files are removed either way.
        pids = list(m.server.tree_pids)
        stop = op.undo("stop_tree", pids=pids, started=proctree.ticks_now(), grace=STOP_GRACE_S)
        try:
            r = restore_snapshot(RestoreOptions(out))
        except FastVLLMError as e:
            e.message = f"snapshot {out} was written, but its trial restore failed: {e.message}"
            retry = f"the snapshot is kept: 'fastvllm restore {out}' tries again, --no-learn skips the trial"
            e.hint = f"{e.hint}; {retry}" if e.hint else retry
            raise
        stop.now()
    hot = hotset.load(out, {f.path: f.size for f in m.files})
    return {
        "restored": True,
        "canary_ok": r.canary_ok,
        "time_to_first_completion_s": round(r.time_to_first_completion_s, 4),
        "criu_restore": r.criu_restore,
        "evicted_bytes": evicted,
        "hot_set_learned": hot is not None,
        "hot_set_bytes": hot.bytes if hot is not None else 0,
    }
