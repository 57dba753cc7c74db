"""Admission in bytes: what a request costs in memory, the bounds on it, and decoding off the event loop.

A queued request holds its arrays and will produce `batch_size x output_dim x dtype size` bytes of response;
the batcher counts both against `batching.max_queue_bytes` (`request_bytes`). A response is held until it is
handed to the transport, which for a client that does not read (HTTP/2 window 0) is never: the `ResponseBudget`
counts response bytes from admission until sent, in total and per connection, and refuses calls beyond either
bound. The transport holds a copy of a response it cannot send, so the memory they cost is about twice the
count. Large requests are decoded on a few threads (`OffloadDecoder`) so that they cannot stall the event loop.
Defaults of the byte bounds are fractions of the host's physical memory (`memory_default`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from .config import ServerConfig
from .errors import Overloaded
from .request import SparseRequest

__all__ = [
    "OUTPUT_ITEMSIZE",
    "Bounds",
    "OffloadDecoder",
    "ResponseBudget",
    "bounds_of",
    "memory_default",
    "physical_memory",
    "release_free_memory",
    "request_bytes",
    "response_bytes",
]

MiB = 1 << 20
GiB = 1 << 30
OUTPUT_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# (fraction of physical memory, floor, cap) of each byte bound's default.
QUEUE_BYTES_DEFAULT = (1 / 32, 64 * MiB, 512 * MiB)
RESPONSE_BYTES_DEFAULT = (1 / 64, 16 * MiB, 256 * MiB)
PENDING_BYTES_DEFAULT = (1 / 64, 64 * MiB, 256 * MiB)
PENDING_PER_CONNECTION_DEFAULT = (1 / 128, 32 * MiB, 128 * MiB)

T = TypeVar("T")


def physical_memory() -> int:
    """The host's physical memory in bytes (4 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 4 * GiB


def memory_default(rule: tuple[float, int, int], memory: int | None = None) -> int:
    """`fraction x physical memory`, kept within [floor, cap]."""
    fraction, floor, cap = rule
    return int(min(cap, max(floor, fraction * (physical_memory() if memory is None else memory))))


def response_bytes(batch_size: int, output_dim: int, output_dtype: str) -> int:
    """The bytes of the embeddings a request of `batch_size` examples is answered with."""
    return batch_size * output_dim * OUTPUT_ITEMSIZE[output_dtype]


def request_bytes(request: SparseRequest, output_dim: int) -> int:
    """What a queued request holds and will produce: its arrays and its response."""
    held = request.lengths.nbytes + request.values.nbytes + request.key_index.nbytes
    if request.weights is not None:
        held += request.weights.nbytes
    return held + response_bytes(request.batch_size, output_dim, request.output_dtype)


class Bounds:
    """The byte bounds of a server config, with the host-memory defaults resolved."""

    def __init__(self, config: ServerConfig, memory: int | None = None) -> None:
        limits = config.limits
        self.max_queue_bytes = config.batching.max_queue_bytes or memory_default(QUEUE_BYTES_DEFAULT, memory)
        self.max_response_bytes = limits.max_response_bytes or memory_default(RESPONSE_BYTES_DEFAULT, memory)
        self.max_pending_response_bytes = limits.max_pending_response_bytes or memory_default(
            PENDING_BYTES_DEFAULT, memory
        )
        self.max_pending_response_bytes_per_connection = (
            limits.max_pending_response_bytes_per_connection or memory_default(PENDING_PER_CONNECTION_DEFAULT, memory)
        )


def bounds_of(config: ServerConfig) -> Bounds:
    return Bounds(config)


class ResponseBudget:
    """Response bytes of admitted calls not yet handed to the transport, in total and per connection (gRPC's peer
    address). A call reserves its response's size once decoded (`reserve`), before it is queued, and releases it
    when the write that sends the response returns (`release`), so a burst of calls cannot all pass before any
    response exists. A response larger than a bound is still taken when nothing else is counted against it."""

    def __init__(self, max_total: int, max_per_connection: int) -> None:
        self.max_total = max_total
        self.max_per_connection = max_per_connection
        self.total = 0
        self._by_peer: dict[str, int] = {}

    def pending(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def reserve(self, peer: str, nbytes: int) -> None:
        """Counts `nbytes` for `peer`, or raises `Overloaded` naming the bound it would pass."""
        if self.total and self.total + nbytes > self.max_total:
            raise Overloaded(
                f"{self.total} response bytes are waiting to be computed or sent and this call needs {nbytes}, over "
                f"the server's max_pending_response_bytes {self.max_total}; retry later"
            )
        held = self._by_peer.get(peer, 0)
        if held and held + nbytes > self.max_per_connection:
            raise Overloaded(
                f"{held} response bytes are waiting to be computed or sent on this connection and this call needs "
                f"{nbytes}, over the server's max_pending_response_bytes_per_connection {self.max_per_connection}; "
                "read the answers before sending more"
            )
        self.total += nbytes
        self._by_peer[peer] = held + nbytes

    @contextlib.contextmanager
    def held(self, peer: str, nbytes: int) -> Iterator[None]:
        """`reserve` on entry, `release` on exit however the block ends."""
        self.reserve(peer, nbytes)
        try:
            yield
        finally:
            self.release(peer, nbytes)

    def release(self, peer: str, nbytes: int) -> None:
        self.total -= nbytes
        left = self._by_peer[peer] - nbytes
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]


class OffloadDecoder:
    """Runs the decoding of large requests on `threads` threads instead of the event loop, with at most
    `max_waiting` decodes queued or running; beyond it `Overloaded` at once. Small requests (under `min_bytes`)
    are decoded in place: a thread hop costs more than their decoding."""

    def __init__(self, *, min_bytes: int, threads: int, max_waiting: int) -> None:
        self.min_bytes = min_bytes
        self.max_waiting = max_waiting
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="embserve-decode")
        self.waiting = 0

    async def run(self, nbytes: int, decode: Callable[[], T]) -> T:
        if nbytes < self.min_bytes:
            return decode()
        if self.waiting >= self.max_waiting:
            raise Overloaded(
                f"{self.waiting} large requests are being decoded, the server's max_decode_queue; retry later"
            )
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode)
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> None:
    """Returns the heap's free pages to the OS (glibc `malloc_trim`): after a burst of large requests the freed
    arenas would otherwise stay resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
