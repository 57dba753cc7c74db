"""gRPC <-> front door for LookupStream: many lookups over one bidirectional stream, each batched like a Lookup call.

A reader task decodes each message and hands it to the backend (no task per message: the answer's future calls
back); replies go out in completion order, matched by `request_id`. A message that fails is answered with its
status and the stream goes on. A stream's memory is bounded: at most `max_outstanding` messages in progress
(beyond it a message is answered RESOURCE_EXHAUSTED at once), and at most `max_outstanding` replies waiting to be
written. The reader stops reading (so HTTP/2 flow control holds the client) while that many replies wait, and
while the connection's answers not yet taken are at their bound (`admission.ResponseBudget`). A computed reply
counts among those answers until its write returns. On drain, new messages are answered UNAVAILABLE, those in
progress are answered, then the stream ends; a stream with nothing in progress ends at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc

from embserve.v1 import embserve_pb2 as pb

from .admission import Owed
from .backend import BatchOutput
from .decode import request_id_of
from .errors import BatchFailed, CallGone, EmbserveError, InvalidRequest, Overloaded, ShuttingDown, status_code_of
from .framing import field_header
from .frontdoor import FrontDoor, write
from .lookup_wire import LookupMessage
from .request import SparseRequest

__all__ = ["StreamServicer"]

logger = logging.getLogger(__name__)

METHOD = "LookupStream"
FIRST_MESSAGE_WAIT_S = 1.0


def error_reply(request_id: str, error: BaseException) -> bytes:
    """A LookupResponse that carries only the request id and the status of a failed message."""
    code = status_code_of(error)
    message = str(error) if isinstance(error, EmbserveError) else "internal error"
    status = pb.Status(code=code.value[0], message=message)
    return pb.LookupResponse(request_id=request_id, status=status).SerializeToString()


_Decoded: TypeAlias = "tuple[LookupMessage, SparseRequest | EmbserveError] | EmbserveError"
# Answers waiting are joined into one message up to this many bytes, on streams whose client sends several lookups
# per message (a larger answer goes alone, uncopied).
MAX_JOINED_REPLY_BYTES = 256 * 1024
_RESPONSES = pb.LookupResponse.DESCRIPTOR.fields_by_name["responses"].number


def _request_id(request: LookupMessage) -> str:
    return request.request_id


def join_replies(replies: list[bytes]) -> bytes:
    """Serialized LookupResponses as one LookupResponse carrying them in `responses`."""
    return b"".join(part for reply in replies for part in (field_header(_RESPONSES, len(reply)), reply))


class StreamServicer:
    """The LookupStream handler over the server's front door."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door

    async def LookupStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        if not self._door.streams_open:
            await self._refuse_while_draining(requests, context)
            return
        stream = _Stream(self._door, context)
        unsubscribe = self._door.on_drain(stream.wake)
        try:
            await stream.run(requests)
        finally:
            unsubscribe()

    async def _refuse_while_draining(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """A stream opened while the server drains: its first message is answered UNAVAILABLE in-band, then the
        stream ends. (Aborting the call instead races with the client's writes, and grpc's asyncio client then
        reports INTERNAL instead of the server's status; an in-band answer reaches it intact, and the client's
        retry policy sends the message elsewhere.)"""
        try:
            raw = await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_WAIT_S)
        except (StopAsyncIteration, TimeoutError):
            return
        self._door.count(METHOD, grpc.StatusCode.UNAVAILABLE)
        refusal = ShuttingDown("server is shutting down; retry on another replica")
        await context.write(error_reply(request_id_of(raw), refusal))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {METHOD: grpc.stream_stream_rpc_method_handler(self.LookupStream)}  # bytes both ways


