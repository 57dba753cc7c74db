"""gRPC <-> domain for the Open Inference Protocol (KServe v2): `inference.GRPCInferenceService` on embserve's port.

A ModelInfer call carries one model's jagged features as per-key tensors (`<key>__lengths` INT32 `[batch_size]`,
`<key>__values` INT64 `[n]`, `<key>__weights` FP32 `[n]` for weighted tables). They are checked tensor by tensor
here (names, datatypes, shapes, sizes, agreement between a key's tensors), gathered into the `WireFeatures` of an
embserve.v1 request and validated by `validate_features`, whose messages then name the tensors too. From there
the call takes Lookup's path: the same batcher, limits, deadlines and executor. The answer is the output
`embeddings` `[batch_size, output_dim]`, its rows taken from the batch's LookupResponse without a copy and framed
once into a ModelInferResponse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import numpy as np

from embserve.embeddings import ServingModel
from embserve.oip import wire as oip
from embserve.v1.wire import WireFeatures

from .batcher import DynamicBatcher
from .decode import FieldNames, echo, parse_message, validate_features
from .errors import EmbserveError, InvalidRequest, ShuttingDown, UnknownModel, oip_status_code_of
from .executor import BatchOutput
from .framing import field_header
from .metrics import ServerMetrics
from .request import ModelSchema, SparseRequest

__all__ = ["InferenceServicer", "add_inference_to_server", "decode_infer"]

logger = logging.getLogger(__name__)

SERVER_NAME = "embserve"
PLATFORM = "torchrec"
_CONTENTS_FIELD = {"INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents"}
_RAW_OUTPUT_FIELD = oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def _server_version() -> str:
    try:
        return importlib.metadata.version("embserve")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclasses.dataclass(frozen=True)
class _TensorNames(FieldNames):
    """Positions in the flat feature arrays, named as elements of the per-key tensors they came from."""

    batch_size: str = "batch size (the shape of the <key>__lengths inputs)"
    key_position: Mapping[str, int] = dataclasses.field(default_factory=dict)
    id_start: Mapping[str, int] = dataclasses.field(default_factory=dict)
    batch: int = 0

    def element(self, field: str, index: int, key: str) -> str:
        start = self.key_position[key] * self.batch if field == "lengths" else self.id_start[key]
        return f"{oip.input_name(key, field)}[{index - start}]"


def _check_model(name: str, version: str, model: ServingModel) -> None:
    if name != model.config.name:
        raise UnknownModel(f"Request for unknown model: {echo(name)} is not found; this server serves {model.config.name!r}")
    if version and version != model.version:
        raise UnknownModel(
            f"Request for unknown model: {echo(name)} version {echo(version)} is not found; "
            f"the version served is {model.version!r}"
        )


def _tensor(tensor: Any, raw: bytes | None, datatype: str, model: str) -> np.ndarray:
    """The 1-D array an input tensor carries, raw or typed, after checking its datatype, shape and size."""
    name = tensor.name
    if tensor.datatype != datatype:
        raise InvalidRequest(
            f"input {name!r} has datatype {echo(tensor.datatype)}, but model {model!r} expects {datatype}"
        )
    shape = list(tensor.shape)
    if len(shape) != 1 or shape[0] < 0:
        raise InvalidRequest(f"input {name!r} has shape {echo(shape)}; expected a 1-D shape [n]")
    n = shape[0]
    dtype = oip.DATATYPES[datatype]
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidRequest(f"input {name!r} has both typed contents and raw_input_contents")
        if len(raw) != n * dtype.itemsize:
            raise InvalidRequest(
                f"input {name!r} has {len(raw)} bytes of raw contents; shape [{n}] of {datatype} is "
                f"{n * dtype.itemsize} bytes"
            )
        return np.frombuffer(raw, dtype=dtype)
    field = _CONTENTS_FIELD[datatype]
    contents = getattr(tensor.contents, field)
    if len(contents) != n:
        raise InvalidRequest(f"input {name!r} has {len(contents)} contents.{field}; shape [{n}] needs {n}")
    return np.array(contents, dtype=dtype)


def _output_dtype(request: Any) -> str:
    """The embserve dtype of the output: FP32 unless the request parameter `output_datatype` or the requested
    output's parameter `datatype` says FP16 or BF16."""
    asked: dict[str, str] = {}
    if oip.OUTPUT_DATATYPE_PARAMETER in request.parameters:
        asked[f"parameter {oip.OUTPUT_DATATYPE_PARAMETER!r}"] = _string_param(
            request.parameters[oip.OUTPUT_DATATYPE_PARAMETER], oip.OUTPUT_DATATYPE_PARAMETER
        )
    for output in request.outputs:
        if output.name != oip.OUTPUT_NAME:
            raise InvalidRequest(f"unexpected inference output {echo(output.name)}; the output is {oip.OUTPUT_NAME!r}")
        if "datatype" in output.parameters:
            asked["output parameter 'datatype'"] = _string_param(output.parameters["datatype"], "datatype")
    if len(set(asked.values())) > 1:
        raise InvalidRequest(f"conflicting output datatypes: {echo(asked)}")
    datatype = next(iter(asked.values()), "FP32")
    dtype = oip.OUTPUT_DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"output datatype {echo(datatype)} is not one of {', '.join(oip.OUTPUT_DATATYPES)}")
    return dtype


