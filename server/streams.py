"""LookupStream: many lookups over one bidirectional stream, each batched like a Lookup call.

A reader task decodes each message and hands it to the batcher (no task per message: the batch's future calls
back); replies go out in completion order, matched by `request_id`. A message that fails is answered with its
status and the stream goes on. Two bounds keep a stream's memory fixed: at most `max_outstanding` messages in
progress (beyond it a message is answered RESOURCE_EXHAUSTED at once), and at most `max_outstanding` replies
waiting to be written (beyond it the reader stops reading, so HTTP/2 flow control holds a client that does not
read its answers). Replies waiting to be written count in the server's `ResponseBudget`, with the Lookup and
ModelInfer answers, until their write returns; while it is over its bound (in total or on this connection), a new
message is answered RESOURCE_EXHAUSTED. Large messages are decoded off the event loop, one at a time. On drain,
new messages are answered UNAVAILABLE, those in progress are answered, then the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc

from embserve.v1 import embserve_pb2 as pb

from .decode import decode_lookup, request_id_of
from .errors import BatchFailed, EmbserveError, InvalidRequest, Overloaded, ShuttingDown, status_code_of
from .executor import BatchOutput
from .request import SparseRequest

if TYPE_CHECKING:
    from .servicer import EmbeddingServicer

__all__ = ["LookupStream", "refuse_while_draining"]

logger = logging.getLogger(__name__)



def error_reply(request_id: str, error: BaseException) -> bytes:
    """A LookupResponse that carries only the request id and the status of a failed message."""
    code = status_code_of(error)
    message = str(error) if isinstance(error, EmbserveError) else "internal error"
    status = pb.Status(code=code.value[0], message=message)
    return pb.LookupResponse(request_id=request_id, status=status).SerializeToString()


FIRST_MESSAGE_WAIT_S = 1.0


async def refuse_while_draining(
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    count: Callable[[str, grpc.StatusCode], None],
) -> None:
    """A stream opened while the server drains: its first message is answered UNAVAILABLE in-band, then the stream
    ends. (Aborting the call instead races with the client's writes, and grpc's asyncio client then reports
    INTERNAL instead of the server's status; an in-band answer reaches it intact, and the client's retry policy
    sends the message elsewhere.)"""
    try:
        raw = await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_WAIT_S)
    except (StopAsyncIteration, TimeoutError):
        return
    count("LookupStream", grpc.StatusCode.UNAVAILABLE)
    await context.write(error_reply(request_id_of(raw), ShuttingDown("server is shutting down; retry on another replica")))


class LookupStream:
    """One open LookupStream call."""

    def __init__(self, servicer: EmbeddingServicer, context: grpc.aio.ServicerContext, max_outstanding: int) -> None:
        self._servicer = servicer
        self._context = context
        self._max_outstanding = max_outstanding
        # (reply, its bytes counted in the response budget); None: only re-check whether the stream is done.
        self._replies: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._futures: set[asyncio.Future[BatchOutput]] = set()
        self._in_progress = 0
        self._reading = True
        self._peer = context.peer()
        self._budget = servicer.budget

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
            for future in list(self._futures):  # the caller went away: its queued messages are dropped unrun
                future.cancel()
            while not self._replies.empty():  # replies never written leave the budget
                reply = self._replies.get_nowait()
                if reply is not None and reply[1]:
                    self._budget.release(self._peer, reply[1])
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # done reading before the request iterator is closed

    def _done(self) -> bool:
        return self._in_progress == 0 and self._replies.empty() and (not self._reading or not self._servicer.accepting)

    async def _write(self) -> None:
        while not self._done():
            reply = await self._replies.get()
            if self._replies.qsize() < self._max_outstanding:
                self._room.set()
            if reply is not None:
                try:
                    await self._context.write(reply[0])
                finally:
                    if reply[1]:
                        self._budget.release(self._peer, reply[1])

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                if self._replies.qsize() >= self._max_outstanding:
                    self._room.clear()
                    await self._room.wait()  # the client is not reading its answers: stop reading its requests
                await self._accept(raw)
        finally:
            self._reading = False
            self.wake()

    async def _accept(self, raw: bytes) -> None:
        start = time.perf_counter()
        try:
            held = self._servicer.receive.charge(len(raw))
        except EmbserveError as err:  # not parsed: its id is read from the wire
            self._reply_error(request_id_of(raw), err, start)
            return
        try:
            await self._admit(raw, start)
        finally:
            held.release()  # queued (max_queue_bytes counts it) or refused

    async def _admit(self, raw: bytes, start: float) -> None:
        request_id = ""
        servicer = self._servicer
        try:
            # Parsed and decoded in one step, off the event loop when large; a decoding error is answered only
            # if the checks below pass.
            request, decoded = await servicer.decoder.run(len(raw), functools.partial(self._decode, raw))
            request_id = request.request_id
            if not servicer.accepting:
                raise ShuttingDown("server is draining; send this request to another replica")
            if not request_id:
                raise InvalidRequest("request_id is required on LookupStream: answers are matched to it")
            if self._in_progress >= self._max_outstanding:
                raise Overloaded(
                    f"{self._in_progress} messages in progress on this stream, the server's max_stream_outstanding; "
                    "wait for answers before sending more"
                )
            if isinstance(decoded, EmbserveError):
                raise decoded
            sparse = decoded
            nbytes = servicer.response_bytes(sparse)
            self._budget.reserve(self._peer, nbytes)
            timeout = self._context.time_remaining()
            if request.timeout_ms:
                timeout = request.timeout_ms / 1e3 if timeout is None else min(timeout, request.timeout_ms / 1e3)
            try:
                future = servicer.batcher.enqueue(sparse, timeout=timeout)
            except EmbserveError:
                self._budget.release(self._peer, nbytes)
                raise
        except EmbserveError as err:
            self._reply_error(request_id, err, start)
            return
        self._in_progress += 1
        servicer.inflight.enter()
        self._futures.add(future)
        future.add_done_callback(functools.partial(self._answered, request_id, start, nbytes))

    def _decode(self, raw: bytes) -> tuple[pb.LookupRequest, SparseRequest | EmbserveError]:
        servicer = self._servicer
        request = servicer.parse(raw)
        try:
            return request, decode_lookup(request, servicer.schema, servicer.key_orders)
        except EmbserveError as err:
            return request, err

    def _answered(self, request_id: str, start: float, nbytes: int, future: asyncio.Future[BatchOutput]) -> None:
        self._futures.discard(future)
        self._in_progress -= 1
        self._servicer.inflight.exit()
        if future.cancelled():
            self._budget.release(self._peer, nbytes)
            self._servicer.count_stream_message(grpc.StatusCode.CANCELLED, start)
            return
        error = future.exception()
        if error is not None:  # no answer to hold: an error reply is counted at 0 bytes
            self._budget.release(self._peer, nbytes)
            if not isinstance(error, EmbserveError):
                logger.error("stream message failed unexpectedly", exc_info=error)
                error = BatchFailed(f"{type(error).__name__}: {error}")
            self._reply_error(request_id, error, start)
            return
        out = future.result()
        self._servicer.count_examples(out.batch_size)
        self._servicer.count_stream_message(grpc.StatusCode.OK, start)
        self._replies.put_nowait((out.response, nbytes))

    def _reply_error(self, request_id: str, error: BaseException, start: float) -> None:
        code = status_code_of(error)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("stream message failed: %s", error)
        self._servicer.count_stream_message(code, start)
        self._replies.put_nowait((error_reply(request_id, error), 0))
