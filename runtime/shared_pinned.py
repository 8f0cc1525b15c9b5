"""Pinned host memory that one process makes and others map for their GPU: the CUDA driver's
virtual memory calls, with the memory on the host's NUMA node, exported as a file descriptor.

Why: a restored worker's weight load copies each byte out of the page cache into a staging
buffer that the device then reads, and on the H100 hosts the two compete for host memory, so the
load stops at 60-68% of the pinned host-to-device bound. Memory made here is pinned once, by a
process that outlives restores (`fastvllm agent --hold`), and needs no CUDA context there (it costs
the GPU nothing). A restored worker imports the descriptor (70 µs), maps it for its device (16
ms) and copies out of it at 97-100% of the bound, pinning nothing itself; registering memory with
cudaHostRegister instead runs at 24 GB/s, slower than the copy it serves (docs/decisions/
pinned-pool.md, measured with scripts/gpu/probe_host_paths.py).

ctypes on libcuda.so.1 rather than cuda-python: these calls were measured in this form on the
H100 host, and the agent that holds the memory needs no CUDA toolkit of its own.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from fastvllm.runtime.errors import EnvironmentNotReadyError, PinnedMemoryError

_LOC_DEVICE, _LOC_HOST_NUMA = 1, 3  # CUmemLocationType
_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_ATTR_HOST_NUMA_ID = 134
_ATTR_HOST_NUMA_VMM = 141  # CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED

_U64 = ctypes.c_uint64
_SZ = ctypes.c_size_t


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_lib: Any = None


def _cuda() -> Any:
    """libcuda, initialised; EnvironmentNotReadyError where there is none."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise EnvironmentNotReadyError(
                "no CUDA driver on this host (libcuda.so.1)",
                hint="pinned weights are for GPU hosts; restore without --hold",
            ) from e
        _check(lib, lib.cuInit(0), "cuInit")
        _lib = lib
    return _lib


def _check(lib: Any, rc: int, what: str) -> None:
    if rc:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        code = name.value.decode() if name.value else str(rc)
        raise PinnedMemoryError(
            f"the CUDA driver refused {what} ({code})",
            hint="check nvidia-smi; holding weights needs a recent driver (580 was measured)",
        )


def _attr(lib: Any, attr: int, device: int = 0) -> int:
    v = ctypes.c_int()
    _check(lib, lib.cuDeviceGetAttribute(ctypes.byref(v), attr, device), "a device attribute")
    return v.value


def unavailable() -> str | None:
    """Why this host cannot share pinned memory this way, or None if it can."""
    try:
        lib = _cuda()
        if not _attr(lib, _ATTR_HOST_NUMA_VMM):
            return "the GPU's driver does not map host NUMA memory (CUDA virtual memory on the host)"
    except (EnvironmentNotReadyError, PinnedMemoryError) as e:
        return e.message
    return None


def _prop(lib: Any) -> _AllocProp:
    prop = _AllocProp()
    prop.type = _PINNED
    prop.requestedHandleTypes = _POSIX_FD
    prop.location.type = _LOC_HOST_NUMA
    prop.location.id = max(0, _attr(lib, _ATTR_HOST_NUMA_ID))  # -1 where the host has no NUMA
    return prop


def _map(lib: Any, handle: int, nbytes: int, access: list[_AccessDesc]) -> int:
    """Reserve an address range for `handle`'s memory, map it and grant `access`."""
    va = _U64()
    _check(
        lib,
        lib.cuMemAddressReserve(ctypes.byref(va), _SZ(nbytes), _SZ(0), _U64(0), _U64(0)),
        "an address range",
    )
    try:
        _check(lib, lib.cuMemMap(va, _SZ(nbytes), _SZ(0), _U64(handle), _U64(0)), "mapping the memory")
        try:
            descs = (_AccessDesc * len(access))(*access)
            _check(lib, lib.cuMemSetAccess(va, _SZ(nbytes), descs, _SZ(len(access))), "access to the memory")
        except Exception:
            lib.cuMemUnmap(va, _SZ(nbytes))
            raise
    except Exception:
        lib.cuMemAddressFree(va, _SZ(nbytes))
        raise
    return int(va.value)


