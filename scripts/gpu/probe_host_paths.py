"""Where the GPU loader's host-side time goes, and whether pinned memory shared between processes
could take the page cache's place (issue 22, the loader line).

The loader reaches 60-68% of the pinned host-to-device bound inside a restore, while each half
of its pipeline alone (reads into pinned buffers, copies out of them) reaches 81-89%. Two
questions, answered with the CUDA driver API alone (ctypes, no torch, no vLLM: this runs on a
bare GPU machine in a few seconds):

1. Do host-memory reads and the device's reads of pinned memory slow each other down? Page-cache
   reads into pinned buffers, and plain memory copies, each alone and while a copy engine streams
   pinned memory to the device.
2. Can one process hold the weights in pinned host memory (`cuMemCreate` on the host, exported
   as a file descriptor) that another process maps and copies from at the bound, without pinning
   anything itself (pinning costs about as much as the copy it serves)? The import and map time,
   the copy rate, and whether the CPU can write the memory directly.

Run there: python3 scripts/gpu/probe_host_paths.py OUT.json [--file-gb 4]. Writes one JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 8 * MiB

cu = ctypes.CDLL("libcuda.so.1")
P = ctypes.c_void_p
U64 = ctypes.c_uint64
SZ = ctypes.c_size_t


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class AllocProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", Location),
        ("win32HandleMetaData", P),
        ("allocFlags", AllocFlags),
    ]


class AccessDesc(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


LOC_DEVICE, LOC_HOST, LOC_HOST_NUMA = 1, 2, 3
POSIX_FD = 1
RW = 3


def ck(r: int, what: str) -> None:
    if r:
        name = ctypes.c_char_p()
        cu.cuGetErrorName(r, ctypes.byref(name))
        raise RuntimeError(f"{what}: {name.value.decode() if name.value else r}")


_ctx = P()


def init() -> int:
    ck(cu.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ck(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(_ctx), dev), "retain")
    ck(cu.cuCtxSetCurrent(_ctx), "set ctx")
    return dev.value


def here() -> None:
    """Make the primary context current in this thread."""
    ck(cu.cuCtxSetCurrent(_ctx), "set ctx")


def attr(dev: int, a: int) -> int | str:
    v = ctypes.c_int()
    r = cu.cuDeviceGetAttribute(ctypes.byref(v), a, dev)
    return v.value if r == 0 else f"error {r}"


def host_alloc(n: int) -> int:
    p = P()
    ck(cu.cuMemHostAlloc(ctypes.byref(p), SZ(n), 0), "cuMemHostAlloc")
    return int(p.value)


def dev_alloc(n: int) -> int:
    p = U64()
    ck(cu.cuMemAlloc_v2(ctypes.byref(p), SZ(n)), "cuMemAlloc")
    return p.value


def stream() -> int:
    s = P()
    ck(cu.cuStreamCreate(ctypes.byref(s), 1), "cuStreamCreate")  # non-blocking
    return int(s.value)


def copy(dst: int, src: int, n: int, s: int) -> None:
    ck(cu.cuMemcpyAsync(U64(dst), U64(src), SZ(n), P(s)), "cuMemcpyAsync")


def sync(s: int) -> None:
    ck(cu.cuStreamSynchronize(P(s)), "sync")


def h2d_rate(src: int, dst: int, n: int, s: int, chunk: int = CHUNK, reps: int = 3) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for off in range(0, n, chunk):
            copy(dst + off, src + off, min(chunk, n - off), s)
        sync(s)
        out.append(round(n / (time.perf_counter() - t) / 1e9, 2))
    return out


class Streamer:
    """Copies a pinned buffer to the device over and over until stopped: the copy engine's load."""

    def __init__(self, src: int, dst: int, n: int) -> None:
        self.src, self.dst, self.n = src, dst, n
        self.stop = threading.Event()
        self.bytes = 0
        self.seconds = 0.0
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        here()
        s = stream()
        t = time.perf_counter()
        while not self.stop.is_set():
            for off in range(0, self.n, CHUNK):
                copy(self.dst + off, self.src + off, CHUNK, s)
            sync(s)
            self.bytes += self.n
        self.seconds = time.perf_counter() - t

    def __enter__(self) -> Streamer:
        self.th.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *a: Any) -> None:
        self.stop.set()
        self.th.join()

    def gbps(self) -> float:
        return round(self.bytes / max(self.seconds, 1e-9) / 1e9, 2)


