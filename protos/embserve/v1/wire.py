"""The embserve.v1 wire contract in one place: names, element types, default limits, feature packing.

Hand-written and torch-free (numpy and the generated messages only), so that the server, the client SDK, the
benchmarks and the tests all speak the contract from one definition instead of restating it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from . import embserve_pb2 as pb

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LENGTHS_DTYPE",
    "LENGTH_DELIMITED",
    "LOOKUP_METHOD",
    "METHODS",
    "SERVICE_NAME",
    "VALUES_DTYPE",
    "WEIGHTS_DTYPE",
    "OutputDType",
    "OutputDTypeName",
    "WireFeatures",
    "WireFormatError",
    "method_path",
    "pack_features",
    "read_varint",
    "unpack_features",
    "varint",
    "wire_fields",
]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
METHODS: tuple[str, ...] = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods)


def method_path(method: str) -> str:
    """The HTTP/2 path of an EmbeddingService method, e.g. `/embserve.v1.EmbeddingService/Lookup`."""
    return f"/{SERVICE_NAME}/{method}"


LOOKUP_METHOD = method_path("Lookup")

# Element types of the SparseFeatures byte fields (little-endian, fixed by the contract).
LENGTHS_DTYPE = np.dtype("<i4")
VALUES_DTYPE = np.dtype("<i8")
WEIGHTS_DTYPE = np.dtype("<f4")

OutputDTypeName = Literal["float32", "float16", "bfloat16"]


@enum.unique
class OutputDType(str, enum.Enum):
    """The element type of the embeddings in an answer: its name (what callers write), wire enum, numpy type of
    the bytes (bfloat16: raw uint16 bit patterns, which numpy lacks a type for) and size."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def wire(self) -> pb.DType:
        return _WIRE[self]

    @property
    def numpy(self) -> np.dtype[Any]:
        return _NUMPY[self]

    @property
    def itemsize(self) -> int:
        return _NUMPY[self].itemsize

    @classmethod
    def of_wire(cls, value: int) -> OutputDType | None:
        """The type a request's or response's `dtype` field names (UNSPECIFIED: float32), None if unknown."""
        return _BY_WIRE.get(value)

    @classmethod
    def parse(cls, value: OutputDType | str) -> OutputDType:
        """`value` as an `OutputDType`; `ValueError` naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"output dtype must be one of {', '.join(d.value for d in cls)}, got {value!r}") from None


_WIRE: dict[OutputDType, pb.DType] = {
    OutputDType.FLOAT32: pb.DTYPE_FLOAT32,
    OutputDType.FLOAT16: pb.DTYPE_FLOAT16,
    OutputDType.BFLOAT16: pb.DTYPE_BFLOAT16,
}
_NUMPY: dict[OutputDType, np.dtype[Any]] = {
    OutputDType.FLOAT32: np.dtype("<f4"),
    OutputDType.FLOAT16: np.dtype("<f2"),
    OutputDType.BFLOAT16: np.dtype("<u2"),
}
_BY_WIRE: dict[int, OutputDType] = {pb.DTYPE_UNSPECIFIED: OutputDType.FLOAT32, **{v: k for k, v in _WIRE.items()}}

# The largest request message a server receives and a client sends unless configured otherwise (the client splits
# larger requests). A server reserves this much of its receive budget for each message it reads.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def varint(value: int) -> bytes:
    """A protobuf base-128 varint, for framing messages from pre-serialized parts."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def pack_features(
    keys: Any, batch_size: int, lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None
) -> pb.SparseFeatures:
    """SparseFeatures from KJT-layout arrays: `lengths` `[len(keys), batch_size]` (or flat, feature-major),
    `values` and optional per-id `weights` in the same order. Arrays are cast to the wire types when needed."""
    return pb.SparseFeatures(
        keys=list(keys),
        batch_size=batch_size,
        lengths=np.asarray(lengths).astype(LENGTHS_DTYPE, copy=False).tobytes(),
        values=np.asarray(values).astype(VALUES_DTYPE, copy=False).tobytes(),
        weights=b"" if weights is None else np.asarray(weights).astype(WEIGHTS_DTYPE, copy=False).tobytes(),
    )


@dataclasses.dataclass(frozen=True)
class WireFeatures:
    """The arrays of a SparseFeatures message, unchecked: `lengths` flat, feature-major; `weights` None when the
    message carried none. Each array is a read-only view of the message bytes."""

    keys: tuple[str, ...]
    batch_size: int
    lengths: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None


class WireFormatError(ValueError):
    """Bytes that do not hold what the contract says: a byte field that is not a whole number of its elements, or
    a message whose fields cannot be walked."""


def _view(buf: bytes, dtype: np.dtype[Any], field: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise WireFormatError(
            f"features.{field} has {len(buf)} bytes, not a multiple of {dtype.itemsize} ({dtype.name} elements)"
        )
    return np.frombuffer(buf, dtype=dtype)


def unpack_features(features: pb.SparseFeatures) -> WireFeatures:
    """The arrays of `features`, one `np.frombuffer` each; raises `WireFormatError` for a truncated field."""
    return WireFeatures(
        keys=tuple(features.keys),
        batch_size=features.batch_size,
        lengths=_view(features.lengths, LENGTHS_DTYPE, "lengths"),
        values=_view(features.values, VALUES_DTYPE, "values"),
        weights=_view(features.weights, WEIGHTS_DTYPE, "weights") if features.weights else None,
    )


# --- reading protobuf fields from the wire, without parsing ------------------------------------------------------

LENGTH_DELIMITED = 2  # the wire type of strings, bytes and messages


def read_varint(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int]:
    """The varint at `buf[i]` and the index after it; `WireFormatError` when it runs past `end`."""
    value = shift = 0
    while i < end and shift < 64:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
    raise WireFormatError("not a valid protobuf message: a varint runs past its field")


def wire_fields(
    buf: bytes | memoryview, i: int, end: int, what: str, limit: int
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end of the value) of each field in `buf[i:end]`, read from the wire without
    parsing; `WireFormatError` naming `what` beyond `limit` fields, or where the bytes are not protobuf. Its cost is
    bounded by `limit` whatever the message holds."""
    count = 0
    while i < end:
        count += 1
        if count > limit:
            raise WireFormatError(f"{what} has more than {limit} fields; a valid one has at most {limit}")
        tag, i = read_varint(buf, i, end)
        number, wire_type = tag >> 3, tag & 7
        start = i
        if wire_type == 0:
            _, i = read_varint(buf, i, end)
        elif wire_type == 1:
            i += 8
        elif wire_type == LENGTH_DELIMITED:
            size, start = read_varint(buf, i, end)
            i = start + size
        elif wire_type == 5:
            i += 4
        else:
            raise WireFormatError(f"{what} has field {number} of wire type {wire_type}, which it never carries")
        if i > end:
            raise WireFormatError(f"not a valid protobuf message: field {number} of {what} runs past its end")
        yield number, wire_type, start, i
