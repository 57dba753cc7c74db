"""The front door: the one request path that every protocol's handlers translate into.

Lookup (`servicer`), LookupStream (`streams`) and ModelInfer (`inference`) differ only in their wire types. What
they share is here, built once by the app: decoding against the model's schema (large messages off the event
loop), the byte budgets (`admission`), calls in flight, the accepting/draining state, the one place that counts
each call's status and time, and the `Backend` that computes. The front door knows no gRPC call objects: a call
is anything with a peer, a remaining time, a write and done callbacks (`CallContext`, which grpc.aio's context is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2 as pb

from .admission import Owed, ReceiveBudget, ResponseBudget
from .backend import Backend, BatchOutput, ModelView
from .bounds import Bounds, response_bytes
from .config import LimitsConfig
from .decode import KeyOrders, decode_lookup, parse_message, read_lookup_fields
from .decode_oip import InferDecoder, check_infer_wire
from .errors import CallGone, EmbserveError, ShuttingDown, status_code_of
from .inflight import InFlight
from .lookup_wire import LookupMessage
from .metrics import ServerMetrics
from .offload import OffloadDecoder
from .placement import Placement
from .request import ModelSchema, SparseRequest
from .unused_connections import PeerActivity

__all__ = ["CallContext", "FrontDoor", "Refusal", "write"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")

# LookupRequests of at least this many bytes are read in place (`lookup_wire`) rather than parsed by protobuf: below
# it, protobuf's copies of the arrays cost less than walking the fields in Python (26 keys: equal at about 400 KiB).
READ_IN_PLACE_BYTES = 512 * 1024


class CallContext(Protocol):
    """What the front door needs of a call: its connection, its remaining time, a way to send an answer, and a
    callback once the call is over (grpc.aio runs it after the call's last operations, its answer among them,
    have completed: the transport has taken the answer, or the call ended without it)."""

    def peer(self) -> str: ...
    def time_remaining(self) -> float | None: ...
    async def write(self, message: bytes) -> None: ...
    def add_done_callback(self, callback: Callable[[Any], None]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Refusal:
    """How a call ends when it fails: the status code its protocol answers with, and the message."""

    code: grpc.StatusCode
    message: str

    @property
    def answered(self) -> bool:
        """Whether the caller is still there to be told (not so after `CallGone`)."""
        return self.code is not grpc.StatusCode.CANCELLED


async def write(call: CallContext, message: bytes) -> None:
    """Sends a message on a call; `CallGone` when the caller has gone away (the transport refuses the write)."""
    try:
        await call.write(message)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # grpc.aio reports a write to a call whose peer left as its own internal error
        raise CallGone(f"the caller went away before its answer was sent ({type(err).__name__})") from None


def _release(owed: Owed, call: object) -> None:
    owed.release()


class FrontDoor:
    """What every protocol shares; see the module docstring.

    Args:
        backend: computes validated requests.
        bounds: the server's byte bounds (this process's share).
        limits: the request limits (examples, ids, decoding threads).
        metrics: calls are counted and timed there by method and status.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        bounds: Bounds,
        limits: LimitsConfig,
        metrics: ServerMetrics,
        activity: PeerActivity | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.backend = backend
        self.placement = placement  # where this server stands in a sharding plan, if it serves one
        self.activity = activity
        self.bounds = bounds
        self.limits = limits
        self.metrics = metrics
        self.schema = ModelSchema.of(
            backend.model,
            max_request_examples=limits.max_request_examples,
            max_request_ids=limits.max_request_ids,
            max_response_bytes=bounds.max_response_bytes,
        )
        self.key_orders = KeyOrders(self.schema)
        self.infer_decoder = InferDecoder(self.schema)
        self.responses = ResponseBudget(
            bounds.max_pending_response_bytes,
            bounds.max_pending_response_bytes_per_connection,
            # Calls held on one connection keep their requests: at most half the receive budget.
            max_held_request_bytes=bounds.max_receive_bytes // 2,
            on_hold=metrics.flow_control_holds.inc,
        )
        self.receive = ReceiveBudget(bounds.max_receive_bytes)
        self.offload = OffloadDecoder(
            min_bytes=limits.offload_decode_bytes, threads=limits.decode_threads, max_waiting=limits.max_decode_queue
        )
        self.inflight = InFlight()
        self.accepting = True
        self.streams_open = True  # False once streams are told to end
        self._drain_listeners: set[Callable[[], None]] = set()
        self._seconds = {m: metrics.request_seconds.labels(m) for m in ("Lookup", "LookupStream", "ModelInfer")}

    @property
    def model(self) -> ModelView:
        """The model serving now (it changes on reload)."""
        return self.backend.model

    def saw(self, peer: str) -> None:
        """A call from `peer` (its connection is in use)."""
        if self.activity is not None:
            self.activity.saw(peer)

    # --- decoding ------------------------------------------------------------------------------------------------

    def parse_lookup(self, raw: bytes) -> LookupMessage:
        """LookupRequest bytes parsed; a large message is read in place instead (its arrays views of `raw`, its
        field counts bounded as they are read), where protobuf's copies of its arrays would cost more."""
        if len(raw) >= READ_IN_PLACE_BYTES:
            return read_lookup_fields(raw, len(self.schema.keys), self.limits.max_stream_outstanding)
        return parse_message(pb.LookupRequest, raw)

    def validate_lookup(self, request: LookupMessage) -> SparseRequest:
        return decode_lookup(request, self.schema, self.key_orders)

    def decode_lookup(self, raw: bytes) -> tuple[LookupMessage, SparseRequest]:
        request = self.parse_lookup(raw)
        return request, self.validate_lookup(request)

    def decode_infer(self, raw: bytes) -> tuple[oip.ModelInferRequest, SparseRequest]:
        """A ModelInferRequest parsed and validated against the model serving now."""
        if len(raw) >= self.offload.min_bytes:
            check_infer_wire(raw, self.infer_decoder.max_inputs)
        request = parse_message(oip.ModelInferRequest, raw)
        return request, self.infer_decoder.decode(request, self.model)

    # --- draining ------------------------------------------------------------------------------------------------

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("server is shutting down; retry on another replica")

    def on_drain(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Calls `listener` when the drain starts; returns the function that unsubscribes it."""
        self._drain_listeners.add(listener)
        return functools.partial(self._drain_listeners.discard, listener)

    def begin_drain(self) -> None:
        """New calls and stream messages are answered UNAVAILABLE; open streams end once their messages are
        answered (those with none end now)."""
        self.accepting = False
        self.end_streams()

    def end_streams(self) -> None:
        """Open streams answer new messages UNAVAILABLE and end once their messages are answered (those with none
        end now); unary calls are still served (a process handing its port over to another)."""
        self.streams_open = False
        for listener in list(self._drain_listeners):
            listener()

    # --- status and metrics --------------------------------------------------------------------------------------

    def count(self, method: str, code: grpc.StatusCode, start: float | None = None) -> None:
        """One call or stream message of `method` ended with `code`; its time is observed when `start` is given."""
        self.metrics.count(method, code)
        if start is not None:
            seconds = self._seconds.get(method)
            if seconds is not None:
                seconds.observe(time.perf_counter() - start)

    async def run(
        self,
        method: str,
        work: Awaitable[T],
        *,
        status_of: Callable[[BaseException], grpc.StatusCode] = status_code_of,
        in_flight: bool = False,
    ) -> T | Refusal:
        """Runs one call's work and counts its status (and, for lookups, its time) before the status leaves the
        server, so that a caller who sees it also sees it counted. A domain error comes back as the `Refusal` the
        front end aborts with; cancellation and unexpected errors propagate. `in_flight`: the call counts among
        those a drain waits for."""
        start = time.perf_counter()
        if in_flight:
            self.inflight.enter()
        code = grpc.StatusCode.OK
        try:
            return await work
        except EmbserveError as err:
            code = status_of(err)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("%s failed: %s", method, err)
            return Refusal(code, str(err))
        except BaseException as err:
            code = grpc.StatusCode.CANCELLED if isinstance(err, asyncio.CancelledError) else grpc.StatusCode.INTERNAL
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("%s failed unexpectedly", method)
            raise
        finally:
            if in_flight:
                self.inflight.exit()
            self.count(method, code, start if method in self._seconds else None)

    # --- one request, one answer ---------------------------------------------------------------------------------

    async def serve(
        self,
        raw: bytes,
        call: CallContext,
        decode: Callable[[bytes], tuple[M, SparseRequest]],
        frame: Callable[[M, SparseRequest, BatchOutput], bytes],
    ) -> bytes:
        """One request message to one answer, which the unary handler returns: decode, admit, compute on the
        backend, frame.

        The message counts in the receive budget from now until it is queued. Admission holds the call while its
        connection is owed its bound of answers (flow control) and refuses it while the answers computed and not
        taken, over all connections, are at theirs. The call's deadline goes with it to the backend; cancelling the
        caller abandons it. The answer stays owed to the connection until the call is over (its done callback):
        grpc.aio ends a unary call only once the transport has taken its answer, which a client that does not read
        never lets it do.
        """
        peer = call.peer()
        self.saw(peer)
        with self.receive.holding(len(raw)) as held:
            self.check_accepting()
            message, sparse = await self.offload.run(len(raw), functools.partial(decode, raw))
            owed = await self.responses.admit(
                peer, self.response_bytes(sparse), request_bytes=len(raw), timeout=call.time_remaining()
            )
            handed_over = False
            try:
                future = self.backend.enqueue(sparse, timeout=call.time_remaining())
                held.release()  # queued: the queue bound counts it from here
                out = await future
                del future  # it holds `out` too, which is freed below once framed
                owed.mark_computed()
                self.metrics.examples.inc(out.batch_size)
                answer = frame(message, sparse, out)
                del out  # the backend's answer, when `frame` made another
                call.add_done_callback(functools.partial(_release, owed))
                handed_over = True
                return answer
            finally:
                if not handed_over:
                    owed.release()

    def response_bytes(self, sparse: SparseRequest) -> int:
        return response_bytes(sparse.batch_size, self.schema.output_dim, sparse.output_dtype)

    # --- what is counted now -------------------------------------------------------------------------------------

    def accounting(self) -> dict[str, int]:
        """Every budget and counter of calls in progress; all zero when no call is in progress."""
        return {
            "receive_bytes": self.receive.used,
            "owed_response_bytes": self.responses.owed,
            "unsent_response_bytes": self.responses.unsent,
            "owed_connections": self.responses.connections,
            "held_calls": self.responses.waiting,
            "queued_bytes": self.backend.queued_bytes,
            "queued_examples": self.backend.queued_examples,
            "in_flight": self.inflight.count,
            "decoding": self.offload.waiting,
            "open_streams": len(self._drain_listeners),
        }
