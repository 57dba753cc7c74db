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
from collections.abc import Awaitable, Callable

import grpc
import numpy as np

from embserve.embeddings import ServingModel
from embserve.oip import wire as oip
from embserve.v1.wire import WireFeatures

from .admission import OffloadDecoder, ResponseBudget, response_bytes
from .batcher import DynamicBatcher
from .decode import LENGTH_DELIMITED, MAX_OTHER_FIELDS, FieldNames, echo, parse_message, validate_features, wire_fields
from .errors import EmbserveError, InvalidRequest, ShuttingDown, UnknownModel, oip_status_code_of
from .executor import BatchOutput
from .framing import field_header
from .inflight import InFlight
from .metrics import ServerMetrics
from .request import ModelSchema, SparseRequest

__all__ = ["InferDecoder", "InferenceServicer", "add_inference_to_server", "model_metadata"]

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
    """Positions in the flat feature arrays, named as elements of the per-key tensors they came from (worked out
    only when a message needs one)."""

    batch_size: str = "batch size (the shape of the <key>__lengths inputs)"
    keys: tuple[str, ...] = ()
    ids_per_key: tuple[int, ...] = ()
    batch: int = 0

    def element(self, field: str, index: int, key: str) -> str:
        k = self.keys.index(key)
        start = k * self.batch if field == "lengths" else sum(self.ids_per_key[:k])
        return f"{oip.input_name(key, field)}[{index - start}]"


def _check_model(name: str, version: str, model: ServingModel) -> None:
    if name != model.config.name:
        raise UnknownModel(f"Request for unknown model: {echo(name)} is not found; this server serves {model.config.name!r}")
    if version and version != model.version:
        raise UnknownModel(
            f"Request for unknown model: {echo(name)} version {echo(version)} is not found; "
            f"the version served is {model.version!r}"
        )


def _tensor_bytes(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, datatype: str, model: str) -> tuple[bytes, int]:
    """The little-endian bytes of an input tensor, raw or typed, and its element count, after checking its
    datatype, shape and size."""
    name = tensor.name
    if tensor.datatype != datatype:
        raise InvalidRequest(
            f"input {name!r} has datatype {echo(tensor.datatype)}, but model {model!r} expects {datatype}"
        )
    shape = tensor.shape
    if len(shape) != 1 or shape[0] < 0:
        raise InvalidRequest(f"input {name!r} has shape {echo(list(shape))}; expected a 1-D shape [n]")
    n = shape[0]
    dtype = oip.DATATYPES[datatype]
    if raw is not None:
        if len(raw) != n * dtype.itemsize:
            raise InvalidRequest(
                f"input {name!r} has {len(raw)} bytes of raw contents; shape [{n}] of {datatype} is "
                f"{n * dtype.itemsize} bytes"
            )
        if tensor.HasField("contents"):
            raise InvalidRequest(f"input {name!r} has both typed contents and raw_input_contents")
        return raw, n
    field = _CONTENTS_FIELD[datatype]
    contents = getattr(tensor.contents, field)
    if len(contents) != n:
        raise InvalidRequest(f"input {name!r} has {len(contents)} contents.{field}; shape [{n}] needs {n}")
    return np.array(contents, dtype=dtype).tobytes(), n


def _output_dtype(request: oip.ModelInferRequest) -> str:
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


def _string_param(param: oip.InferParameter, name: str) -> str:
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidRequest(f"parameter {name!r} must be a string (FP32, FP16 or BF16)")
    return str(param.string_param)


_INFER_FIELDS = oip.ModelInferRequest.DESCRIPTOR.fields_by_name
_INPUTS = _INFER_FIELDS["inputs"].number
_RAW_INPUT_CONTENTS = _INFER_FIELDS["raw_input_contents"].number


def check_infer_wire(raw: bytes, max_inputs: int) -> None:
    """Counts the fields of a large ModelInferRequest on the wire before it is parsed, as `check_lookup_wire`
    does for a LookupRequest: at most `max_inputs` input tensors and raw contents, a few other fields, and a few
    fields in each input (its parameters included), so that no field repeated millions of times becomes millions
    of objects. The walk stops at the first field over a bound."""
    counts = {_INPUTS: 0, _RAW_INPUT_CONTENTS: 0}
    limit = 2 * max_inputs + MAX_OTHER_FIELDS
    for number, wire_type, start, end in wire_fields(raw, 0, len(raw), "the ModelInferRequest", limit):
        if number not in counts:
            continue
        counts[number] += 1
        if counts[number] > max_inputs:
            name = "inputs" if number == _INPUTS else "raw_input_contents"
            raise InvalidRequest(f"the request has more than {max_inputs} {name}; the model takes {max_inputs}")
        if number == _INPUTS and wire_type == LENGTH_DELIMITED:
            for _ in wire_fields(raw, start, end, "an input tensor", MAX_OTHER_FIELDS):
                pass