def read_file(path: str, threads: int, bufs: list[int]) -> float:
    """Every 8 MiB span of the file read by `threads` threads into their pinned buffers; GB/s."""
    size = os.path.getsize(path)
    todo: queue.Queue[int] = queue.Queue()
    for off in range(0, size, CHUNK):
        todo.put(off)
    fd = os.open(path, os.O_RDONLY)

    def work(k: int) -> None:
        mv = memoryview((ctypes.c_char * CHUNK).from_address(bufs[k])).cast("B")
        while True:
            try:
                off = todo.get_nowait()
            except queue.Empty:
                return
            os.preadv(fd, [mv], off)

    ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    sec = time.perf_counter() - t
    os.close(fd)
    return round(size / sec / 1e9, 2)


def read_file_mapped(path: str, threads: int, bufs: list[int]) -> float:
    """The same, through a fresh read-only mapping of the file and a user-space copy (glibc's
    memmove, which streams large copies past the cache) instead of preadv's kernel copy; the
    mapping's page faults included. GB/s."""
    import mmap

    size = os.path.getsize(path)
    todo: queue.Queue[int] = queue.Queue()
    for off in range(0, size, CHUNK):
        todo.put(off)
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # private: from_buffer wants it writable
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)

    def work(k: int) -> None:
        while True:
            try:
                off = todo.get_nowait()
            except queue.Empty:
                return
            ctypes.memmove(bufs[k], addr + off, min(CHUNK, size - off))

    ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    sec = time.perf_counter() - t
    del anchor
    mm.close()
    os.close(fd)
    return round(size / sec / 1e9, 2)


def memmove_rate(threads: int, seconds: float = 1.0, per: int = 256 * MiB) -> float:
    """`threads` threads copying 256 MiB regions of ordinary memory for `seconds`; GB/s copied."""
    regions = []
    for _ in range(threads):
        a = ctypes.create_string_buffer(per)
        b = ctypes.create_string_buffer(per)
        ctypes.memset(a, 1, per)
        ctypes.memset(b, 2, per)
        regions.append((a, b))
    stop = threading.Event()
    done = [0] * threads

    def work(k: int) -> None:
        a, b = regions[k]
        while not stop.is_set():
            ctypes.memmove(b, a, per)
            done[k] += per

    ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in ths:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in ths:
        th.join()
    return round(sum(done) / (time.perf_counter() - t) / 1e9, 2)


def host_vmm_prop(loc_type: int, loc_id: int, handle: int = POSIX_FD) -> AllocProp:
    prop = AllocProp()
    prop.type = 1  # pinned
    prop.requestedHandleTypes = handle
    prop.location.type = loc_type
    prop.location.id = loc_id
    return prop


def vmm_map(handle: int, n: int, dev: int, cpu_loc: tuple[int, int] | None) -> int:
    va = U64()
    ck(cu.cuMemAddressReserve(ctypes.byref(va), SZ(n), SZ(0), U64(0), U64(0)), "reserve")
    ck(cu.cuMemMap(va, SZ(n), SZ(0), U64(handle), U64(0)), "map")
    descs = [AccessDesc(Location(LOC_DEVICE, dev), RW)]
    if cpu_loc is not None:
        descs.append(AccessDesc(Location(*cpu_loc), RW))
    arr = (AccessDesc * len(descs))(*descs)
    ck(cu.cuMemSetAccess(va, SZ(n), arr, SZ(len(descs))), "setAccess")
    return va.value


def child_import(fd: int, n: int, loc: list[int], cpu: bool) -> dict[str, Any]:
    """In a fresh process: import the exported host memory, map it, copy it to the device."""
    dev = init()
    out: dict[str, Any] = {}
    t = time.perf_counter()
    h = U64()
    ck(cu.cuMemImportFromShareableHandle(ctypes.byref(h), P(fd), POSIX_FD), "import")
    out["import_s"] = round(time.perf_counter() - t, 5)
    t = time.perf_counter()
    va = vmm_map(h.value, n, dev, tuple(loc) if cpu else None)  # type: ignore[arg-type]
    out["map_s"] = round(time.perf_counter() - t, 5)
    d = dev_alloc(n)
    s = stream()
    out["copy_gbps_8mib"] = h2d_rate(va, d, n, s)
    out["copy_gbps_64mib"] = h2d_rate(va, d, n, s, chunk=64 * MiB)
    out["copy_gbps_whole"] = h2d_rate(va, d, n, s, chunk=n)
    pin = host_alloc(4096)
    ck(cu.cuMemcpyDtoH_v2(P(pin), U64(d + n - 4096), SZ(4096)), "dtoh")
    out["tail_ok"] = ctypes.string_at(pin, 4096) == bytes([0x5A]) * 4096
    if cpu:
        t = time.perf_counter()
        out["cpu_read_ok"] = ctypes.string_at(va + n - 4096, 4096) == bytes([0x5A]) * 4096
        ctypes.memset(va, 0x11, 64 * MiB)
        out["cpu_write_64mib_s"] = round(time.perf_counter() - t, 5)
    t = time.perf_counter()
    ck(cu.cuMemUnmap(U64(va), SZ(n)), "unmap")
    ck(cu.cuMemAddressFree(U64(va), SZ(n)), "free va")
    ck(cu.cuMemRelease(h), "release")
    out["unmap_release_s"] = round(time.perf_counter() - t, 5)
    return out


