"""Load generators over raw pre-encoded requests: closed loop (N callers) and open loop (Poisson arrivals).

Requests are serialized once before the run and responses are kept as bytes, so the generator spends its CPU on
gRPC and not on protobuf; every response's size is checked, and a sample is parsed and checked for exact values.
Latencies exclude the warm-up; in open loop they are measured from each call's scheduled send time, so queueing in
the generator or the server is never hidden.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import numpy as np

from embserve.v1.wire import LOOKUP_METHOD

__all__ = ["LoadResult", "closed_loop", "open_loop"]

METHOD = LOOKUP_METHOD
Checker = Callable[[int, bytes], bool]


@dataclasses.dataclass
class LoadResult:
    """What one load point measured; latencies in milliseconds."""

    mode: str
    concurrency: int | None
    rate: float | None
    duration_s: float
    ok: int
    examples: int
    errors: dict[str, int]
    latencies_ms: np.ndarray
    wrong: int
    checked: int

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s

    @property
    def eps(self) -> float:
        return self.examples / self.duration_s

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")


class _Recorder:
    def __init__(self, sizes: Sequence[int], min_bytes: Sequence[int], check: Checker | None, sample: int) -> None:
        self.sizes = sizes
        self.min_bytes = min_bytes
        self.check = check
        self.sample = sample
        self.latencies: list[float] = []
        self.ok = 0
        self.examples = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong = 0
        self.checked = 0

    def record(self, index: int, response: bytes | None, code: str, latency_s: float) -> None:
        if response is None:
            self.errors[code] += 1
            return
        if len(response) < self.min_bytes[index]:
            self.wrong += 1
            self.errors["SHORT_RESPONSE"] += 1
            return
        if self.check is not None and self.checked < self.sample:
            self.checked += 1
            if not self.check(index, response):
                self.wrong += 1
        self.ok += 1
        self.examples += self.sizes[index]
        self.latencies.append(latency_s * 1e3)

    def result(self, mode: str, duration: float, concurrency: int | None, rate: float | None) -> LoadResult:
        return LoadResult(
            mode, concurrency, rate, duration, self.ok, self.examples, dict(self.errors),
            np.array(self.latencies), self.wrong, self.checked,
        )


@contextlib.asynccontextmanager
async def _lookup_methods(
    address: str, count: int, method: str = METHOD
) -> AsyncIterator[list[grpc.aio.UnaryUnaryMultiCallable]]:
    """`count` channels (separate connections) to `address`, as raw-bytes callables of `method` (Lookup, or
    another unary method such as the Open Inference Protocol's ModelInfer); closed on exit."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
               ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    try:
        yield [c.unary_unary(method) for c in channels]
    finally:
        for c in channels:
            await c.close()


async def _call(method: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, timeout: float) -> tuple[bytes | None, str]:
    try:
        return await method(payload, timeout=timeout), "OK"
    except grpc.aio.AioRpcError as err:
        return None, err.code().name


async def closed_loop(
    address: str,
    payloads: Sequence[bytes],
    sizes: Sequence[int],
    min_bytes: Sequence[int],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    check: Checker | None = None,
    sample: int = 16,
    timeout_s: float = 30.0,
    method: str = METHOD,
) -> LoadResult:
    """`concurrency` callers each send their next request as soon as the previous one answered; `payloads` are
    serialized requests of `method`."""
    rec = _Recorder(sizes, min_bytes, check, sample)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def caller(i: int) -> None:
        method = methods[i % len(methods)]
        index = i % len(payloads)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            response, code = await _call(method, payloads[index], timeout_s)
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                rec.record(index, response, code, t1 - t0)
            index = (index + concurrency) % len(payloads)

    async with _lookup_methods(address, min(4, concurrency), method) as methods:
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return rec.result("closed", duration_s, concurrency, None)


async def open_loop(
    address: str,
    payloads: Sequence[bytes],
    sizes: Sequence[int],
    min_bytes: Sequence[int],
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    check: Checker | None = None,
    sample: int = 16,
    timeout_s: float = 5.0,
    seed: int = 0,
    method: str = METHOD,
) -> LoadResult:
    """Poisson arrivals at `rate` calls/s, whatever the server's speed; latency counts from the scheduled time."""
    rec = _Recorder(sizes, min_bytes, check, sample)
    rng = np.random.default_rng(seed)
    total = warmup_s + duration_s
    gaps = rng.exponential(1.0 / rate, size=int(rate * total * 1.2) + 16)
    offsets = np.cumsum(gaps)
    offsets = offsets[offsets < total]
    tasks: set[asyncio.Task[None]] = set()
    async with _lookup_methods(address, 4, method) as methods:
        start = time.perf_counter()

        async def one(i: int, scheduled: float) -> None:
            index = i % len(payloads)
            response, code = await _call(methods[i % len(methods)], payloads[index], timeout_s)
            if scheduled - start >= warmup_s:
                rec.record(index, response, code, time.perf_counter() - scheduled)

        for i, offset in enumerate(offsets):
            scheduled = start + float(offset)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(i, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return rec.result("open", duration_s, None, rate)
