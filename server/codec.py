"""Wire <-> domain: LookupRequest bytes to validated numpy arrays, results back to LookupResponse.

Every check runs here, before batching, so a bad request never reaches anyone else's batch. Arrays are decoded
with one `np.frombuffer` each and checked with vectorised numpy; no Python loop runs per example or per id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from embserve.v1 import embserve_pb2 as pb

from .errors import InvalidRequest

__all__ = ["ModelSchema", "ResponseEncoder", "SparseRequest", "decode_lookup", "parse_message", "OUTPUT_DTYPES"]

_LENGTHS = np.dtype("<i4")
_VALUES = np.dtype("<i8")
_WEIGHTS = np.dtype("<f4")

# Output dtype names by wire enum; UNSPECIFIED means float32.
OUTPUT_DTYPES: dict[int, str] = {
    pb.DTYPE_UNSPECIFIED: "float32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
_WIRE_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}


@dataclasses.dataclass(frozen=True)
class ModelSchema:
    """What the codec checks requests against: the canonical keys with their row counts and policies."""

    keys: tuple[str, ...]
    num_embeddings: np.ndarray  # int64 [T], canonical key order
    hashed: np.ndarray  # bool [T]: ids are taken mod num_embeddings instead of rejected
    weighted: np.ndarray  # bool [T]
    max_request_examples: int
    max_request_ids: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {k: i for i, k in enumerate(self.keys)})

    def index_of(self, key: str) -> int | None:
        return self._index.get(key)  # type: ignore[attr-defined, no-any-return]


@dataclasses.dataclass(frozen=True)
class SparseRequest:
    """One validated request: its keys as canonical indices, lengths `[K, B]`, ids already in range."""

    batch_size: int
    key_index: np.ndarray  # int64 [K]
    lengths: np.ndarray  # int32 [K, B]
    values: np.ndarray  # int64 [N]
    weights: np.ndarray | None  # float32 [N]
    ids_per_key: np.ndarray  # int64 [K]
    output_dtype: str = "float32"
    request_id: str = ""


M = TypeVar("M", bound=Message)


def parse_message(cls: type[M], raw: bytes) -> M:
    """Parses request bytes; corrupt wire data is an `InvalidRequest`, not a servicer crash."""
    try:
        message: M = cls.FromString(raw)
    except DecodeError as err:
        raise InvalidRequest(f"request is not a valid {cls.DESCRIPTOR.full_name}: {err}") from None
    return message


def _array(buf: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise InvalidRequest(
            f"features.{field} has {len(buf)} bytes, not a multiple of {dtype.itemsize} ({dtype.name} elements)"
        )
    return np.frombuffer(buf, dtype=dtype)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def decode_lookup(request: pb.LookupRequest, schema: ModelSchema) -> SparseRequest:
    """Validates a LookupRequest against the model; raises `InvalidRequest` naming the first problem found."""
    f = request.features
    output_dtype = OUTPUT_DTYPES.get(request.output_dtype)
    if output_dtype is None:
        raise InvalidRequest(f"output_dtype {request.output_dtype} is not FLOAT32, FLOAT16 or BFLOAT16")
    batch_size = f.batch_size
    if batch_size <= 0:
        raise InvalidRequest(f"features.batch_size must be > 0, got {batch_size}")
    if batch_size > schema.max_request_examples:
        raise InvalidRequest(
            f"features.batch_size {batch_size} is over the server's max_request_examples {schema.max_request_examples}"
        )
    index_of = schema.index_of
    key_index = np.empty(len(f.keys), dtype=np.int64)
    for i, key in enumerate(f.keys):  # one step per key, never per example
        idx = index_of(key)
        if idx is None:
            raise InvalidRequest(f"unknown key {key!r} at keys[{i}]; the model's keys are {list(schema.keys)}")
        key_index[i] = idx
    if len(set(f.keys)) != len(f.keys):
        seen: set[str] = set()
        dup = next(k for k in f.keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidRequest(f"duplicate key {dup!r} in features.keys")
    n_keys = len(key_index)
    lengths = _array(f.lengths, _LENGTHS, "lengths")
    if lengths.size != n_keys * batch_size:
        raise InvalidRequest(
            f"features.lengths has {lengths.size} entries, expected len(keys) x batch_size = "
            f"{n_keys} x {batch_size} = {n_keys * batch_size}"
        )
    if lengths.size and int(lengths.min()) < 0:
        i = _first(lengths < 0)
        raise InvalidRequest(f"negative length {int(lengths[i])} at lengths[{i}] (key {f.keys[i // batch_size]!r})")
    values = _array(f.values, _VALUES, "values")
    if values.size > schema.max_request_ids:
        raise InvalidRequest(f"{values.size} ids is over the server's max_request_ids {schema.max_request_ids}")
    lengths = lengths.reshape(n_keys, batch_size)
    ids_per_key = lengths.sum(axis=1, dtype=np.int64)
    total = int(ids_per_key.sum())
    if total != values.size:
        raise InvalidRequest(f"sum(lengths) = {total} but features.values has {values.size} ids")
    weights: np.ndarray | None = None
    if f.weights:
        weights = _array(f.weights, _WEIGHTS, "weights")
        if weights.size != values.size:
            raise InvalidRequest(f"features.weights has {weights.size} entries but features.values has {values.size}")
        if not np.isfinite(weights).all():
            i = _first(~np.isfinite(weights))
            raise InvalidRequest(f"non-finite weight {float(weights[i])} at weights[{i}]")
    if values.size:
        key_of_id = np.repeat(key_index, ids_per_key)
        if int(values.min()) < 0:
            i = _first(values < 0)
            raise InvalidRequest(f"negative id {int(values[i])} at values[{i}] (key {schema.keys[key_of_id[i]]!r})")
        rows = schema.num_embeddings[key_of_id]
        too_big = values >= rows
        if too_big.any():
            reject = too_big & ~schema.hashed[key_of_id]
            if reject.any():
                i = _first(reject)
                raise InvalidRequest(
                    f"id {int(values[i])} at values[{i}] is out of range for key {schema.keys[key_of_id[i]]!r} "
                    f"(num_embeddings {int(rows[i])})"
                )
            values = np.where(too_big, values % rows, values)
        if weights is not None:
            unweighted = ~schema.weighted[key_of_id] & (weights != 1.0)
            if unweighted.any():
                i = _first(unweighted)
                raise InvalidRequest(
                    f"weight {float(weights[i])} at weights[{i}] is for key {schema.keys[key_of_id[i]]!r}, "
                    "which is not a weighted table (send 1.0 or no weights for its ids)"
                )
    return SparseRequest(
        batch_size=batch_size,
        key_index=key_index,
        lengths=lengths,
        values=values,
        weights=weights,
        ids_per_key=ids_per_key,
        output_dtype=output_dtype,
        request_id=request.request_id,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_tag(name: str) -> bytes:
    """The tag of a length-delimited LookupResponse field (packed repeated, bytes or string)."""
    return _varint(pb.LookupResponse.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


_SHAPE, _EMBEDDINGS, _REQUEST_ID = _field_tag("shape"), _field_tag("embeddings"), _field_tag("request_id")


class ResponseEncoder:
    """Serializes the LookupResponses of one model version.

    The fields every response shares (dtype, key layout, model name and version) are serialized once per output
    dtype; each response appends its shape, request id and embedding bytes. Protobuf parses concatenated
    serializations as one message, so the result is an ordinary LookupResponse, built without copying the
    embeddings into a message object first.
    """

    def __init__(
        self, *, keys: Sequence[str], dims: Sequence[int], offsets: Sequence[int], model_name: str, model_version: str
    ) -> None:
        self.output_dim = int(offsets[-1])
        self._prefix = {
            name: pb.LookupResponse(
                dtype=wire, keys=keys, dims=dims, offsets=offsets, model_name=model_name, model_version=model_version
            ).SerializeToString()
            for name, wire in _WIRE_DTYPES.items()
        }

    def encode(self, payload: bytes | memoryview, *, batch_size: int, output_dtype: str, request_id: str = "") -> bytes:
        """A serialized LookupResponse around one request's rows, already `output_dtype` bytes (any contiguous
        buffer: the rows are copied once, into the response)."""
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        shape = _varint(batch_size) + _varint(self.output_dim)
        parts: list[bytes | memoryview] = [self._prefix[output_dtype], _SHAPE, _varint(len(shape)), shape]
        if request_id:
            rid = request_id.encode()
            parts += [_REQUEST_ID, _varint(len(rid)), rid]
        parts += [_EMBEDDINGS, _varint(size), payload]
        return b"".join(parts)