def child_no_context(n: int, loc: list[int]) -> dict[str, Any]:
    """Whether a process can make and export such memory without a CUDA context (a context holds
    device memory: a holder process without one costs the GPU nothing)."""
    out: dict[str, Any] = {}
    ck(cu.cuInit(0), "cuInit")
    try:
        prop = host_vmm_prop(*loc)
        h = U64()
        ck(cu.cuMemCreate(ctypes.byref(h), SZ(n), ctypes.byref(prop), U64(0)), "cuMemCreate")
        out["create"] = "ok"
        fd = ctypes.c_int(-1)
        ck(cu.cuMemExportToShareableHandle(ctypes.byref(fd), U64(h.value), POSIX_FD, U64(0)), "export")
        out["export"] = "ok"
        va = U64()
        ck(cu.cuMemAddressReserve(ctypes.byref(va), SZ(n), SZ(0), U64(0), U64(0)), "reserve")
        ck(cu.cuMemMap(va, SZ(n), SZ(0), U64(h.value), U64(0)), "map")
        arr = (AccessDesc * 1)(AccessDesc(Location(*loc), RW))
        ck(cu.cuMemSetAccess(va, SZ(n), arr, SZ(1)), "setAccess (CPU only)")
        ctypes.memset(va.value, 0x33, n)
        out["cpu_fill"] = "ok"
    except Exception as e:
        out["error"] = repr(e)[:300]
    cur = P()
    cu.cuCtxGetCurrent(ctypes.byref(cur))
    out["context_after"] = bool(cur.value)
    return out


def run_child(args: list[str], fds: tuple[int, ...] = ()) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, pass_fds=fds, timeout=120
    )
    if r.returncode:
        return {"error": f"rc {r.returncode}: {r.stderr[-800:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def host_vmm(dev: int, n: int, numa: int, pinned: int, doc: dict[str, Any]) -> None:
    """Pinned host memory made once, exported as a descriptor, mapped by another process."""
    for name, loc in (("host_numa", (LOC_HOST_NUMA, max(numa, 0))), ("host", (LOC_HOST, 0))):
        res: dict[str, Any] = {}
        doc["host_vmm"][name] = res
        try:
            prop = host_vmm_prop(*loc)
            g = SZ()
            ck(cu.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0), "granularity")
            res["granularity"] = g.value
            size = (n + g.value - 1) // g.value * g.value
            t = time.perf_counter()
            h = U64()
            ck(cu.cuMemCreate(ctypes.byref(h), SZ(size), ctypes.byref(prop), U64(0)), "cuMemCreate")
            res["create_s"] = round(time.perf_counter() - t, 4)
            res["create_gbps"] = round(size / (time.perf_counter() - t) / 1e9, 2)
            # CPU access from this process, if the driver grants it
            cpu_ok = True
            try:
                va = vmm_map(h.value, size, dev, loc)
            except RuntimeError as e:
                res["cpu_access_error"] = str(e)
                cpu_ok = False
                va = vmm_map(h.value, size, dev, None)
            res["cpu_access_granted"] = cpu_ok
            s = stream()
            ctypes.memset(pinned, 0x5A, CHUNK)
            t = time.perf_counter()
            for off in range(0, size, CHUNK):
                copy(va + off, pinned, min(CHUNK, size - off), s)
            sync(s)
            res["fill_by_copy_gbps"] = round(size / (time.perf_counter() - t) / 1e9, 2)
            d = dev_alloc(size)
            res["same_process_copy_gbps"] = h2d_rate(va, d, size, s)
            fd = ctypes.c_int(-1)
            ck(cu.cuMemExportToShareableHandle(ctypes.byref(fd), U64(h.value), POSIX_FD, U64(0)), "export")
            res["child"] = run_child(
                ["child-import", str(fd.value), str(size), json.dumps(list(loc)), "0"], (fd.value,)
            )
            res["no_context"] = run_child(["child-no-context", str(g.value * 16), json.dumps(list(loc))])
            if cpu_ok:
                res["child_cpu"] = run_child(
                    ["child-import", str(fd.value), str(size), json.dumps(list(loc)), "1"], (fd.value,)
                )
            os.close(fd.value)
            ck(cu.cuMemFree_v2(U64(d)), "free")
            ck(cu.cuMemUnmap(U64(va), SZ(size)), "unmap")
            ck(cu.cuMemAddressFree(U64(va), SZ(size)), "free va")
            ck(cu.cuMemRelease(h), "release")
        except Exception as e:  # each path on its own: one failing says why, the rest still run
            res["error"] = repr(e)[:400]


