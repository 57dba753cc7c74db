"""The dynamic batcher: merges concurrent requests into batches of up to `max_batch_size` examples.

One future per request. A batch runs through `run_batch`, whose results are fanned out in order; an exception in a
batch is set on every future of that batch and on no other. A queued request whose deadline or queue budget ends
is failed at that moment (a timer per request), and cancelled requests are dropped before a batch is formed, so
neither is computed. At most `max_inflight_batches` batches run at once; while they run,
new requests gather in the queue by themselves. With a free slot the `policy` decides whether the queue waits for
company (`company_wait_s`). Admission counts examples (`size_of`) and, where a byte bound is
given, bytes (`bytes_of`: what an item holds while queued and will produce).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

from .config import BatchPolicy
from .errors import BatchFailed, DeadlineExpired, Overloaded, ShuttingDown

__all__ = ["DEADLINE_SHARE", "BatcherObserver", "DynamicBatcher"]

# Budget policy: the share of a request's remaining deadline (at enqueue) it may spend waiting for company.
DEADLINE_SHARE = 0.25

T = TypeVar("T")
R = TypeVar("R")


class BatcherObserver(Protocol):
    """What the batcher reports (the server wires it to Prometheus)."""

    def queue_depth(self, examples: int) -> None: ...
    def batch_formed(self, examples: int, requests: int, queue_waits_s: Sequence[float]) -> None: ...
    def dropped(self, reason: str, count: int = 1) -> None: ...


@dataclasses.dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    size: int
    nbytes: int
    future: asyncio.Future[R]
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    release: float  # budget policy: the batch forms by then, whatever else is queued
    timer: asyncio.TimerHandle | None = None  # fires when the deadline or the queue budget ends, whichever first


class DynamicBatcher(Generic[T, R]):
    """Queues items and runs them in batches.

    Args:
        run_batch: computes a batch; returns one result per item, in order.
        size_of: an item's size in examples.
        bytes_of: an item's size in bytes (its arrays and its result); counted only with `max_queue_bytes`.
        max_batch_size: examples per batch; an item larger than this runs alone, never rejected for size.
        max_queue_delay_s: with `BatchPolicy.WAIT`, how long the first queued item waits for the batch to fill.
        max_queue_size: examples the queue holds; beyond it `submit` raises `Overloaded` at once.
        max_queue_bytes: bytes the queue holds (by `bytes_of`); beyond it `submit` raises `Overloaded` at once.
            An item larger than this is still taken when the queue is empty.
        max_batch_bytes: bytes one batch takes (by `bytes_of`, with `max_queue_bytes`); an item larger than this
            runs alone.
        policy: EAGER (run what is queued as soon as a slot is free), WAIT (the first queued item waits up to
            `max_queue_delay_s`) or BUDGET (wait while no queued item is past its latency budget).
        latency_budget_s: with `BatchPolicy.BUDGET`, how long an item may wait for company; an item with a
            deadline waits at most `DEADLINE_SHARE` of its remaining time, when that is shorter.
        clock: monotonic seconds (`time.monotonic`; tests give their own).
        max_inflight_batches: batches running concurrently (pipelining of assembly and forward).
        max_queue_wait_s: the queue budget: an item queued longer is failed with `Overloaded`, never run, so the
            latency of accepted items stays bounded under overload.
        observer: receives queue depth, batch sizes and drops.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        size_of: Callable[[T], int],
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        policy: BatchPolicy = BatchPolicy.EAGER,
        max_inflight_batches: int = 1,
        max_queue_wait_s: float | None = None,
        observer: BatcherObserver | None = None,
        bytes_of: Callable[[T], int] | None = None,
        max_queue_bytes: int | None = None,
        max_batch_bytes: int | None = None,
        latency_budget_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
        if max_queue_size < max_batch_size:
            raise ValueError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
        if max_inflight_batches <= 0:
            raise ValueError(f"max_inflight_batches must be > 0, got {max_inflight_batches}")
        if max_queue_wait_s is not None and max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {max_queue_wait_s}")
        if policy is BatchPolicy.BUDGET and (latency_budget_s is None or latency_budget_s <= 0):
            raise ValueError(f"the budget policy needs latency_budget_s > 0, got {latency_budget_s}")
        if max_queue_bytes is not None and (max_queue_bytes <= 0 or bytes_of is None):
            raise ValueError(f"max_queue_bytes must be > 0 and come with bytes_of, got {max_queue_bytes}")
        self._run_batch = run_batch
        self._bytes_of = bytes_of if max_queue_bytes is not None else None
        self.max_queue_bytes = max_queue_bytes
        self.max_batch_bytes = max_batch_bytes if self._bytes_of is not None else None
        self._queued_bytes = 0
        self._size_of = size_of
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.policy = BatchPolicy(policy)
        self.max_inflight_batches = max_inflight_batches
        self.max_queue_wait_s = max_queue_wait_s
        self.latency_budget_s = latency_budget_s
        self._clock = clock
        self._first_release = math.inf  # the earliest `release` queued, recomputed after items leave
        self._releases_left = False
        self._observer = observer
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._queued_examples = 0
        self._has_work = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_examples(self) -> int:
        return self._queued_examples

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="embserve-batcher")

    async def submit(self, item: T, *, timeout: float | None = None) -> R:
        """Queues `item` and waits for its result.

        Args:
            item: the request.
            timeout: seconds the caller is willing to wait (its gRPC deadline); past it the item is dropped unrun.
        """
        return await self.enqueue(item, timeout=timeout)  # cancelling the caller cancels the future: dropped

    def enqueue(self, item: T, *, timeout: float | None = None) -> asyncio.Future[R]:
        """Queues `item` and returns the future of its result, for callers that wait on many at once (streams).

        Cancelling the future drops the item before its batch forms. Raises `Overloaded` (queue full) or
        `ShuttingDown` at once.
        """
        if self._closed:
            raise ShuttingDown("server is shutting down")
        size = self._size_of(item)
        if self._queue and self._queued_examples + size > self.max_queue_size:
            if self._observer:
                self._observer.dropped("queue_full")
            raise Overloaded(
                f"queue full: {self._queued_examples} examples queued, limit {self.max_queue_size}; retry later"
            )
        nbytes = 0
        if self._bytes_of is not None:
            nbytes = self._bytes_of(item)
            assert self.max_queue_bytes is not None
            if self._queue and self._queued_bytes + nbytes > self.max_queue_bytes:
                if self._observer:
                    self._observer.dropped("queue_full")
                raise Overloaded(
                    f"queue full: {self._queued_bytes} bytes queued and this request needs {nbytes} (its arrays "
                    f"and its response), over the server's max_queue_bytes {self.max_queue_bytes}; retry later"
                )
        now = self._clock()
        budget = self.latency_budget_s or 0.0
        if timeout is not None:
            budget = min(budget, DEADLINE_SHARE * timeout)
        entry: _Entry[T, R] = _Entry(
            item,
            size,
            nbytes,
            asyncio.get_running_loop().create_future(),
            None if timeout is None else now + timeout,
            now,
            now + max(0.0, budget),
        )
        self._queue.append(entry)
        self._first_release = min(self._first_release, entry.release)
        self._queued_examples += size
        self._queued_bytes += nbytes
        ends = [t for t in (timeout, self.max_queue_wait_s) if t is not None]
        if ends:
            entry.timer = asyncio.get_running_loop().call_later(max(0.0, min(ends)), self._expire, entry)
        if self._observer:
            self._observer.queue_depth(self._queued_examples)
        self._has_work.set()
        return entry.future

    async def close(self) -> None:
        """Stops taking items, runs everything already queued, and waits for running batches."""
        self._closed = True
        self._has_work.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self._has_work.wait()
            if not self._queue:
                self._has_work.clear()
                if self._closed:
                    return
                continue
            await self._slots.acquire()
            if self.policy is not BatchPolicy.EAGER:
                await self._wait_for_company()
            else:
                await asyncio.sleep(0)  # let calls already received on this loop iteration join
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_company(self) -> None:
        try:
            while self._queue and self._queued_examples < self.max_batch_size and not self._closed:
                remaining = self.company_wait_s()
                if remaining <= 0:
                    return
                self._has_work.clear()
                try:
                    await asyncio.wait_for(self._has_work.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self._has_work.set()  # the loop re-checks the queue itself

    def company_wait_s(self) -> float:
        """How much longer a free slot may wait for a fuller batch (0 or less: form it now). WAIT: until the first
        queued item has waited `max_queue_delay_s`; BUDGET: until the first queued item's latency budget ends;
        EAGER: not at all. A full batch never waits."""
        if not self._queue or self._queued_examples >= self.max_batch_size or self.policy is BatchPolicy.EAGER:
            return 0.0
        if self.policy is BatchPolicy.WAIT:
            return self._queue[0].enqueued + self.max_queue_delay_s - self._clock()
        if self._releases_left:  # items left since it was known: once per change, not per check
            self._first_release = min(e.release for e in self._queue)
            self._releases_left = False
        return self._first_release - self._clock()

    def _take_batch(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        examples = nbytes = 0
        now = self._clock()
        while self._queue:
            entry = self._queue[0]
            if entry.future.done():  # cancelled by its caller
                self._pop()
                if self._observer:
                    self._observer.dropped("cancelled")
                continue
            if entry.deadline is not None and entry.deadline <= now:
                self._pop()
                self._fail_deadline(entry)  # its timer has not run yet
                continue
            if self.max_queue_wait_s is not None and now - entry.enqueued > self.max_queue_wait_s:
                self._pop()
                self._fail_over_budget(entry, now)  # its timer has not run yet
                continue
            if batch and examples + entry.size > self.max_batch_size:
                break
            if batch and self.max_batch_bytes is not None and nbytes + entry.nbytes > self.max_batch_bytes:
                break
            self._pop()
            batch.append(entry)
            examples += entry.size
            nbytes += entry.nbytes
        if self._observer:
            self._observer.queue_depth(self._queued_examples)
            if batch:
                self._observer.batch_formed(examples, len(batch), [now - e.enqueued for e in batch])
        return batch

    def _pop(self) -> None:
        self._forget(self._queue.popleft())

    def _forget(self, entry: _Entry[T, R]) -> None:
        """Takes an entry that left the queue out of its counts and stops its timer."""
        self._releases_left = True
        self._queued_examples -= entry.size
        self._queued_bytes -= entry.nbytes
        if entry.timer is not None:
            entry.timer.cancel()

    def _expire(self, entry: _Entry[T, R]) -> None:
        """An item's deadline or queue budget ended while it waited: it is failed now, while the batches ahead of
        it run, rather than when the next batch forms, and its place in the queue is free at once. A cancelled
        item is left to be dropped then."""
        if entry.future.done():
            return
        self._queue.remove(entry)  # identity: entries compare by identity
        self._forget(entry)
        now = self._clock()
        if entry.deadline is not None and entry.deadline <= now + 1e-3:
            self._fail_deadline(entry)
        else:
            self._fail_over_budget(entry, now)
        if self._observer:
            self._observer.queue_depth(self._queued_examples)

    def _fail_deadline(self, entry: _Entry[T, R]) -> None:
        entry.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
        if self._observer:
            self._observer.dropped("deadline")

    def _fail_over_budget(self, entry: _Entry[T, R], now: float) -> None:
        assert self.max_queue_wait_s is not None
        entry.future.set_exception(
            Overloaded(
                f"waited {1e3 * (now - entry.enqueued):.0f} ms for a batch, over the queue budget of "
                f"{1e3 * self.max_queue_wait_s:.0f} ms; not computed, retry later"
            )
        )
        if self._observer:
            self._observer.dropped("queue_budget")

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            results = await self._run_batch([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            for entry, result in zip(batch, results):
                if not entry.future.done():
                    entry.future.set_result(result)
        except Exception as err:  # the batch fails alone; the server keeps serving
            failure = BatchFailed(f"batch of {len(batch)} requests failed: {type(err).__name__}: {err}")
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(failure)
        finally:
            self._slots.release()