def _string_param(param: Any, name: str) -> str:
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidRequest(f"parameter {name!r} must be a string (FP32, FP16 or BF16)")
    return str(param.string_param)


def decode_infer(request: Any, schema: ModelSchema, model: ServingModel) -> SparseRequest:
    """Checks a ModelInferRequest's tensors and validates its features; raises `InvalidRequest` naming the tensor
    (or `UnknownModel`)."""
    _check_model(request.model_name, request.model_version, model)
    output_dtype = _output_dtype(request)
    inputs = request.inputs
    raw = request.raw_input_contents
    if len(inputs) > len(oip.INPUT_SUFFIXES) * len(schema.keys):
        raise InvalidRequest(f"{len(inputs)} inputs; model {model.config.name!r} has at most "
                             f"{len(oip.INPUT_SUFFIXES) * len(schema.keys)}")
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs")
    tensors: dict[tuple[str, str], np.ndarray] = {}
    for i, tensor in enumerate(inputs):  # one step per input, at most three per model key
        parts = oip.split_input_name(tensor.name)
        if parts is None or schema.index_of(parts[0]) is None:
            raise InvalidRequest(
                f"unexpected inference input {echo(tensor.name)} for model {model.config.name!r}; inputs are "
                "<key>__lengths, <key>__values and <key>__weights for the keys in the model's metadata"
            )
        if parts in tensors:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        key, kind = parts
        if kind == "weights" and not model.table(key).weighted:
            raise InvalidRequest(f"unexpected inference input {tensor.name!r}: table {key!r} is not weighted")
        tensors[parts] = _tensor(tensor, raw[i] if raw else None, oip.INPUT_SUFFIXES[kind], model.config.name)
    keys = sorted({key for key, _ in tensors}, key=lambda k: schema.index_of(k) or 0)
    if not keys:
        raise InvalidRequest("no inputs: send <key>__lengths and <key>__values for at least one of the model's keys")
    first: str | None = None
    lengths: list[np.ndarray] = []
    values: list[np.ndarray] = []
    weights: list[np.ndarray | None] = []
    id_start: dict[str, int] = {}
    n_ids = 0
    for key in keys:
        name = oip.input_name(key, "lengths")
        if (key, "lengths") not in tensors:
            other = next(oip.input_name(key, kind) for k, kind in tensors if k == key)
            raise InvalidRequest(f"input {other!r} needs the input {name!r}")
        key_lengths = tensors[key, "lengths"]
        if first is None:
            first = name
        elif key_lengths.size != lengths[0].size:
            raise InvalidRequest(
                f"input {name!r} has shape [{key_lengths.size}] but {first!r} has [{lengths[0].size}]: every "
                "<key>__lengths holds one length per example of the request"
            )
        key_values = tensors.get((key, "values"), np.zeros(0, dtype=oip.DATATYPES["INT64"]))
        if key_lengths.size and int(key_lengths.min()) >= 0 and int(key_lengths.sum()) != key_values.size:
            raise InvalidRequest(
                f"input {oip.input_name(key, 'values')!r} has {key_values.size} ids but sum({name}) = "
                f"{int(key_lengths.sum())}"
            )
        key_weights = tensors.get((key, "weights"))
        if key_weights is not None and key_weights.size != key_values.size:
            raise InvalidRequest(
                f"input {oip.input_name(key, 'weights')!r} has {key_weights.size} entries but "
                f"{oip.input_name(key, 'values')!r} has {key_values.size}"
            )
        lengths.append(key_lengths)
        values.append(key_values)
        weights.append(key_weights)
        id_start[key] = n_ids
        n_ids += key_values.size
    any_weights = any(w is not None for w in weights)
    features = WireFeatures(
        keys=tuple(keys),
        batch_size=lengths[0].size,
        lengths=np.concatenate(lengths),
        values=np.concatenate(values),
        weights=np.concatenate(
            [w if w is not None else np.ones(v.size, dtype=np.float32) for w, v in zip(weights, values)]
        ) if any_weights else None,
    )
    names = _TensorNames(key_position={k: i for i, k in enumerate(keys)}, id_start=id_start, batch=lengths[0].size)
    return validate_features(features, schema, output_dtype=output_dtype, request_id=request.id, names=names)


