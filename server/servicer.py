"""gRPC <-> front door for embserve.v1's unary calls: Lookup and GetModelMetadata. gRPC types stop here.

Lookup returns its answer; the answer stays counted among those owed to its connection until the call is over
(the front door releases it from the call's done callback), which grpc.aio reaches only once the transport has
taken the answer: a client that does not read holds it counted for as long as it holds it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from embserve.v1 import embserve_pb2 as pb

from .backend import BatchOutput, ModelView
from .decode import parse_message
from .errors import EmbserveError, status_code_of
from .frontdoor import FrontDoor, Refusal
from .placement import Placement

__all__ = ["EmbeddingServicer"]


class EmbeddingServicer:
    """Lookup and GetModelMetadata over the server's front door."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door

    async def Lookup(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        door = self._door
        outcome = await door.run(
            "Lookup", door.serve(request, context, door.decode_lookup, _lookup_response), in_flight=True
        )
        if isinstance(outcome, Refusal):
            if not outcome.answered:  # the caller is gone: end quietly, as gRPC ends a cancelled call
                raise asyncio.CancelledError
            await context.abort(outcome.code, outcome.message)
        assert isinstance(outcome, bytes)
        return outcome

    async def GetModelMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        door = self._door
        try:
            parse_message(pb.GetModelMetadataRequest, request)
        except EmbserveError as err:
            door.count("GetModelMetadata", status_code_of(err))
            await context.abort(status_code_of(err), str(err))
        model = door.model
        door.saw(context.peer())
        door.count("GetModelMetadata", grpc.StatusCode.OK)
        limits, bounds = door.limits, door.bounds
        return pb.ModelMetadata(
            name=model.config.name,
            version=model.version,
            keys=model.keys,
            output_dim=model.output_dim,
            device=model.device_name,
            engine=model.engine_name,
            max_batch_size=door.backend.max_batch_size,
            max_request_examples=limits.max_request_examples,
            max_request_ids=limits.max_request_ids,
            max_message_bytes=limits.max_message_bytes,
            max_stream_outstanding=limits.max_stream_outstanding,
            max_stream_batch=limits.max_stream_outstanding,
            max_response_bytes=bounds.max_response_bytes,
            max_queue_bytes=door.backend.max_queue_bytes,
            max_pending_response_bytes=bounds.max_pending_response_bytes,
            max_pending_response_bytes_per_connection=bounds.max_pending_response_bytes_per_connection,
            max_receive_bytes=bounds.max_receive_bytes,
            tables=[_table_metadata(model, name, door.placement) for name in model.keys],
            **_placement_metadata(door.placement),
        )

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The handlers, with request bytes handed to them unparsed, so that corrupt wire data is answered with
        INVALID_ARGUMENT by decoding instead of an UNKNOWN from the framework."""
        return {
            "Lookup": grpc.unary_unary_rpc_method_handler(self.Lookup),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self.GetModelMetadata, response_serializer=pb.ModelMetadata.SerializeToString
            ),
        }


def _lookup_response(request: object, sparse: object, out: BatchOutput) -> bytes:
    return out.response  # the backend frames LookupResponses itself


def _placement_metadata(placement: Placement | None) -> dict[str, Any]:
    if placement is None:
        return {}
    shard = {} if placement.shard_index is None else {"shard_index": placement.shard_index}
    return {
        "plan_digest": placement.plan_digest,
        "shard_count": placement.shard_count if placement.shard_index is not None else 0,
        "model_keys": placement.model_keys,
        **shard,
    }


def _table_metadata(model: ModelView, name: str, placement: Placement | None = None) -> pb.TableMetadata:
    table = model.table(name)
    start, rows = placement.row_slices.get(name, (0, 0)) if placement is not None else (0, 0)
    return pb.TableMetadata(
        row_start=start,
        table_rows=rows,
        name=name,
        feature_names=[name],
        num_embeddings=table.num_embeddings,
        embedding_dim=table.embedding_dim,
        data_type=table.data_type.value,
        serving_dtype=model.serving_dtype(name).value,
        weight_bytes=model.weight_bytes.get(name, 0),
        weighted=table.weighted,
        id_policy=table.id_policy.value,
        storage=model.table_storage(name).value,
        disk_bytes=model.disk_bytes(name),
        resident_bytes=model.resident_bytes(name),
    )