class InferDecoder:
    """ModelInferRequest -> `SparseRequest`: checks the tensors, gathers them into the flat arrays of an
    embserve.v1 request in canonical key order, and validates those with `validate_features`.

    Per tensor, the work is a dictionary lookup and a few field reads; the arrays are joined and decoded with one
    `np.frombuffer` per kind, and the per-key checks are vectorised.
    """

    def __init__(self, schema: ModelSchema) -> None:
        self._schema = schema
        # Every valid input name -> (canonical key index, kind); weights only for weighted tables.
        self._inputs = {
            oip.input_name(key, kind): (k, kind)
            for k, key in enumerate(schema.keys)
            for kind in oip.INPUT_SUFFIXES
            if kind != "weights" or schema.weighted[k]
        }
        self.max_inputs = len(self._inputs)

    def decode(self, request: oip.ModelInferRequest, model: ServingModel) -> SparseRequest:
        """Raises `InvalidRequest` naming the tensor, or `UnknownModel`."""
        _check_model(request.model_name, request.model_version, model)
        output_dtype = _output_dtype(request)
        schema = self._schema
        inputs = request.inputs
        raw = request.raw_input_contents
        if len(inputs) > len(self._inputs):
            raise InvalidRequest(f"{len(inputs)} inputs; model {model.config.name!r} has {len(self._inputs)}")
        if raw and len(raw) != len(inputs):
            raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs")
        tensors: dict[tuple[int, str], tuple[bytes, int]] = {}
        for i, tensor in enumerate(inputs):  # one step per input, at most three per model key
            slot = self._inputs.get(tensor.name)
            if slot is None:
                raise self._unexpected(tensor.name, model.config.name)
            if slot in tensors:
                raise InvalidRequest(f"input {tensor.name!r} is given twice")
            tensors[slot] = _tensor_bytes(tensor, raw[i] if raw else None, oip.INPUT_SUFFIXES[slot[1]],
                                          model.config.name)
        present = sorted({k for k, _ in tensors})
        if not present:
            raise InvalidRequest("no inputs: send <key>__lengths and <key>__values for at least one of the model's keys")
        keys = tuple(schema.keys[k] for k in present)
        lengths_parts, values_parts, counts = [], [], []
        batch: int | None = None
        for k, key in zip(present, keys):
            lengths = tensors.get((k, "lengths"))
            if lengths is None:
                other = next(oip.input_name(key, kind) for j, kind in tensors if j == k)
                raise InvalidRequest(f"input {other!r} needs the input {oip.input_name(key, 'lengths')!r}")
            if batch is None:
                batch, first = lengths[1], oip.input_name(key, "lengths")
            elif lengths[1] != batch:
                raise InvalidRequest(
                    f"input {oip.input_name(key, 'lengths')!r} has shape [{lengths[1]}] but {first!r} has [{batch}]: "
                    "every <key>__lengths holds one length per example of the request"
                )
            values = tensors.get((k, "values"), (b"", 0))
            weights = tensors.get((k, "weights"))
            if weights is not None and weights[1] != values[1]:
                raise InvalidRequest(
                    f"input {oip.input_name(key, 'weights')!r} has {weights[1]} entries but "
                    f"{oip.input_name(key, 'values')!r} has {values[1]}"
                )
            lengths_parts.append(lengths[0])
            values_parts.append(values[0])
            counts.append(values[1])
        assert batch is not None
        flat_lengths = np.frombuffer(b"".join(lengths_parts), dtype=oip.DATATYPES["INT32"])
        ids_per_key = flat_lengths.reshape(len(keys), batch).sum(axis=1, dtype=np.int64)
        mismatch = ids_per_key != np.array(counts, dtype=np.int64)
        if mismatch.any() and not (flat_lengths < 0).any():  # negative lengths: validate_features names them
            j = int(np.flatnonzero(mismatch)[0])
            raise InvalidRequest(
                f"input {oip.input_name(keys[j], 'values')!r} has {counts[j]} ids but "
                f"sum({oip.input_name(keys[j], 'lengths')}) = {int(ids_per_key[j])}"
            )
        weights_array = None
        if any(kind == "weights" for _, kind in tensors):
            ones = np.ones(max(counts), dtype=oip.DATATYPES["FP32"])
            weights_array = np.frombuffer(b"".join(
                tensors[k, "weights"][0] if (k, "weights") in tensors else ones[:n].tobytes()
                for k, n in zip(present, counts)
            ), dtype=oip.DATATYPES["FP32"])
        features = WireFeatures(
            keys=keys,
            batch_size=batch,
            lengths=flat_lengths,
            values=np.frombuffer(b"".join(values_parts), dtype=oip.DATATYPES["INT64"]),
            weights=weights_array,
        )
        names = _TensorNames(keys=keys, ids_per_key=tuple(counts), batch=batch)
        return validate_features(features, schema, output_dtype=output_dtype, request_id=request.id, names=names)

    def _unexpected(self, name: str, model: str) -> InvalidRequest:
        parts = oip.split_input_name(name)
        if parts is not None and parts[1] == "weights" and self._schema.index_of(parts[0]) is not None:
            return InvalidRequest(f"unexpected inference input {name!r}: table {parts[0]!r} is not weighted")
        return InvalidRequest(
            f"unexpected inference input {echo(name)} for model {model!r}; inputs are <key>__lengths, "
            "<key>__values and <key>__weights for the keys in the model's metadata"
        )


