"""The embserve.v1 wire contract in one place: names, element types, default limits, feature packing.

Hand-written and torch-free (numpy and the generated messages only), so that the server, the client SDK, the
benchmarks and the tests all speak the contract from one definition instead of restating it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import embserve_pb2 as pb

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DTYPE_NAMES",
    "GET_MODEL_METADATA_METHOD",
    "LENGTHS_DTYPE",
    "LOOKUP_METHOD",
    "METHODS",
    "OUTPUT_DTYPES",
    "OUTPUT_NUMPY_DTYPES",
    "SERVICE_NAME",
    "VALUES_DTYPE",
    "WEIGHTS_DTYPE",
    "WireFeatures",
    "WireFormatError",
    "method_path",
    "pack_features",
    "unpack_features",
    "varint",
]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
METHODS: tuple[str, ...] = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods)


def method_path(method: str) -> str:
    """The HTTP/2 path of an EmbeddingService method, e.g. `/embserve.v1.EmbeddingService/Lookup`."""
    return f"/{SERVICE_NAME}/{method}"


LOOKUP_METHOD = method_path("Lookup")
GET_MODEL_METADATA_METHOD = method_path("GetModelMetadata")

# Element types of the SparseFeatures byte fields (little-endian, fixed by the contract).
LENGTHS_DTYPE = np.dtype("<i4")
VALUES_DTYPE = np.dtype("<i8")
WEIGHTS_DTYPE = np.dtype("<f4")

# Output element types: the name callers use, by wire enum (UNSPECIFIED in a request means float32) ...
OUTPUT_DTYPES: dict[int, str] = {
    pb.DTYPE_UNSPECIFIED: "float32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
# ... the wire enum by name ...
DTYPE_NAMES: dict[str, pb.DType] = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
# ... and the numpy type of the embedding bytes by name (bfloat16: raw uint16 bit patterns).
OUTPUT_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}

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
    """A byte field's length is not a whole number of its elements."""


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
