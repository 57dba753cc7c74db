"""Open Inference Protocol (KServe v2) requests -> validated requests: a ModelInferRequest's per-key tensors
checked and gathered into the flat arrays of an embserve.v1 request, then validated like a LookupRequest.

A ModelInfer call carries one model's jagged features as per-key tensors (`<key>__lengths` INT32 `[batch_size]`,
`<key>__values` INT64 `[n]`, `<key>__weights` FP32 `[n]` for weighted tables). They are checked tensor by tensor
(names, datatypes, shapes, sizes, agreement between a key's tensors), gathered into `WireFeatures` and validated by
`decode.validate_features`, whose messages then name the tensors. A weighted table's `__weights` left out means
weights of 1.0.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from embserve.oip import wire as oip
from embserve.v1.wire import LENGTH_DELIMITED, OutputDType, WireFeatures

from .decode import MAX_OTHER_FIELDS, FieldNames, echo, validate_features, walk_fields
from .errors import InvalidRequest, UnknownModel
from .request import ModelSchema, SparseRequest

if TYPE_CHECKING:
    from .backend import ModelView

__all__ = ["InferDecoder", "check_infer_wire", "check_model"]

_CONTENTS_FIELD = {"INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents"}


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


def check_model(name: str, version: str, model: ModelView) -> None:
    """`UnknownModel` unless `name` (and `version`, when given) is the model serving now."""
    if name != model.config.name:
        raise UnknownModel(
            f"Request for unknown model: {echo(name)} is not found; this server serves {model.config.name!r}"
        )
    if version and version != model.version:
        raise UnknownModel(
            f"Request for unknown model: {echo(name)} version {echo(version)} is not found; "
            f"the version served is {model.version!r}"
        )


def _tensor_bytes(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, datatype: str, model: str
) -> tuple[bytes, int]:
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


def _output_dtype(request: oip.ModelInferRequest) -> OutputDType:
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
    """Counts the fields of a large ModelInferRequest on the wire before it is parsed, as `read_lookup_fields`
    does for a LookupRequest: at most `max_inputs` input tensors and raw contents, a few other fields, and a few
    fields in each input (its parameters included), so that no field repeated millions of times becomes millions
    of objects. The walk stops at the first field over a bound."""
    counts = {_INPUTS: 0, _RAW_INPUT_CONTENTS: 0}
    limit = 2 * max_inputs + MAX_OTHER_FIELDS
    for number, wire_type, start, end in walk_fields(raw, 0, len(raw), "the ModelInferRequest", limit):
        if number not in counts:
            continue
        counts[number] += 1
        if counts[number] > max_inputs:
            name = "inputs" if number == _INPUTS else "raw_input_contents"
            raise InvalidRequest(f"the request has more than {max_inputs} {name}; the model takes {max_inputs}")
        if number == _INPUTS and wire_type == LENGTH_DELIMITED:
            for _ in walk_fields(raw, start, end, "an input tensor", MAX_OTHER_FIELDS):
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

    def decode(self, request: oip.ModelInferRequest, model: ModelView) -> SparseRequest:
        """Raises `InvalidRequest` naming the tensor, or `UnknownModel`."""
        check_model(request.model_name, request.model_version, model)
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
            tensors[slot] = _tensor_bytes(
                tensor, raw[i] if raw else None, oip.INPUT_SUFFIXES[slot[1]], model.config.name
            )
        present = sorted({k for k, _ in tensors})
        if not present:
            raise InvalidRequest(
                "no inputs: send <key>__lengths and <key>__values for at least one of the model's keys"
            )
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
            weights_array = np.frombuffer(
                b"".join(
                    tensors[k, "weights"][0] if (k, "weights") in tensors else ones[:n].tobytes()
                    for k, n in zip(present, counts)
                ),
                dtype=oip.DATATYPES["FP32"],
            )
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