class InferenceServicer:
    """The GRPCInferenceService handlers: ModelInfer through the shared batcher, readiness from the drain state.

    Args:
        schema: what requests are validated against (the same as Lookup's).
        batcher: the server's batcher.
        metrics: calls are counted under the method's name (`ModelInfer`, ...).
        current_model: the model serving now (it changes on reload).
        accepting: False once the server drains: ModelInfer answers UNAVAILABLE, the ready calls false.
    """

    def __init__(
        self,
        *,
        schema: ModelSchema,
        batcher: DynamicBatcher[SparseRequest, BatchOutput],
        metrics: ServerMetrics,
        current_model: Callable[[], ServingModel],
        accepting: Callable[[], bool],
    ) -> None:
        self._schema = schema
        self._batcher = batcher
        self._metrics = metrics
        self._current_model = current_model
        self._accepting = accepting
        self._codes: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._infer_seconds = metrics.request_seconds.labels("ModelInfer")
        self._server_version = _server_version()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no ModelInfer is in progress (or `timeout` passes); True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._codes.get((method, code))
        if counter is None:
            counter = self._codes[method, code] = self._metrics.requests.labels(method, code.name)
        counter.inc()

    async def _answer(self, method: str, work: Awaitable[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """Runs a handler's work, counts its status, and turns domain errors into the protocol's status codes."""
        error: EmbserveError | None = None
        code = grpc.StatusCode.OK
        try:
            return await work
        except EmbserveError as err:
            error, code = err, oip_status_code_of(err)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("%s failed: %s", method, err)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s failed unexpectedly", method)
            raise
        finally:
            self._count(method, code)  # before the status leaves, so a caller that sees it sees it counted
        await context.abort(code, str(error))
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        start = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._answer("ModelInfer", self._infer(request, context), context)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            self._infer_seconds.observe(time.perf_counter() - start)

    async def _infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not self._accepting():
            raise ShuttingDown("server is shutting down; retry on another replica")
        model = self._current_model()
        request = parse_message(oip.ModelInferRequest, raw)
        sparse = decode_infer(request, self._schema, model)
        out = await self._batcher.submit(sparse, timeout=context.time_remaining())
        self._metrics.examples.inc(out.batch_size)
        datatype = next(k for k, v in oip.OUTPUT_DATATYPES.items() if v == sparse.output_dtype)
        header = oip.ModelInferResponse(
            model_name=model.config.name,
            model_version=out.model_version,  # the version that computed the rows, as in LookupResponse
            id=request.id,
            outputs=[oip.ModelInferResponse.InferOutputTensor(
                name=oip.OUTPUT_NAME, datatype=datatype, shape=[out.batch_size, model.output_dim]
            )],
        ).SerializeToString()
        return b"".join((header, field_header(_RAW_OUTPUT_FIELD, out.rows.nbytes), out.rows))

    async def ServerLive(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            parse_message(oip.ServerLiveRequest, request)
            return oip.ServerLiveResponse(live=True).SerializeToString()

        return await self._answer("ServerLive", work(), context)

    async def ServerReady(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            parse_message(oip.ServerReadyRequest, request)
            return oip.ServerReadyResponse(ready=self._accepting()).SerializeToString()

        return await self._answer("ServerReady", work(), context)

    async def ModelReady(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            message = parse_message(oip.ModelReadyRequest, request)
            model = self._current_model()
            known = message.name == model.config.name and message.version in ("", model.version)
            return oip.ModelReadyResponse(ready=known and self._accepting()).SerializeToString()

        return await self._answer("ModelReady", work(), context)

    async def ServerMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            parse_message(oip.ServerMetadataRequest, request)
            return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._server_version).SerializeToString()

        return await self._answer("ServerMetadata", work(), context)

    async def ModelMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            message = parse_message(oip.ModelMetadataRequest, request)
            model = self._current_model()
            _check_model(message.name, message.version, model)
            return model_metadata(model).SerializeToString()

        return await self._answer("ModelMetadata", work(), context)


def model_metadata(model: ServingModel) -> oip.ModelMetadataResponse:
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


def add_inference_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Registers the service with request bytes handed to the handlers unparsed (corrupt data is answered with
    INVALID_ARGUMENT) and responses already serialized."""
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in oip.METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(oip.SERVICE_NAME, handlers),))
