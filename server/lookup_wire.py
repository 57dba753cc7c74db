"""LookupRequest bytes read in place: the fields of a request read from the bytes gRPC handed over, its arrays left
as views of them.

Protobuf would copy each array twice (into its message when parsing, and into a new Python bytes object when the
field is read); for a large message these copies cost more than walking its few fields here. What is read follows
protobuf's rules: a field of another wire type than its own is an unknown field and skipped, a later scalar
replaces an earlier one, repeated `features` fields merge, and strings must be UTF-8. The walk stops at the first
field over a bound (more keys than the model has, or `MAX_OTHER_FIELDS` others), so its cost is bounded whatever
the message holds. Raises `WireFormatError`; the decoder answers it as an invalid request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

import numpy as np

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import (
    LENGTH_DELIMITED,
    LENGTHS_DTYPE,
    VALUES_DTYPE,
    WEIGHTS_DTYPE,
    WireFeatures,
    WireFormatError,
    read_varint,
    wire_fields,
)

__all__ = ["MAX_OTHER_FIELDS", "LookupFields", "LookupMessage", "read_lookup"]

# Fields a message may carry beyond its keys (the scalars, several features fields merged, unknown fields).
MAX_OTHER_FIELDS = 64
VARINT = 0
_REQUEST = pb.LookupRequest.DESCRIPTOR.fields_by_name
_FEATURES, _OUTPUT_DTYPE = _REQUEST["features"].number, _REQUEST["output_dtype"].number
_REQUEST_ID, _TIMEOUT_MS = _REQUEST["request_id"].number, _REQUEST["timeout_ms"].number
_REQUESTS = _REQUEST["requests"].number
_SPARSE = pb.SparseFeatures.DESCRIPTOR.fields_by_name
_KEYS, _BATCH_SIZE = _SPARSE["keys"].number, _SPARSE["batch_size"].number
_ARRAYS = {
    _SPARSE[name].number: (name, dtype)
    for name, dtype in (("lengths", LENGTHS_DTYPE), ("values", VALUES_DTYPE), ("weights", WEIGHTS_DTYPE))
}


@dataclasses.dataclass(frozen=True)
class LookupFields:
    """What the server reads of a LookupRequest, as `LookupRequest` names it; `features.lengths`, `values` and
    `weights` are read-only views of the message bytes."""

    features: WireFeatures
    output_dtype: int
    request_id: str
    timeout_ms: int
    requests: tuple[memoryview, ...] = ()  # LookupStream: the lookups a message carries, unparsed


LookupMessage: TypeAlias = "pb.LookupRequest | LookupFields"
"""A LookupRequest as the server holds it: parsed by protobuf, or read in place."""


def _int32(value: int) -> int:
    """A varint as protobuf's int32 takes it: the low 32 bits, two's complement."""
    return ((value & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


def _text(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(f"not a valid protobuf message: {what} is not UTF-8") from None


def _array(raw: memoryview | None, name: str, dtype: np.dtype[Any]) -> np.ndarray:
    if raw is None:
        return np.empty(0, dtype)
    if len(raw) % dtype.itemsize:
        raise WireFormatError(
            f"features.{name} has {len(raw)} bytes, not a multiple of {dtype.itemsize} ({dtype.name} elements)"
        )
    return np.frombuffer(raw, dtype=dtype)


def read_lookup(raw: bytes, max_keys: int, max_requests: int = 0) -> LookupFields:
    """The fields of LookupRequest bytes, its arrays as views of `raw`; `WireFormatError` where they are not a
    LookupRequest, or carry more than `max_keys` keys or `max_requests` lookups (`requests`)."""
    view = memoryview(raw)
    limit = max_keys + MAX_OTHER_FIELDS + max_requests
    keys: list[str] = []
    requests: list[memoryview] = []
    arrays: dict[int, memoryview] = {}
    batch_size = output_dtype = timeout_ms = 0
    request_id = ""
    for number, wire_type, start, end in wire_fields(raw, 0, len(raw), "the LookupRequest", limit):
        if wire_type == VARINT:
            if number == _OUTPUT_DTYPE:
                output_dtype = _int32(read_varint(raw, start, end)[0])
            elif number == _TIMEOUT_MS:
                timeout_ms = read_varint(raw, start, end)[0] & 0xFFFFFFFF
        elif wire_type != LENGTH_DELIMITED:
            continue
        elif number == _REQUEST_ID:
            request_id = _text(view[start:end], "request_id")
        elif number == _REQUESTS:
            if len(requests) >= max_requests:
                raise WireFormatError(f"the message carries more than {max_requests} lookups")
            requests.append(view[start:end])
        elif number == _FEATURES:
            for inner, inner_type, i, j in wire_fields(raw, start, end, "features", limit):
                if inner_type == VARINT and inner == _BATCH_SIZE:
                    batch_size = _int32(read_varint(raw, i, j)[0])
                elif inner_type != LENGTH_DELIMITED:
                    continue
                elif inner == _KEYS:
                    if len(keys) >= max_keys:
                        raise WireFormatError(f"features.keys has more than {max_keys} keys; the model has {max_keys}")
                    keys.append(_text(view[i:j], f"features.keys[{len(keys)}]"))
                elif inner in _ARRAYS:
                    arrays[inner] = view[i:j]
    lengths, values, weights = (_array(arrays.get(n), name, dtype) for n, (name, dtype) in _ARRAYS.items())
    features = WireFeatures(
        keys=tuple(keys),
        batch_size=batch_size,
        lengths=lengths,
        values=values,
        weights=weights if weights.size else None,
    )
    return LookupFields(features, output_dtype, request_id, timeout_ms, tuple(requests))
