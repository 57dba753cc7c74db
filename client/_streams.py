"""Lookups over LookupStream: a small pool of bidirectional streams per channel, shared by concurrent callers.

Each message gets a request id unique to the client; answers come back in any order and are matched by it. The
deadline is enforced here, and sent as `timeout_ms` so that the server drops the message unrun once it passes.
When a stream breaks (a server restarting or draining, a lost connection), the lookups it left unanswered are
sent again on another stream: lookups are idempotent reads, and an answer is taken at most once per id. A
message answered with a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED by default) is sent again after the
retry policy's backoff, as gRPC's own retries do for unary calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path

from ._transport import RetryPolicy
from .errors import DeadlineExceeded, EmbserveError, Unavailable, from_rpc_error, from_status

__all__ = ["AsyncStreamPool", "StreamPool"]

_BROKEN_STREAM_RESENDS = 3  # how often a lookup is resent after the stream it was on broke


class StreamBroken(Exception):
    """The stream ended before answering; `cause` is the stream's error, when it failed with one."""

    def __init__(self, cause: EmbserveError | None) -> None:
        super().__init__(str(cause) if cause else "stream ended")
        self.cause = cause


class _Stream(Protocol):
    broken: bool

    @property
    def outstanding(self) -> int: ...


S = TypeVar("S", bound=_Stream)


class _Pool(Generic[S]):
    """Up to `size` live streams; a lookup takes the one with the fewest answers outstanding."""

    def __init__(self, open_stream: Callable[[], S], size: int, retry: RetryPolicy | None) -> None:
        if size < 1:
            raise ValueError(f"streams must be >= 1, got {size}")
        self._open = open_stream
        self._size = size
        self._streams: list[S] = []
        self._ids = itertools.count()
        self._retry = retry

    def _pick(self) -> S:
        self._streams = [s for s in self._streams if not s.broken]
        if len(self._streams) < self._size:
            stream = self._open()
            self._streams.append(stream)
            return stream
        return min(self._streams, key=lambda s: s.outstanding)

    def _prepare(self, request: pb.LookupRequest) -> str:
        """Gives the message its wire id, unique in this client; returns the caller's own request id."""
        own = request.request_id
        request.request_id = f"{own}#{next(self._ids):x}"
        return own

    def _retryable(self, response: pb.LookupResponse, attempt: int) -> float | None:
        """Seconds to wait before sending again, or None when `response` is final."""
        if not response.HasField("status") or self._retry is None or attempt + 1 >= self._retry.max_attempts:
            return None
        error = from_status(response.status.code, response.status.message)
        if error.code not in self._retry.retryable_codes:
            return None
        backoff = min(self._retry.max_backoff_s, self._retry.initial_backoff_s * self._retry.backoff_multiplier**attempt)
        return random.uniform(0, backoff)


def _final(response: pb.LookupResponse, own_id: str) -> pb.LookupResponse:
    if response.HasField("status"):
        raise from_status(response.status.code, response.status.message)
    response.request_id = own_id
    return response


def _remaining(deadline: float | None, request: pb.LookupRequest | None = None) -> float | None:
    """Seconds left before `deadline`, also set as the message's `timeout_ms` when a message is given."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed before the answer came", "DEADLINE_EXCEEDED")
    if request is not None:
        request.timeout_ms = max(1, math.ceil(left * 1e3))
    return left


class _SyncStream:
    """One LookupStream call of a blocking channel: a request queue feeding gRPC, a thread reading answers."""

    def __init__(self, channel: grpc.Channel, metadata: Any) -> None:
        method = channel.stream_stream(
            method_path("LookupStream"),
            request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=pb.LookupResponse.FromString,
        )
        self._outbox: queue.SimpleQueue[pb.LookupRequest | None] = queue.SimpleQueue()
        self._pending: dict[str, concurrent.futures.Future[pb.LookupResponse]] = {}
        self._lock = threading.Lock()
        self.broken = False
        self._call = method(iter(self._outbox.get, None), metadata=metadata)
        threading.Thread(target=self._read, name="embserve-stream-reader", daemon=True).start()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def _read(self) -> None:
        cause: EmbserveError | None = None
        try:
            for response in self._call:
                with self._lock:
                    future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as err:
            cause = from_rpc_error(err)
        finally:
            with self._lock:
                self.broken = True
                pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(StreamBroken(cause))

    def send(self, request: pb.LookupRequest) -> concurrent.futures.Future[pb.LookupResponse]:
        future: concurrent.futures.Future[pb.LookupResponse] = concurrent.futures.Future()
        with self._lock:
            if self.broken:
                raise StreamBroken(None)
            self._pending[request.request_id] = future
        self._outbox.put(request)
        return future

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()


class StreamPool(_Pool[_SyncStream]):
    """The blocking client's streams."""

    def __init__(self, channel: grpc.Channel, metadata: Any, size: int, retry: RetryPolicy | None) -> None:
        super().__init__(lambda: _SyncStream(channel, metadata), size, retry)
        self._lock = threading.Lock()

    def lookup(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        own = self._prepare(request)
        attempt = resends = 0
        while True:
            with self._lock:
                stream = self._pick()
            try:
                left = _remaining(deadline, request)
                future = stream.send(request)
                try:
                    response = future.result(left)
                except concurrent.futures.TimeoutError:
                    raise DeadlineExceeded("deadline passed before the answer came", "DEADLINE_EXCEEDED") from None
                finally:
                    stream.forget(request.request_id)
            except StreamBroken as broken:
                resends += 1
                if resends > _BROKEN_STREAM_RESENDS:
                    raise broken.cause or Unavailable("streams keep ending before answering", "UNAVAILABLE") from None
                continue
            wait = self._retryable(response, attempt)
            if wait is None:
                return _final(response, own)
            attempt += 1
            time.sleep(min(wait, _remaining(deadline) or wait))

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


class _AioStream:
    """One LookupStream call of an asyncio channel: an async generator feeding gRPC, a task reading answers."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any) -> None:
        method = channel.stream_stream(
            method_path("LookupStream"),
            request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=pb.LookupResponse.FromString,
        )
        self._outbox: asyncio.Queue[pb.LookupRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[pb.LookupResponse]] = {}
        self.broken = False
        self._call = method(self._requests(), metadata=metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def _requests(self) -> AsyncIterator[pb.LookupRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        cause: EmbserveError | None = None
        try:
            async for response in self._call:
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as err:
            cause = from_rpc_error(err)
        finally:
            self.broken = True
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(StreamBroken(cause))

    async def send(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        if self.broken:
            raise StreamBroken(None)
        future = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._outbox.put_nowait(request)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded("deadline passed before the answer came", "DEADLINE_EXCEEDED") from None
        finally:
            self._pending.pop(request.request_id, None)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class AsyncStreamPool(_Pool[_AioStream]):
    """The asyncio client's streams."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any, size: int, retry: RetryPolicy | None) -> None:
        super().__init__(lambda: _AioStream(channel, metadata), size, retry)

    async def lookup(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        own = self._prepare(request)
        attempt = resends = 0
        while True:
            try:
                left = _remaining(deadline, request)
                response = await self._pick().send(request, left)
            except StreamBroken as broken:
                resends += 1
                if resends > _BROKEN_STREAM_RESENDS:
                    raise broken.cause or Unavailable("streams keep ending before answering", "UNAVAILABLE") from None
                continue
            wait = self._retryable(response, attempt)
            if wait is None:
                return _final(response, own)
            attempt += 1
            await asyncio.sleep(min(wait, _remaining(deadline) or wait))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))
