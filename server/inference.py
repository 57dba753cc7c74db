"""gRPC <-> front door for the Open Inference Protocol (KServe v2): `inference.GRPCInferenceService` on embserve's
port.

ModelInfer takes Lookup's path through the front door (decoding in `decode_oip`); its answer is the output
`embeddings` `[batch_size, output_dim]`, the rows taken from the backend's LookupResponse without a copy and framed
once into a ModelInferResponse, named by the version that computed them. The readiness calls follow the drain
state. Status codes are Triton's for the same conditions (`errors.oip_status_code_of`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.metadata
from collections.abc import Awaitable, Callable

import grpc

from embserve.oip import wire as oip

from .backend import BatchOutput, ModelView
from .decode import parse_message
from .decode_oip import check_model
from .errors import UnknownModel, oip_status_code_of
from .framing import field_header
from .frontdoor import FrontDoor, Refusal
from .request import SparseRequest

__all__ = ["InferenceServicer", "infer_response", "model_metadata"]

SERVER_NAME = "embserve"
PLATFORM = "torchrec"
_RAW_OUTPUT_FIELD = oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def _server_version() -> str:
    try:
        return importlib.metadata.version("embserve")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class InferenceServicer:
    """The GRPCInferenceService handlers, over the server's front door."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._server_version = _server_version()

    async def _answer(
        self, method: str, work: Awaitable[bytes], context: grpc.aio.ServicerContext, in_flight: bool = False
    ) -> bytes:
        outcome = await self._door.run(method, work, status_of=oip_status_code_of, in_flight=in_flight)
        if isinstance(outcome, Refusal):
            if not outcome.answered:  # the caller is gone: end quietly, as gRPC ends a cancelled call
                raise asyncio.CancelledError
            await context.abort(outcome.code, outcome.message)
        assert isinstance(outcome, bytes)
        return outcome

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The answer stays counted among those not yet taken until the call is over, as Lookup's does."""
        work = self._door.serve(request, context, self._decode, self._checked)
        return await self._answer("ModelInfer", work, context, in_flight=True)

    def _decode(self, raw: bytes) -> tuple[oip.ModelInferRequest, SparseRequest]:
        """The request, decoded, whose answer the backend frames as a ModelInferResponse (`infer_response`)."""
        request, sparse = self._door.decode_infer(raw)
        frame = functools.partial(infer_response, request_id=request.id, datatype=oip.DATATYPE_OF[sparse.output_dtype])
        return request, dataclasses.replace(sparse, frame=frame)

    def _checked(self, request: oip.ModelInferRequest, sparse: SparseRequest, out: BatchOutput) -> bytes:
        """The backend's answer, named by the version that computed it; `UnknownModel` when the request named
        another (a reload replaced it while the request waited)."""
        if request.model_version and request.model_version != out.model_version:
            raise UnknownModel(
                f"version {request.model_version!r} of model {request.model_name!r} was replaced by "
                f"{out.model_version!r} while this request waited; retry"
            )
        return out.response

    def _probe(self, method: str, answer: Callable[[], bytes], context: grpc.aio.ServicerContext) -> Awaitable[bytes]:
        async def work() -> bytes:
            return answer()

        return self._answer(method, work(), context)

    async def ServerLive(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def answer() -> bytes:
            parse_message(oip.ServerLiveRequest, request)
            return oip.ServerLiveResponse(live=True).SerializeToString()

        return await self._probe("ServerLive", answer, context)

    async def ServerReady(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def answer() -> bytes:
            parse_message(oip.ServerReadyRequest, request)
            return oip.ServerReadyResponse(ready=self._door.accepting).SerializeToString()

        return await self._probe("ServerReady", answer, context)

    async def ModelReady(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def answer() -> bytes:
            message = parse_message(oip.ModelReadyRequest, request)
            model = self._door.model
            known = message.name == model.config.name and message.version in ("", model.version)
            return oip.ModelReadyResponse(ready=known and self._door.accepting).SerializeToString()

        return await self._probe("ModelReady", answer, context)

    async def ServerMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def answer() -> bytes:
            parse_message(oip.ServerMetadataRequest, request)
            return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._server_version).SerializeToString()

        return await self._probe("ServerMetadata", answer, context)

    async def ModelMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def answer() -> bytes:
            message = parse_message(oip.ModelMetadataRequest, request)
            model = self._door.model
            check_model(message.name, message.version, model)
            return model_metadata(model).SerializeToString()

        return await self._probe("ModelMetadata", answer, context)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's handlers, request bytes handed to them unparsed (corrupt data is answered with
        INVALID_ARGUMENT) and responses already serialized."""
        return {name: grpc.unary_unary_rpc_method_handler(getattr(self, name)) for name in oip.METHODS}


def infer_response(
    rows: memoryview,
    *,
    request_id: str,
    datatype: str,
    batch_size: int,
    output_dim: int,
    model_name: str,
    model_version: str,
) -> bytes:
    """A serialized ModelInferResponse around one request's rows (a `Framing`: they are copied once, here, where
    the backend makes them), its raw output last."""
    header = oip.ModelInferResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        outputs=[
            oip.ModelInferResponse.InferOutputTensor(
                name=oip.OUTPUT_NAME, datatype=datatype, shape=[batch_size, output_dim]
            )
        ],
    ).SerializeToString()
    return b"".join((header, field_header(_RAW_OUTPUT_FIELD, rows.nbytes), rows))


def model_metadata(model: ModelView) -> oip.ModelMetadataResponse:
    """The inputs (three per weighted key, two per other key, canonical key order) and the output of `model`."""
    tensor = oip.ModelMetadataResponse.TensorMetadata
    inputs = []
    for key in model.keys:
        kinds = ("lengths", "values", "weights") if model.table(key).weighted else ("lengths", "values")
        inputs += [tensor(name=oip.input_name(key, k), datatype=oip.INPUT_SUFFIXES[k], shape=[-1]) for k in kinds]
    return oip.ModelMetadataResponse(
        name=model.config.name,
        versions=[model.version],
        platform=PLATFORM,
        inputs=inputs,
        outputs=[tensor(name=oip.OUTPUT_NAME, datatype="FP32", shape=[-1, model.output_dim])],
    )
