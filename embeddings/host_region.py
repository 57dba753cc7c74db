"""One contiguous range of address space that holds a table-batched kernel's rows, each table mapped in place.

fbgemm's table-batched kernel reads every table of a collection from one host buffer, at a byte offset per table.
`HostRegion` reserves that range (no memory is committed) and places each table at a page-aligned offset in it:
either its row file, memory-mapped read-only and shared (`mmap` storage: only the pages that lookups touch become
resident, and the kernel's page cache is shared by every process mapping the file and kept across reloads of an
unchanged file), or anonymous shared memory filled from the file (`memory` storage: resident and shared with the
processes forked after it, so `--workers N` keep one copy). The kernel then reads the rows in place through one
tensor over the whole range. Linux and other POSIX systems with `mmap(MAP_FIXED)`; the mappings are released when
the last reference to the range's tensor goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["HostRegion", "PAGE_SIZE", "page_round"]

PAGE_SIZE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # linux/mman.h (x86, arm, riscv)
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def page_round(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def _libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    result = _LIBC.mmap(addr, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return int(result)


def _unmap(base: int, length: int) -> None:
    _LIBC.munmap(base, length)


class HostRegion:
    """`size` bytes of address space, reserved at construction; tables are placed in it with `map_file` and
    `map_memory` at page-aligned offsets, and read through `tensor()`.

    Args:
        size: bytes to reserve (rounded up to pages).
    """

    def __init__(self, size: int) -> None:
        self.size = page_round(max(size, 1))
        self.base = _mmap(None, self.size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self._finalizer = weakref.finalize(self, _unmap, self.base, self.size)

    def map_file(self, offset: int, length: int, fd: int, file_offset: int, *, copy_on_write: bool = False) -> None:
        """Maps `length` bytes of a file, from `file_offset` (page-aligned), at `offset`: read-only and shared, or
        with `copy_on_write` private and writable: reads still come from the shared page cache, and a page written
        becomes this process's own copy (the file never changes). No swap is reserved for the copies
        (MAP_NORESERVE): only the pages written cost memory."""
        self._check(offset, length)
        if copy_on_write:
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_NORESERVE
        else:
            prot, flags = mmap.PROT_READ, mmap.MAP_SHARED
        _mmap(self.base + offset, page_round(length), prot, flags | _MAP_FIXED, fd, file_offset)

    def map_memory(self, offset: int, length: int) -> memoryview:
        """Places `length` bytes of anonymous shared memory at `offset` (shared with processes forked afterwards)
        and returns it, writable, to be filled."""
        self._check(offset, length)
        size = page_round(length)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        _mmap(self.base + offset, size, prot, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_FIXED)
        return memoryview((ctypes.c_uint8 * length).from_address(self.base + offset)).cast("B")

    def _check(self, offset: int, length: int) -> None:
        if offset % PAGE_SIZE or offset < 0 or offset + length > self.size:
            raise ValueError(f"{length} bytes at {offset} do not fit a page-aligned place in {self.size} bytes")

    def tensor(self) -> torch.Tensor:
        """A `uint8` tensor over the whole range (no copy); the range stays mapped while it is referenced."""
        import torch

        array = (ctypes.c_uint8 * self.size).from_address(self.base)
        array.region = self  # type: ignore[attr-defined]  # the tensor keeps the array, the array keeps the region
        return torch.frombuffer(array, dtype=torch.uint8)

    def resident_bytes(self, offset: int, length: int) -> int:
        """Bytes of `[offset, offset + length)` resident in memory now (the page cache, for a file), by mincore."""
        if length <= 0:
            return 0
        pages = page_round(length) // PAGE_SIZE
        vector = np.zeros(pages, dtype=np.uint8)
        if _LIBC.mincore(self.base + offset, pages * PAGE_SIZE, vector.ctypes.data) != 0:
            return 0
        return int(np.count_nonzero(vector & 1)) * PAGE_SIZE

    def advise(self, offset: int, length: int, advice: int) -> None:
        """`madvise` over part of the range (e.g. MADV_RANDOM for tables read a row at a time)."""
        _LIBC.madvise(self.base + offset, page_round(length), advice)

    def release(self) -> None:
        """Unmaps the range now (only when no tensor over it is in use)."""
        self._finalizer()

    def on_release(self, callback: Callable[[], None]) -> None:
        weakref.finalize(self, callback)
