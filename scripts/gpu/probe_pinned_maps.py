"""What backs the GPU loader's pinned staging buffers in /proc/PID/maps (runtime/discard.py
punches holes in their memfds before a dump): one line per buffer, the memfd mappings, and
what `discard.shmem_ranges` punches. Run on the GPU machine with torch; prints JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

# the checkout's module, by path (standard library only): nothing needs installing
_spec = importlib.util.spec_from_file_location("discard", "runtime/discard.py")
assert _spec is not None and _spec.loader is not None
discard = importlib.util.module_from_spec(_spec)
sys.modules["discard"] = discard  # dataclasses look their module up
_spec.loader.exec_module(discard)

torch.zeros(1, device="cuda")
bufs = [torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(14)]
for b in bufs:
    b.fill_(7)
ranges = [(b.data_ptr(), 8 << 20) for b in bufs]
with open("/proc/self/maps") as f:
    maps = discard.parse_maps(f.read())
over = []
for a, n in ranges:
    hit = [m for m in maps if m.start < a + n and a < m.end]
    over.append([(hex(a), hex(m.start), hex(m.end), m.shared, m.path, hex(m.offset)) for m in hit])
memfds = [(hex(m.start), hex(m.end), m.shared, m.path, hex(m.offset)) for m in maps if "memfd" in m.path]
punched = discard.shmem_ranges(os.getpid(), ranges)
doc = {"torch": torch.__version__, "over": over, "memfds": memfds[:40], "punched": punched}
print(json.dumps(doc, indent=1))