@dataclass
class SharedPinned:
    """Pinned host memory this process made: `address` is its CPU mapping, `fd` the descriptor
    another process maps it by (pass it over a Unix socket), `nbytes` its size (rounded up to
    the driver's granularity)."""

    address: int
    nbytes: int
    fd: int
    _handle: int

    @classmethod
    def create(cls, nbytes: int) -> SharedPinned:
        """Make and pin `nbytes` (at about 6 GB/s on the H100 host: the driver zeroes and pins
        every page), mapped for this process's CPU. No CUDA context is made."""
        lib = _cuda()
        prop = _prop(lib)
        gran = _SZ()
        _check(
            lib, lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0), "a granularity"
        )
        size = max(1, -(-nbytes // gran.value)) * gran.value
        handle = _U64()
        _check(
            lib,
            lib.cuMemCreate(ctypes.byref(handle), _SZ(size), ctypes.byref(prop), _U64(0)),
            f"{size} bytes of pinned host memory",
        )
        try:
            cpu = _AccessDesc(_Location(_LOC_HOST_NUMA, prop.location.id), _READ_WRITE)
            address = _map(lib, handle.value, size, [cpu])
            fd = ctypes.c_int(-1)
            rc = lib.cuMemExportToShareableHandle(ctypes.byref(fd), _U64(handle.value), _POSIX_FD, _U64(0))
            if rc:
                lib.cuMemUnmap(_U64(address), _SZ(size))
                lib.cuMemAddressFree(_U64(address), _SZ(size))
                _check(lib, rc, "exporting the memory")
        except Exception:
            lib.cuMemRelease(handle)
            raise
        return cls(address, size, fd.value, handle.value)

    def close(self) -> None:
        """Unmap and release; the memory is freed once every process that mapped it let go."""
        if self.fd < 0:
            return
        lib = _cuda()
        lib.cuMemUnmap(_U64(self.address), _SZ(self.nbytes))
        lib.cuMemAddressFree(_U64(self.address), _SZ(self.nbytes))
        lib.cuMemRelease(_U64(self._handle))
        os.close(self.fd)
        self.fd = -1


@dataclass
class DeviceMapping:
    """Another process's shared pinned memory, mapped here for `device`: `address` is a device
    address the copy engine reads at the pinned bound."""

    address: int
    nbytes: int

    def close(self) -> None:
        """Unmap (after every copy out of it has completed)."""
        if not self.nbytes:
            return
        lib = _cuda()
        lib.cuMemUnmap(_U64(self.address), _SZ(self.nbytes))
        lib.cuMemAddressFree(_U64(self.address), _SZ(self.nbytes))
        self.nbytes = 0


def map_for_device(fd: int, nbytes: int, device: int) -> DeviceMapping:
    """Import memory exported by `SharedPinned.create` (the caller keeps `fd` and closes it)
    and map it for `device` (an ordinal as this process sees it). The mapping keeps the
    memory alive; the imported handle is released at once."""
    lib = _cuda()
    handle = _U64()
    _check(
        lib,
        lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _POSIX_FD),
        "importing the memory",
    )
    try:
        address = _map(lib, handle.value, nbytes, [_AccessDesc(_Location(_LOC_DEVICE, device), _READ_WRITE)])
    finally:
        lib.cuMemRelease(handle)
    return DeviceMapping(address, nbytes)


def copy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Copy `nbytes` from `src` to `dst` (device addresses, this process's context current) on
    `stream` (a CUstream handle, e.g. torch's `stream.cuda_stream`)."""
    lib = _cuda()
    _check(lib, lib.cuMemcpyAsync(_U64(dst), _U64(src), _SZ(nbytes), ctypes.c_void_p(stream)), "a copy")
