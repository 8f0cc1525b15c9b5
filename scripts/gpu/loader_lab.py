"""Loader lab on the GPU machine: fresh-process warm loads of one flat weight file, several ways
(staged pinned pool = fastvllm.weights.loader.load, cudaHostRegister over an mmap of the page
cache, pageable copies, per-thread double buffers). Produced results/weights/lab-h200.json.
Run there: python3 loader_lab.py FILE OUT.json [SPECS_JSON]."""

import json
import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path


def child(spec):
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    from fastvllm.weights import fileformat, loader

    path = Path(spec["path"])
    strat = spec["strat"]
    t0 = time.perf_counter()
    info = {}
    if strat == "stage":
        _out, st = loader.load(
            path, "cuda", threads=spec["threads"], chunk=spec["chunk"], buffers=spec.get("buffers")
        )
        torch.cuda.synchronize()
        info["pin_s"] = st.pin_s
    elif strat in ("regmap", "pageable"):
        idx = fileformat.read_index(path)
        n = idx.file_size - idx.data_offset
        fd = os.open(path, os.O_RDONLY)
        mm = mmap.mmap(fd, idx.file_size, mmap.MAP_SHARED, mmap.PROT_READ)
        base = torch.frombuffer(mm, dtype=torch.uint8)  # read-only warning ok
        arena = torch.empty(n, dtype=torch.uint8, device="cuda")
        chunk = spec["chunk"]
        threads = spec["threads"]
        offs = list(range(0, n, chunk))
        cudart = torch.cuda.cudart()
        if strat == "regmap":
            todo = queue.Queue()
            [todo.put(o) for o in offs]
            ready = queue.Queue()
            reg_s = [0.0]

            def reg():
                while True:
                    try:
                        o = todo.get_nowait()
                    except queue.Empty:
                        return
                    ln = min(chunk, n - o)
                    p = base.data_ptr() + idx.data_offset + o
                    t = time.perf_counter()
                    err = cudart.cudaHostRegister(p, ln, spec.get("flags", 8))
                    reg_s[0] += time.perf_counter() - t
                    ready.put((o, ln, p, int(err)))

            ths = [threading.Thread(target=reg) for _ in range(threads)]
            [t.start() for t in ths]
            s = torch.cuda.Stream()
            evs = []
            with torch.cuda.stream(s):
                for _ in offs:
                    o, ln, p, err = ready.get()
                    if err:
                        raise RuntimeError(f"register err {err}")
                    src = base[idx.data_offset + o : idx.data_offset + o + ln]
                    arena[o : o + ln].copy_(src, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(s)
                    evs.append((ev, p))
            s.synchronize()
            t_copy = time.perf_counter() - t0
            for _ev, p in evs:
                cudart.cudaHostUnregister(p)
            info["reg_s_sum"] = reg_s[0]
            info["t_before_unreg"] = t_copy
        else:

            def work(k):
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    for o in offs[k::threads]:
                        ln = min(chunk, n - o)
                        arena[o : o + ln].copy_(
                            base[idx.data_offset + o : idx.data_offset + o + ln], non_blocking=True
                        )
                s.synchronize()

            ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
            [t.start() for t in ths]
            [t.join() for t in ths]
        torch.cuda.synchronize()
    elif strat == "perthread":
        import itertools

        idx = fileformat.read_index(path)
        n = idx.file_size - idx.data_offset
        arena = torch.empty(n, dtype=torch.uint8, device="cuda")
        fd = os.open(path, os.O_RDONLY)
        counter = itertools.count()
        chunk = spec["chunk"]
        errs = []

        def work():
            try:
                st = torch.cuda.Stream()
                bufs = []
                views = []
                evs = [None, None]
                k = 0
                while True:
                    off = next(counter) * chunk
                    if off >= n:
                        break
                    slot = k % 2
                    if len(bufs) <= slot:
                        bufs.append(torch.empty(chunk, dtype=torch.uint8, pin_memory=True))
                        views.append(memoryview(bufs[-1].numpy()))
                    elif evs[slot] is not None:
                        evs[slot].synchronize()
                    ln = min(chunk, n - off)
                    got = 0
                    while got < ln:
                        got += os.preadv(fd, [views[slot][got:ln]], idx.data_offset + off + got)
                    with torch.cuda.stream(st):
                        arena[off : off + ln].copy_(bufs[slot][:ln], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(st)
                    evs[slot] = ev
                    k += 1
                st.synchronize()
            except BaseException as e:
                errs.append(repr(e))

        ths = [threading.Thread(target=work) for _ in range(spec["threads"])]
        [t.start() for t in ths]
        [t.join() for t in ths]
        if errs:
            raise RuntimeError(errs[0])
        torch.cuda.synchronize()
    elif strat == "pin":
        t = time.perf_counter()
        torch.empty(spec["chunk"], dtype=torch.uint8, pin_memory=True)
        info["pin_gbps"] = spec["chunk"] / (time.perf_counter() - t) / 1e9
    sec = time.perf_counter() - t0
    size = fileformat.read_index(path).file_size
    return {"seconds": sec, "gbps": size / sec / 1e9, **info}


if __name__ == "__main__":
    if sys.argv[1] == "child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    path = sys.argv[1]
    out = sys.argv[2]
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL)
    M = 1 << 20
    specs = [
        {"strat": "pin", "chunk": 256 * M},
        {"strat": "stage", "threads": 12, "chunk": 8 * M},
        {"strat": "stage", "threads": 16, "chunk": 8 * M},
        {"strat": "stage", "threads": 16, "chunk": 16 * M, "buffers": 20},
        {"strat": "stage", "threads": 24, "chunk": 4 * M, "buffers": 28},
        {"strat": "regmap", "threads": 8, "chunk": 64 * M},
        {"strat": "regmap", "threads": 16, "chunk": 32 * M},
        {"strat": "regmap", "threads": 4, "chunk": 256 * M},
        {"strat": "regmap", "threads": 16, "chunk": 64 * M, "flags": 0},
        {"strat": "pageable", "threads": 8, "chunk": 64 * M},
        {"strat": "pageable", "threads": 16, "chunk": 16 * M},
    ]
    if len(sys.argv) > 3:
        specs = json.loads(sys.argv[3])
    res = []
    for sp in specs:
        sp["path"] = path
        runs = []
        for _ in range(3):
            prep = sp.get("prep", "none")
            if prep != "none":
                subprocess.run(["sync"])
                Path("/proc/sys/vm/drop_caches").write_text("3")
                if prep == "cat":
                    subprocess.run(["cat", path], stdout=subprocess.DEVNULL)
                else:
                    from fastvllm.weights.bench import read_parallel

                    read_parallel(Path(path), int(prep))
            r = subprocess.run(
                [sys.executable, __file__, "child", json.dumps(sp)], capture_output=True, text=True
            )
            if r.returncode:
                runs.append({"error": r.stderr[-600:]})
                break
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps({"spec": {k: v for k, v in sp.items() if k != "path"}, "runs": runs}), flush=True)
        res.append({"spec": sp, "runs": runs})
    Path(out).write_text(json.dumps(res, indent=1))
