"""Lookups over LookupStream: a small pool of bidirectional streams per channel, shared by concurrent callers.

Each message gets a request id unique to the client; answers come back in any order and are matched by it. The
deadline is enforced here, and sent as `timeout_ms` so that the server drops the message unrun once it passes.
When a stream breaks (a server restarting or draining, a lost connection), the lookups it left unanswered are
sent again on another stream: lookups are idempotent reads, and an answer is taken at most once per id. A
message answered with a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED by default) is sent again too. Both
count as attempts of the client's retry policy (backoff with jitter between them, at most `max_attempts`), as
gRPC's own retries do for unary calls; without a policy a lookup is sent once. A stream refused for good
(UNAUTHENTICATED, PERMISSION_DENIED, ...) fails its lookups at once.
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
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path

from ._transport import RetryPolicy
from .errors import DeadlineExceeded, EmbserveError, Unavailable, from_rpc_error, from_status

__all__ = ["AsyncStreamPool", "StreamPool"]

# Stream failures after which the unanswered lookups are sent again: the connection or the server went away.
# INTERNAL is among them because grpc's client ends a stream so ("Internal error from Core") when the server ends
# it while requests are still being written; the server itself answers every lookup's own failure in-band.
_RESEND_CODES = frozenset({"UNAVAILABLE", "CANCELLED", "INTERNAL"})


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
    """Up to `size` live streams; a lookup takes the one with the fewest answers outstanding, ties taken in turn
    (so that streams on different replicas share sequential calls too)."""

    def __init__(self, open_stream: Callable[[], S], size: int, retry: RetryPolicy | None) -> None:
        if size < 1:
            raise ValueError(f"streams must be >= 1, got {size}")
        self._open = open_stream
        self._size = size
        self._streams: list[S] = []
        self._ids = itertools.count()
        self._retry = retry
        self._max_attempts = retry.max_attempts if retry is not None else 1
        self._turn = itertools.count()

    def _pick(self) -> S:
        self._streams = [s for s in self._streams if not s.broken]
        if len(self._streams) < self._size:
            stream = self._open()
            self._streams.append(stream)
            return stream
        start = next(self._turn) % len(self._streams)
        ordered = self._streams[start:] + self._streams[:start]
        return min(ordered, key=lambda s: s.outstanding)

    def _prepare(self, request: pb.LookupRequest) -> str:
        """Gives the message its wire id, unique in this client; returns the caller's own request id."""
        own = request.request_id
        request.request_id = f"{own}#{next(self._ids):x}"
        return own

    def _backoff(self, attempt: int) -> float:
        if self._retry is None:
            return 0.0
        r = self._retry
        return random.uniform(0, min(r.max_backoff_s, r.initial_backoff_s * r.backoff_multiplier**attempt))

    def _retry_after(self, response: pb.LookupResponse, attempt: int) -> float | None:
        """Seconds to wait before sending again, or None when `response` is final."""
        if not response.HasField("status") or self._retry is None or attempt + 1 >= self._max_attempts:
            return None
        error = from_status(response.status.code, response.status.message)
        return self._backoff(attempt) if error.code in self._retry.retryable_codes else None

    def _resend_after(self, broken: StreamBroken, attempt: int) -> float:
        """Seconds to wait before sending a lookup its broken stream left unanswered; raises when it is final."""
        cause = broken.cause
        if cause is not None and cause.code not in _RESEND_CODES:
            raise cause from None
        if attempt + 1 >= self._max_attempts:
            raise cause or Unavailable("the stream ended before answering", "UNAVAILABLE") from None
        return self._backoff(attempt)


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


MAX_COALESCED = 64  # lookups in one message, at most (and at most what the server states)


def _coalesced(
    first: pb.LookupRequest, take: Callable[[], pb.LookupRequest | None], max_batch: int, max_bytes: int
) -> tuple[list[pb.LookupRequest], bool]:
    """The messages to write for `first` and the lookups queued behind it (`take` returns the next one, or raises
    when none is queued): up to `max_batch` lookups per message and `max_bytes` in all, one lookup alone as itself.
    Also whether the queue's end (None) was reached."""
    messages: list[pb.LookupRequest] = []
    batch, size, closing = [first], first.ByteSize() if max_batch > 1 else 0, False
    while len(batch) < max_batch:
        try:
            more = take()
        except (queue.Empty, asyncio.QueueEmpty):
            break
        if more is None:
            closing = True
            break
        more_size = more.ByteSize()
        if size + more_size > max_bytes:
            messages.append(batch[0] if len(batch) == 1 else pb.LookupRequest(requests=batch))
            batch, size = [], 0
        batch.append(more)
        size += more_size
    messages.append(batch[0] if len(batch) == 1 else pb.LookupRequest(requests=batch))
    return messages, closing


