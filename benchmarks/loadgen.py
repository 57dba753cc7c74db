"""Load generators over raw pre-encoded requests: closed loop (N callers) and open loop (Poisson arrivals), over
unary Lookup calls or LookupStream messages.

Requests are serialized once before the run and responses are kept as bytes, so the generator spends its CPU on
gRPC and not on protobuf; every response's size is checked, and a sample is parsed and checked for exact values.
Latencies exclude the warm-up; in open loop they are measured from each call's scheduled send time, so queueing in
the generator or the server is never hidden. Over streams, callers share a few streams per connection; each
message gets a request id appended to its pre-encoded bytes, and answers are matched by the id read from the reply's
fields without parsing the embeddings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import numpy as np

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import LENGTH_DELIMITED, LOOKUP_METHOD, method_path, read_varint, varint, wire_fields

__all__ = ["LoadResult", "closed_loop", "fixed_calls", "open_loop"]

METHOD = LOOKUP_METHOD
STREAM_METHOD = method_path("LookupStream")
TRANSPORTS = ("unary", "stream")
STREAMS_PER_CONNECTION = 2
Checker = Callable[[int, bytes], bool]
Call = Callable[[bytes, float], Awaitable[tuple[bytes | None, str]]]


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
            mode,
            concurrency,
            rate,
            duration,
            self.ok,
            self.examples,
            dict(self.errors),
            np.array(self.latencies),
            self.wrong,
            self.checked,
        )


_RESPONSE_FIELDS = pb.LookupResponse.DESCRIPTOR.fields_by_name
_REQUEST_ID_FIELD = _RESPONSE_FIELDS["request_id"].number
_STATUS_FIELD = _RESPONSE_FIELDS["status"].number
_CODE_FIELD = pb.Status.DESCRIPTOR.fields_by_name["code"].number
_MAX_FIELDS = 1 << 16  # a reply has a field per key (`keys`) besides a dozen others


def reply_id_and_code(raw: bytes) -> tuple[bytes, int]:
    """A LookupResponse's request id and status code (0 when it carries embeddings), read from its field tags:
    every field but those two is skipped over, the embeddings bytes included."""
    request_id, code = b"", 0
    for field, wire, start, end in wire_fields(raw, 0, len(raw), "a LookupResponse", _MAX_FIELDS):
        if field == _REQUEST_ID_FIELD and wire == LENGTH_DELIMITED:
            request_id = raw[start:end]
        elif field == _STATUS_FIELD and wire == LENGTH_DELIMITED:
            for inner, inner_wire, value_start, _ in wire_fields(raw, start, end, "a Status", _MAX_FIELDS):
                if inner == _CODE_FIELD and inner_wire == 0:
                    code = read_varint(raw, value_start, end)[0]
    return request_id, code


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


class _StreamMux:
    """One LookupStream call shared by many callers: pre-encoded requests with an id appended, answers matched by id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending: dict[bytes, asyncio.Future[tuple[bytes | None, str]]] = {}
        self._ids = itertools.count()
        self._call = channel.stream_stream(STREAM_METHOD)(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> AsyncIterator[bytes]:
        while (payload := await self._outbox.get()) is not None:
            yield payload

    async def _read(self) -> None:
        code = "STREAM_ENDED"
        try:
            async for raw in self._call:
                request_id, status = reply_id_and_code(raw)
                future = self._pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result((None, _CODE_NAMES.get(status, "UNKNOWN")) if status else (raw, "OK"))
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_result((None, code))
            self._pending.clear()

    async def __call__(self, payload: bytes, timeout: float) -> tuple[bytes | None, str]:
        request_id = b"%x" % next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._outbox.put_nowait(payload + _TAG_REQUEST_ID + varint(len(request_id)) + request_id)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None, "DEADLINE_EXCEEDED"
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


# LookupRequest.request_id, appended to a pre-encoded request: the last occurrence of a field wins.
_TAG_REQUEST_ID = varint(pb.LookupRequest.DESCRIPTOR.fields_by_name["request_id"].number << 3 | LENGTH_DELIMITED)


def _unary(method: grpc.aio.UnaryUnaryMultiCallable) -> Call:
    async def call(payload: bytes, timeout: float) -> tuple[bytes | None, str]:
        try:
            return await method(payload, timeout=timeout), "OK"
        except grpc.aio.AioRpcError as err:
            return None, err.code().name

    return call


@contextlib.asynccontextmanager
async def _lookup_methods(
    address: str, count: int, transport: str = "unary", method: str = METHOD
) -> AsyncIterator[list[Call]]:
    """`count` channels (separate connections) to `address`, each as a raw-bytes callable of the unary `method`
    (Lookup, or another such as the Open Inference Protocol's ModelInfer), or as `STREAMS_PER_CONNECTION`
    LookupStream multiplexers; closed on exit."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    options = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    muxes: list[_StreamMux] = []
    try:
        if transport == "unary":
            yield [_unary(c.unary_unary(method)) for c in channels]
        else:
            muxes = [_StreamMux(c) for c in channels for _ in range(STREAMS_PER_CONNECTION)]
            yield list(muxes)
    finally:
        for mux in muxes:
            await mux.close()
        for c in channels:
            await c.close()


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
    transport: str = "unary",
    method: str = METHOD,
    connections: int | None = None,
) -> LoadResult:
    """`concurrency` callers each send their next request as soon as the previous one answered; `payloads` are
    serialized requests of `method` (unary transport) or LookupRequests (stream). The callers share `connections`
    channels (default: up to 4)."""
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
            response, code = await method(payloads[index], timeout_s)
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                rec.record(index, response, code, t1 - t0)
            index = (index + concurrency) % len(payloads)

    async with _lookup_methods(address, connections or min(4, concurrency), transport, method) as methods:
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return rec.result("closed", duration_s, concurrency, None)


async def fixed_calls(
    address: str,
    payloads: Sequence[bytes],
    *,
    concurrency: int,
    calls_each: int,
    transport: str = "unary",
    method: str = METHOD,
    connections: int = 1,
    timeout_s: float = 60.0,
) -> collections.Counter[str]:
    """`concurrency` callers each make `calls_each` calls back to back; returns how many calls ended with each
    status code (every call counted, whenever it ends)."""
    codes: collections.Counter[str] = collections.Counter()

    async def caller(i: int) -> None:
        call = methods[i % len(methods)]
        for n in range(calls_each):
            _, code = await call(payloads[(i + n * concurrency) % len(payloads)], timeout_s)
            codes[code] += 1

    async with _lookup_methods(address, connections, transport, method) as methods:
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return codes


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
    transport: str = "unary",
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
    async with _lookup_methods(address, 4, transport, method) as methods:
        start = time.perf_counter()

        async def one(i: int, scheduled: float) -> None:
            index = i % len(payloads)
            response, code = await methods[i % len(methods)](payloads[index], timeout_s)
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
