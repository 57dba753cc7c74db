"""gRPC <-> domain: the EmbeddingService handlers. gRPC types stop here.

Lookup is registered as a response-streaming handler that writes its one answer (the same on the wire as a unary
answer): grpc.aio's write returns only once the transport has taken the message, which a client that does not
read never lets it do, so the answer's bytes stay counted in the `ResponseBudget` (from admission) for as long
as they are held. (Its request is read under the receive budget: see `receiving`.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from embserve.embeddings import ServingModel
from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc
from embserve.v1.wire import SERVICE_NAME

from .admission import Bounds, OffloadDecoder, ReceiveBudget, ResponseBudget, response_bytes
from .batcher import DynamicBatcher
from .config import ServerConfig
from .decode import KeyOrders, check_lookup_wire, decode_lookup, parse_message
from .errors import EmbserveError, ShuttingDown, status_code_of
from .executor import BatchOutput
from .inflight import InFlight
from .metrics import ServerMetrics
from .request import ModelSchema, SparseRequest
from .streams import LookupStream, refuse_while_draining

__all__ = ["EmbeddingServicer", "add_to_server", "model_schema"]

logger = logging.getLogger(__name__)


def model_schema(model: ServingModel, config: ServerConfig, bounds: Bounds | None = None) -> ModelSchema:
    """What requests to `model` are validated against under `config`'s request limits."""
    return ModelSchema.of(
        model,
        max_request_examples=config.limits.max_request_examples,
        max_request_ids=config.limits.max_request_ids,
        max_response_bytes=(bounds or Bounds(config)).max_response_bytes,
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):  # type: ignore[misc]
    """Decodes and validates each call, submits it to the batcher, and encodes its share of the batch."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        schema: ModelSchema,
        batcher: DynamicBatcher[SparseRequest, BatchOutput],
        metrics: ServerMetrics,
        current_model: Callable[[], ServingModel],
        budget: ResponseBudget | None = None,
        decoder: OffloadDecoder | None = None,
        inflight: InFlight | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        self._config = config
        self.bounds = bounds or Bounds(config)
        self.budget = budget or ResponseBudget(
            self.bounds.max_pending_response_bytes, self.bounds.max_pending_response_bytes_per_connection
        )
        limits = config.limits
        self.receive = ReceiveBudget(self.bounds.max_receive_bytes, limits.max_message_bytes)
        self.decoder = decoder or OffloadDecoder(
            min_bytes=limits.offload_decode_bytes, threads=limits.decode_threads, max_waiting=limits.max_decode_queue
        )
        self.schema = schema
        self.key_orders = KeyOrders(schema)
        self.batcher = batcher
        self._metrics = metrics
        self._current_model = current_model
        self._lookup_seconds = metrics.request_seconds.labels("Lookup")
        self._stream_seconds = metrics.request_seconds.labels("LookupStream")
        self._examples = metrics.examples
        self.accepting = True
        self.inflight = inflight or InFlight()
        self.count = metrics.count
        self._streams: set[LookupStream] = set()

    def count_stream_message(self, code: grpc.StatusCode, start: float) -> None:
        self.count("LookupStream", code)
        self._stream_seconds.observe(time.perf_counter() - start)

    def count_examples(self, examples: int) -> None:
        self._examples.inc(examples)

    def begin_drain(self) -> None:
        """New calls and stream messages are answered UNAVAILABLE; open streams end once their messages are
        answered."""
        self.accepting = False
        for stream in self._streams:
            stream.wake()

    async def Lookup(self, request: bytes, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        start = time.perf_counter()
        self.inflight.enter()
        error: EmbserveError | None = None
        code = grpc.StatusCode.OK
        try:
            await self._lookup(request, context)
            return
        except EmbserveError as err:
            error, code = err, status_code_of(err)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("lookup failed: %s", err)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("lookup failed unexpectedly")
            raise
        finally:
            # Recorded before the status leaves the server, so a caller that sees it also sees it counted.
            self.inflight.exit()
            self.count("Lookup", code)
            self._lookup_seconds.observe(time.perf_counter() - start)
        await context.abort(code, str(error))
        raise AssertionError("context.abort returned")  # pragma: no cover

    def parse(self, raw: bytes) -> pb.LookupRequest:
        """LookupRequest bytes parsed; a large message's field counts are checked on the wire first."""
        if len(raw) >= self.decoder.min_bytes:
            check_lookup_wire(raw, len(self.schema.keys))
        return parse_message(pb.LookupRequest, raw)

    def decode(self, raw: bytes) -> SparseRequest:
        return decode_lookup(self.parse(raw), self.schema, self.key_orders)

    async def _lookup(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        if not self.accepting:
            raise ShuttingDown("server is shutting down; retry on another replica")
        sparse = await self.decoder.run(len(request), lambda: self.decode(request))
        await self.answer(context, sparse)

    async def answer(self, context: grpc.aio.ServicerContext, sparse: SparseRequest) -> None:
        """Submits a decoded call and writes its answer, its response bytes counted in the budget from now until
        the transport has taken them."""
        with self.budget.held(context.peer(), self.response_bytes(sparse)):
            out = await self.batcher.submit(sparse, timeout=context.time_remaining())
            self._examples.inc(out.batch_size)
            await context.write(out.response)

    def response_bytes(self, sparse: SparseRequest) -> int:
        return response_bytes(sparse.batch_size, self.schema.output_dim, sparse.output_dtype)

    async def LookupStream(  # type: ignore[override]
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        if not self.accepting:
            await refuse_while_draining(requests, context, self.count)
            return
        stream = LookupStream(self, context, self._config.limits.max_stream_outstanding)
        self._streams.add(stream)
        try:
            await stream.run(requests)
        finally:
            self._streams.discard(stream)

    async def GetModelMetadata(  # type: ignore[override]
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadata:
        try:
            parse_message(pb.GetModelMetadataRequest, request)
        except EmbserveError as err:
            self.count("GetModelMetadata", status_code_of(err))
            await context.abort(status_code_of(err), str(err))
        model = self._current_model()
        self.count("GetModelMetadata", grpc.StatusCode.OK)
        return pb.ModelMetadata(
            name=model.config.name,
            version=model.version,
            keys=model.keys,
            output_dim=model.output_dim,
            device=str(model.device),
            engine=model.engine.value,
            max_batch_size=self.batcher.max_batch_size,
            max_request_examples=self._config.limits.max_request_examples,
            max_request_ids=self._config.limits.max_request_ids,
            max_message_bytes=self._config.limits.max_message_bytes,
            max_stream_outstanding=self._config.limits.max_stream_outstanding,
            max_response_bytes=self.bounds.max_response_bytes,
            max_queue_bytes=self.batcher.max_queue_bytes or 0,
            max_pending_response_bytes=self.budget.max_total,
            max_pending_response_bytes_per_connection=self.budget.max_per_connection,
            max_receive_bytes=self.receive.max_bytes,
            tables=[_table_metadata(model, name) for name in model.keys],
        )



def _table_metadata(model: ServingModel, name: str) -> pb.TableMetadata:
    table = model.table(name)
    return pb.TableMetadata(
        name=name,
        feature_names=[name],
        num_embeddings=table.num_embeddings,
        embedding_dim=table.embedding_dim,
        data_type=table.data_type.value,
        serving_dtype=model.serving_dtype(name).value,
        weight_bytes=model.weight_bytes.get(name, 0),
        weighted=table.weighted,
        id_policy=table.id_policy.value,
    )


def add_to_server(servicer: EmbeddingServicer, server: grpc.aio.Server) -> None:
    """Registers the service with request bytes handed to the handlers unparsed, so that corrupt wire data is
    answered with INVALID_ARGUMENT by `decode` instead of an UNKNOWN from the framework."""
    handlers = {
        # Bytes in, one serialized response written out (see the module docstring).
        "Lookup": grpc.unary_stream_rpc_method_handler(servicer.Lookup),
        "LookupStream": grpc.stream_stream_rpc_method_handler(servicer.LookupStream),  # bytes both ways
        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelMetadata, response_serializer=pb.ModelMetadata.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