def main() -> int:
    if sys.argv[1] == "child-no-context":
        print(json.dumps(child_no_context(int(sys.argv[2]), json.loads(sys.argv[3]))))
        return 0
    if sys.argv[1] == "child-import":
        fd, n, loc, cpu = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "1"
        print(json.dumps(child_import(fd, n, loc, cpu)))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--file-gb", type=float, default=4.0)
    ap.add_argument("--file", default="/var/tmp/probe-host-paths.bin")
    a = ap.parse_args()
    doc: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    dev = init()
    name = ctypes.create_string_buffer(100)
    cu.cuDeviceGetName(name, 100, dev)
    drv = ctypes.c_int()
    cu.cuDriverGetVersion(ctypes.byref(drv))
    doc["device"] = name.value.decode()
    doc["driver_api"] = drv.value
    doc["attrs"] = {
        k: attr(dev, v)
        for k, v in {
            "host_register": 99,
            "vmm": 102,
            "posix_fd": 103,
            "read_only_host_register": 113,
            "pageable_uses_host_page_tables": 100,
            "host_numa_id": 134,
            "host_numa_vmm": 141,
            "host_vmm": 145,
        }.items()
    }

    def save() -> None:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)

    n = 1 * GiB
    src = host_alloc(n)
    ctypes.memset(src, 7, n)
    dst = dev_alloc(n)
    s = stream()
    doc["pinned_bound_gbps"] = {"8mib": h2d_rate(src, dst, n, s), "whole": h2d_rate(src, dst, n, s, chunk=n)}
    save()
    # the weight file stand-in: written once, then read from the page cache
    size = int(a.file_gb * GiB) // CHUNK * CHUNK
    if not os.path.exists(a.file) or os.path.getsize(a.file) != size:
        with open(a.file, "wb") as f:
            block = os.urandom(CHUNK)
            for _ in range(size // CHUNK):
                f.write(block)
    bufs = [host_alloc(CHUNK) for _ in range(16)]
    read_file(a.file, 16, bufs)  # into the page cache
    dst2 = dev_alloc(n)
    contention: dict[str, Any] = {}
    doc["contention"] = contention
    for th in (8, 12, 16):
        for how, fn in (("reads", read_file), ("mapped", read_file_mapped)):
            alone = [fn(a.file, th, bufs) for _ in range(2)]
            with Streamer(src, dst2, n) as st:
                under = [fn(a.file, th, bufs) for _ in range(2)]
            contention[f"{how}_{th}"] = {"alone": alone, "with_dma": under, "dma_meanwhile": st.gbps()}
            save()
    # the page cache as a restore finds it: filled by reads (the prefetch), not by writing
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        contention["refilled_by_reads_gbps"] = read_file(a.file, 16, bufs)
        for th in (12, 16):
            for how, fn in (("reads", read_file), ("mapped", read_file_mapped)):
                alone = [fn(a.file, th, bufs) for _ in range(2)]
                with Streamer(src, dst2, n) as st:
                    under = [fn(a.file, th, bufs) for _ in range(2)]
                contention[f"{how}_{th}_refilled"] = {
                    "alone": alone,
                    "with_dma": under,
                    "dma_meanwhile": st.gbps(),
                }
        save()
    except OSError as e:
        contention["refilled_error"] = repr(e)
    for th in (4, 8, 12):
        alone = memmove_rate(th)
        with Streamer(src, dst2, n) as st:
            under = memmove_rate(th)
        contention[f"memmove_{th}"] = {"alone": alone, "with_dma": under, "dma_meanwhile": st.gbps()}
        save()
    # registering ordinary memory, for scale (the loader's pinned pool is made before a snapshot)
    reg = ctypes.create_string_buffer(GiB)
    ctypes.memset(reg, 0, GiB)
    t = time.perf_counter()
    r = cu.cuMemHostRegister_v2(P(ctypes.addressof(reg)), SZ(GiB), 0)
    doc["register_1gib"] = {"rc": r, "gbps": round(GiB / (time.perf_counter() - t) / 1e9, 2)}
    if r == 0:
        cu.cuMemHostUnregister(P(ctypes.addressof(reg)))
    doc["host_vmm"] = {}
    numa = doc["attrs"]["host_numa_id"]
    host_vmm(dev, 2 * GiB, numa if isinstance(numa, int) else 0, bufs[0], doc)
    save()
    os.unlink(a.file)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