class _Stream:
    """One open LookupStream call."""

    def __init__(self, door: FrontDoor, context: grpc.aio.ServicerContext) -> None:
        self._door = door
        self._context = context
        self._max_outstanding = door.limits.max_stream_outstanding
        # (reply, what is owed for it: released once written); None: only re-check whether the stream is done.
        self._replies: asyncio.Queue[tuple[bytes, Owed | None] | None] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._owed: dict[asyncio.Future[BatchOutput], Owed] = {}  # the messages in progress
        self._in_progress = 0
        self._reading = True
        self._batched = False  # the client sends several lookups per message: it reads joined answers
        self._peer = context.peer()
        door.saw(self._peer)

    def wake(self) -> None:
        """Makes the writer re-check its state (the server started draining)."""
        self._replies.put_nowait(None)

    async def run(self, requests: AsyncIterator[bytes]) -> None:
        """Serves the stream until the client half-closes and every message is answered; the reader task is
        awaited before returning, so that what it raised is not lost."""
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            await self._write()
        finally:
            reader.cancel()
            for future in list(self._owed):  # the caller went away: its queued messages are dropped unrun
                future.cancel()
            for owed in self._owed.values():  # messages never answered leave the budget
                owed.release()
            while not self._replies.empty():  # replies never written leave it too
                reply = self._replies.get_nowait()
                if reply is not None and reply[1] is not None:
                    reply[1].release()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # done reading before the request iterator is closed

    def _done(self) -> bool:
        return self._in_progress == 0 and self._replies.empty() and (not self._reading or not self._door.streams_open)

    async def _write(self) -> None:
        while not self._done():
            first = await self._replies.get()
            replies = [] if first is None else [first]
            size = 0 if first is None else len(first[0])
            while self._batched and size < MAX_JOINED_REPLY_BYTES and not self._replies.empty():
                more = self._replies.get_nowait()  # answers already waiting go out together
                if more is not None:
                    if size + len(more[0]) > MAX_JOINED_REPLY_BYTES and replies:
                        self._replies.put_nowait(more)  # the next message's first answer (order is free)
                        break
                    replies.append(more)
                    size += len(more[0])
            if self._replies.qsize() < self._max_outstanding:
                self._room.set()
            if not replies:
                continue
            message = replies[0][0] if len(replies) == 1 else join_replies([r for r, _ in replies])
            try:
                await write(self._context, message)
            except CallGone:  # the caller left: end quietly, as gRPC ends a cancelled call
                raise asyncio.CancelledError from None
            finally:
                for _, owed in replies:
                    if owed is not None:
                        owed.release()

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        door = self._door
        try:
            while True:
                if self._replies.qsize() >= self._max_outstanding:
                    self._room.clear()
                    await self._room.wait()  # the client is not reading its answers: stop reading its requests
                await door.responses.wait_for_room(self._peer)  # nor while its connection holds too many
                try:
                    raw = await anext(requests)
                except StopAsyncIteration:
                    return
                if len(raw) < door.offload.min_bytes:
                    self._accept(raw)
                else:
                    await self._accept_large(raw)
        finally:
            self._reading = False
            self.wake()

    def _accept(self, raw: bytes) -> None:
        """A message decoded on the event loop."""
        start = time.perf_counter()
        try:
            charge = self._door.receive.charge(len(raw))
        except EmbserveError as err:  # not parsed: its id is read from the wire
            self._reply_error(request_id_of(raw), err, start)
            return
        try:
            for name, decoded in self._decode(raw):
                self._admit(name, decoded, start)
        finally:
            charge.release()  # queued (the queue bound counts it) or refused

    async def _accept_large(self, raw: bytes) -> None:
        """A message decoded off the event loop, one at a time per stream."""
        start = time.perf_counter()
        try:
            charge = self._door.receive.charge(len(raw))
        except EmbserveError as err:
            self._reply_error(request_id_of(raw), err, start)
            return
        try:
            try:
                lookups = await self._door.offload.run(len(raw), functools.partial(self._decode, raw))
            except EmbserveError as err:
                self._reply_error(request_id_of(raw), err, start)
                return
            for name, decoded in lookups:
                self._admit(name, decoded, start)
        finally:
            charge.release()

    def _decode(self, raw: bytes) -> list[tuple[Callable[[], str], _Decoded]]:
        """Each lookup of a message, parsed and validated, with how to name it when it cannot be parsed (its
        request id read from the wire). A message that carries several lookups gives one entry for each, and from
        then on the stream may answer several in one message. A validation error is answered only if the stream's
        own checks pass."""
        door = self._door
        name = functools.partial(request_id_of, raw)
        try:
            request = door.parse_lookup(raw)
        except EmbserveError as err:
            return [(name, err)]
        if not request.requests:
            return [(name, self._validate(request))]
        if len(request.requests) > self._max_outstanding:  # read in place, it would have stopped at the bound
            refusal = InvalidRequest(
                f"the message carries {len(request.requests)} lookups, over the server's max_stream_outstanding "
                f"{self._max_outstanding}"
            )
            return [(name, refusal)]
        self._batched = True
        lookups: list[tuple[Callable[[], str], _Decoded]] = []
        for part in request.requests:
            sub: LookupMessage
            if isinstance(part, memoryview):  # the message was read in place: its lookups are bytes still
                sub_raw = bytes(part)
                try:
                    sub = door.parse_lookup(sub_raw)
                except EmbserveError as err:
                    lookups.append((functools.partial(request_id_of, sub_raw), err))
                    continue
            else:
                sub = part
            sub_name = functools.partial(_request_id, sub)
            if sub.requests:
                lookups.append((sub_name, (sub, InvalidRequest("a lookup inside a message carries lookups itself"))))
            else:
                lookups.append((sub_name, self._validate(sub)))
        return lookups

    def _validate(self, request: LookupMessage) -> _Decoded:
        try:
            return request, self._door.validate_lookup(request)
        except EmbserveError as err:
            return request, err

    def _admit(self, name: Callable[[], str], decoded: _Decoded, start: float) -> None:
        door = self._door
        if isinstance(decoded, EmbserveError):
            self._reply_error(name(), decoded, start)
            return
        request, sparse = decoded
        request_id = request.request_id
        try:
            if not door.streams_open:
                raise ShuttingDown("server is draining; send this request to another replica")
            if not request_id:
                raise InvalidRequest("request_id is required on LookupStream: answers are matched to it")
            if self._in_progress >= self._max_outstanding:
                raise Overloaded(
                    f"{self._in_progress} messages in progress on this stream, the server's max_stream_outstanding; "
                    "wait for answers before sending more"
                )
            if isinstance(sparse, EmbserveError):
                raise sparse
            owed = door.responses.reserve(self._peer, door.response_bytes(sparse))
            timeout = self._context.time_remaining()
            if request.timeout_ms:
                timeout = request.timeout_ms / 1e3 if timeout is None else min(timeout, request.timeout_ms / 1e3)
            try:
                future = door.backend.enqueue(sparse, timeout=timeout)
            except EmbserveError:
                owed.release()
                raise
        except EmbserveError as err:
            self._reply_error(request_id, err, start)
            return
        self._in_progress += 1
        door.inflight.enter()
        self._owed[future] = owed
        future.add_done_callback(functools.partial(self._answered, request_id, start))

    def _answered(self, request_id: str, start: float, future: asyncio.Future[BatchOutput]) -> None:
        owed = self._owed.pop(future)
        self._in_progress -= 1
        door = self._door
        door.inflight.exit()
        if future.cancelled():
            owed.release()
            door.count(METHOD, grpc.StatusCode.CANCELLED, start)
            return
        error = future.exception()
        if error is not None:
            owed.release()  # no answer to hold: the error reply is owed nothing
            if not isinstance(error, EmbserveError):
                logger.error("stream message failed unexpectedly", exc_info=error)
                error = BatchFailed(f"{type(error).__name__}: {error}")
            self._reply_error(request_id, error, start)
            return
        out = future.result()
        door.metrics.examples.inc(out.batch_size)
        door.count(METHOD, grpc.StatusCode.OK, start)
        owed.mark_computed()  # released once written
        self._replies.put_nowait((out.response, owed))

    def _reply_error(self, request_id: str, error: BaseException, start: float) -> None:
        code = status_code_of(error)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("stream message failed: %s", error)
        self._door.count(METHOD, code, start)
        self._replies.put_nowait((error_reply(request_id, error), None))
