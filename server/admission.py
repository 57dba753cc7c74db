"""Admission in bytes: what a request costs in memory, the bounds on it, and decoding off the event loop.

A queued request holds its arrays and will produce `batch_size x output_dim x dtype size` bytes of response;
the batcher counts both against `batching.max_queue_bytes` (`request_bytes`). A response is held until it is
handed to the transport, which for a client that does not read (HTTP/2 window 0) is never: the `ResponseBudget`
counts response bytes from admission until sent, in total and per connection, and refuses calls beyond either
bound. The transport holds a copy of a response it cannot send, so the memory they cost is about twice the
count. Request messages are counted from before they are read until their call ends (`ReceiveBudget`). Large
requests are decoded on a few threads (`OffloadDecoder`) so that they cannot stall the event loop.
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
    "ReceiveBudget",
    "Reservation",
    "ResponseBudget",
    "bounds_of",
    "describe_default",
    "memory_default",
    "physical_memory",
    "release_free_memory",
    "worker_config",
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
RECEIVE_BYTES_DEFAULT = (1 / 64, 128 * MiB, 512 * MiB)
BATCH_BYTES_DEFAULT = (1 / 256, 32 * MiB, 128 * MiB)

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


def describe_default(rule: tuple[float, int, int]) -> str:
    """A default's rule in words, for help texts: `1/32 of physical memory, 64 MiB to 512 MiB`."""
    fraction, floor, cap = rule

    def size(n: int) -> str:
        return f"{n // GiB} GiB" if n % GiB == 0 else f"{n // MiB} MiB"

    return f"1/{round(1 / fraction)} of physical memory, {size(floor)} to {size(cap)}"


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
        self.max_batch_bytes = config.batching.max_batch_bytes or memory_default(BATCH_BYTES_DEFAULT, memory)
        self.max_response_bytes = limits.max_response_bytes or memory_default(RESPONSE_BYTES_DEFAULT, memory)
        self.max_pending_response_bytes = limits.max_pending_response_bytes or memory_default(
            PENDING_BYTES_DEFAULT, memory
        )
        self.max_pending_response_bytes_per_connection = (
            limits.max_pending_response_bytes_per_connection or memory_default(PENDING_PER_CONNECTION_DEFAULT, memory)
        )
        self.max_receive_bytes = limits.max_receive_bytes or max(
            memory_default(RECEIVE_BYTES_DEFAULT, memory), limits.max_message_bytes
        )


def worker_config(config: ServerConfig, workers: int) -> ServerConfig:
    """The config of one of `workers` processes serving together (`--workers N`): the server's byte bounds, as set
    or from the host's memory, shared among them, so that the workers together hold what one process would. The
    bounds of one request or one batch stay whole; a worker's receive budget holds at least one message."""
    if workers <= 1:
        return config
    b = Bounds(config)
    limits = config.limits.model_copy(
        update={
            "max_pending_response_bytes": max(1 << 16, b.max_pending_response_bytes // workers),
            "max_pending_response_bytes_per_connection": max(
                1 << 16, min(b.max_pending_response_bytes_per_connection, b.max_pending_response_bytes // workers)
            ),
            "max_receive_bytes": max(config.limits.max_message_bytes, b.max_receive_bytes // workers),
        }
    )
    batching = config.batching.model_copy(
        update={"max_queue_bytes": max(1 << 16, b.max_queue_bytes // workers), "max_batch_bytes": b.max_batch_bytes}
    )
    return config.model_copy(update={"limits": limits, "batching": batching})


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


class Reservation:
    """Bytes held in a `ReceiveBudget`: the largest message while a call's message is received, then the
    message's own size (`settle`) until the call ends (`release`, idempotent)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ReceiveBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def settle(self, nbytes: int) -> None:
        if nbytes < self.nbytes:
            self._budget.used -= self.nbytes - nbytes
            self.nbytes = nbytes

    def release(self) -> None:
        self._budget.used -= self.nbytes
        self.nbytes = 0


class ReceiveBudget:
    """Bytes of request messages held by calls in progress, at most `max_bytes`; beyond it a call is refused
    RESOURCE_EXHAUSTED at once.

    A call's handler runs once its headers arrive, usually before its message has: it reserves `slot` bytes, the
    largest message the server accepts, before reading (`reserve`), keeps the message's own size once read, and
    releases it when the call ends. A call refused here is reset before its message is read, so its client stops
    sending it. A LookupStream message is counted at its own size once read (`charge`), until it is queued or
    refused: a stream's next read stays posted while it waits, and reserving the largest message for it would
    let idle streams hold the budget."""

    def __init__(self, max_bytes: int, slot: int) -> None:
        if slot > max_bytes:
            raise ValueError(f"a receive budget of {max_bytes} bytes cannot hold one {slot}-byte message")
        self.max_bytes = max_bytes
        self.slot = slot
        self.used = 0

    def _refuse(self, nbytes: int, what: str) -> Overloaded:
        return Overloaded(
            f"{self.used} bytes of request messages are held by calls in progress and {what} {nbytes}, over the "
            f"server's max_receive_bytes {self.max_bytes}; retry later"
        )

    def reserve(self) -> Reservation:
        """Room for one call's message, or `Overloaded`."""
        if self.used and self.used + self.slot > self.max_bytes:
            raise self._refuse(self.slot, "a call reserves room for the largest message,")
        self.used += self.slot
        return Reservation(self, self.slot)

    def charge(self, nbytes: int) -> Reservation:
        """Counts a message already read, or `Overloaded`."""
        if self.used and self.used + nbytes > self.max_bytes:
            raise self._refuse(nbytes, "this message needs")
        self.used += nbytes
        return Reservation(self, nbytes)


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