class InferenceServicer:
    """The GRPCInferenceService handlers: ModelInfer through the shared batcher, readiness from the drain state.

    Args:
        schema: what requests are validated against (the same as Lookup's).
        batcher: the server's batcher.
        metrics: calls are counted under the method's name (`ModelInfer`, ...).
        current_model: the model serving now (it changes on reload).
        accepting: False once the server drains: ModelInfer answers UNAVAILABLE, the ready calls false.
        budget: response bytes waiting to be sent, shared with the EmbeddingService.
        decoder: decodes large requests off the event loop, shared with the EmbeddingService.
        inflight: calls in progress, shared with the EmbeddingService (a drain waits for them).
    """

    def __init__(
        self,
        *,
        schema: ModelSchema,
        batcher: DynamicBatcher[SparseRequest, BatchOutput],
        metrics: ServerMetrics,
        current_model: Callable[[], ServingModel],
        accepting: Callable[[], bool],
        budget: ResponseBudget,
        decoder: OffloadDecoder,
        inflight: InFlight,
    ) -> None:
        self._decoder = InferDecoder(schema)
        self._budget = budget
        self._offload = decoder
        self._batcher = batcher
        self._metrics = metrics
        self._current_model = current_model
        self._accepting = accepting
        self._infer_seconds = metrics.request_seconds.labels("ModelInfer")
        self._server_version = _server_version()
        self._inflight = inflight

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
            self._metrics.count(method, code)  # before the status leaves, so a caller that sees it sees it counted
        await context.abort(code, str(error))
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Writes its one answer (registered response-streaming, like Lookup) so that the answer stays counted in
        the response budget until the transport takes it."""
        start = time.perf_counter()
        self._inflight.enter()
        try:
            await self._answer("ModelInfer", self._infer(request, context), context)
        finally:
            self._inflight.exit()
            self._infer_seconds.observe(time.perf_counter() - start)

    async def _infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not self._accepting():
            raise ShuttingDown("server is shutting down; retry on another replica")
        model = self._current_model()
        request, sparse = await self._offload.run(len(raw), lambda: self._decode(raw, model))
        nbytes = response_bytes(sparse.batch_size, model.output_dim, sparse.output_dtype)
        with self._budget.held(context.peer(), nbytes):
            await self._answer_with(request, sparse, model, context)
        return b""

    async def _answer_with(
        self, request: oip.ModelInferRequest, sparse: SparseRequest, model: ServingModel,
        context: grpc.aio.ServicerContext,
    ) -> None:
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
        response = b"".join((header, field_header(_RAW_OUTPUT_FIELD, out.rows.nbytes), out.rows))
        del out  # the batch's LookupResponse bytes are no longer needed while the answer waits to be sent
        await context.write(response)

    def _decode(self, raw: bytes, model: ServingModel) -> tuple[oip.ModelInferRequest, SparseRequest]:
        if len(raw) >= self._offload.min_bytes:
            check_infer_wire(raw, self._decoder.max_inputs)
        request = parse_message(oip.ModelInferRequest, raw)
        return request, self._decoder.decode(request, model)

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
    handlers["ModelInfer"] = grpc.unary_stream_rpc_method_handler(servicer.ModelInfer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(oip.SERVICE_NAME, handlers),))