class _SyncStream:
    """One LookupStream call of a blocking channel: a request queue feeding gRPC, a thread reading answers.

    gRPC takes the next message from the queue once it has sent the previous one; the lookups queued meanwhile go
    out in one message, as `_AioStream`'s do, when the server takes several per message (`max_batch` > 1)."""

    def __init__(self, channel: grpc.Channel, metadata: Any, max_batch: int = 1, max_bytes: int = 0) -> None:
        method = channel.stream_stream(
            method_path("LookupStream"),
            request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=pb.LookupResponse.FromString,
        )
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._outbox: queue.SimpleQueue[pb.LookupRequest | None] = queue.SimpleQueue()
        self._pending: dict[str, concurrent.futures.Future[pb.LookupResponse]] = {}
        self._lock = threading.Lock()
        self.broken = False
        self.cause: EmbserveError | None = None
        self._call = method(self._messages(), metadata=metadata)
        threading.Thread(target=self._read, name="embserve-stream-reader", daemon=True).start()

    def _messages(self) -> Iterator[pb.LookupRequest]:
        while (request := self._outbox.get()) is not None:
            messages, closing = _coalesced(request, self._outbox.get_nowait, self._max_batch, self._max_bytes)
            yield from messages
            if closing:
                return

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def _read(self) -> None:
        cause: EmbserveError | None = None
        try:
            for message in self._call:
                for response in message.responses or (message,):  # several answers may come in one message
                    with self._lock:
                        future = self._pending.pop(response.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(response)
        except grpc.RpcError as err:
            cause = from_rpc_error(err)
        finally:
            with self._lock:
                self.broken, self.cause = True, cause
                pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(StreamBroken(cause))

    def send(self, request: pb.LookupRequest) -> concurrent.futures.Future[pb.LookupResponse]:
        future: concurrent.futures.Future[pb.LookupResponse] = concurrent.futures.Future()
        with self._lock:
            if self.broken:
                raise StreamBroken(self.cause)
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

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: Any,
        size: int,
        retry: RetryPolicy | None,
        *,
        max_batch: int = 1,
        max_bytes: int = 0,
    ) -> None:
        super().__init__(lambda: _SyncStream(channel, metadata, max_batch, max_bytes), size, retry)
        self._lock = threading.Lock()

    def lookup(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        own = self._prepare(request)
        for attempt in itertools.count():
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
                wait = self._resend_after(broken, attempt)
            else:
                after = self._retry_after(response, attempt)
                if after is None:
                    return _final(response, own)
                wait = after
            time.sleep(min(wait, _remaining(deadline) or wait))
        raise AssertionError("unreachable")

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


class _AioStream:
    """One LookupStream call of an asyncio channel: a task writing queued requests, a task reading answers. (A
    request iterator handed to gRPC instead can end the call INTERNAL when the server ends it first.)

    Lookups queued while the stream is busy writing (or issued together, in one turn of the event loop) go out in
    one message, up to `max_batch` of them and `max_bytes` in all, when the server takes several per message
    (`max_batch` > 1); each keeps its own request id and deadline, and is answered on its own."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any, max_batch: int = 1, max_bytes: int = 0) -> None:
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        method = channel.stream_stream(
            method_path("LookupStream"),
            request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=pb.LookupResponse.FromString,
        )
        self._outbox: asyncio.Queue[pb.LookupRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[pb.LookupResponse]] = {}
        self.broken = False
        self.cause: EmbserveError | None = None
        self._call = method(metadata=metadata)
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def _write(self) -> None:
        try:
            while (request := await self._outbox.get()) is not None:
                messages, closing = _coalesced(request, self._outbox.get_nowait, self._max_batch, self._max_bytes)
                for message in messages:
                    await self._call.write(message)
                if closing:
                    break
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call ended; the reader reports how

    async def _read(self) -> None:
        cause: EmbserveError | None = None
        try:
            async for message in self._call:
                for response in message.responses or (message,):  # several answers may come in one message
                    future = self._pending.pop(response.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(response)
        except grpc.RpcError as err:
            cause = from_rpc_error(err)
        finally:
            self.broken, self.cause = True, cause
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(StreamBroken(cause))

    async def send(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        if self.broken:
            raise StreamBroken(self.cause)
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
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class AsyncStreamPool(_Pool[_AioStream]):
    """The asyncio client's streams."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Any,
        size: int,
        retry: RetryPolicy | None,
        *,
        max_batch: int = 1,
        max_bytes: int = 0,
    ) -> None:
        super().__init__(lambda: _AioStream(channel, metadata, max_batch, max_bytes), size, retry)

    async def lookup(self, request: pb.LookupRequest, timeout: float | None) -> pb.LookupResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        own = self._prepare(request)
        for attempt in itertools.count():
            try:
                left = _remaining(deadline, request)
                response = await self._pick().send(request, left)
            except StreamBroken as broken:
                wait = self._resend_after(broken, attempt)
            else:
                after = self._retry_after(response, attempt)
                if after is None:
                    return _final(response, own)
                wait = after
            await asyncio.sleep(min(wait, _remaining(deadline) or wait))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))
