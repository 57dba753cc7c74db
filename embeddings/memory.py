"""Giving freed memory back to the operating system (glibc's `malloc_trim`), shared by the model build and the
server. Torch-free."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    return trim


def release_free_memory() -> None:
    """Returns the heap's free pages to the OS: after a burst of large buffers (a model build's temporaries, large
    requests) the freed arenas would otherwise stay resident. A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
