"""Wire -> validated request: LookupRequest bytes to a `SparseRequest`, every check before batching.

Runs on the event loop, before the batcher, so a bad request never reaches anyone else's batch. Arrays are
decoded with one `np.frombuffer` each and checked with vectorised numpy; the only Python loop is one step per key,
and the number of keys is checked against the model's before it runs. Messages name the offending field, key,
index or size, and echo at most `ECHO_CHARS` characters of anything the caller sent.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import (
    LENGTH_DELIMITED,
    OutputDType,
    WireFeatures,
    WireFormatError,
    unpack_features,
    wire_fields,
)

from .bounds import response_bytes
from .errors import InvalidRequest
from .lookup_wire import MAX_OTHER_FIELDS, LookupFields, LookupMessage, read_lookup
from .request import ModelSchema, SparseRequest

__all__ = [
    "ECHO_CHARS",
    "MAX_OTHER_FIELDS",
    "FieldNames",
    "KeyOrders",
    "decode_lookup",
    "echo",
    "parse_message",
    "read_lookup_fields",
    "request_id_of",
    "validate_features",
    "walk_fields",
]

ECHO_CHARS = 128
_REQUEST_ID = pb.LookupRequest.DESCRIPTOR.fields_by_name["request_id"].number

M = TypeVar("M", bound=Message)


def echo(value: object) -> str:
    """`repr(value)`, cut to `ECHO_CHARS` characters: error messages never carry a caller's bytes unbounded."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def parse_message(cls: type[M], raw: bytes) -> M:
    """Parses request bytes; corrupt wire data is an `InvalidRequest`, not a servicer crash."""
    try:
        message: M = cls.FromString(raw)
    except DecodeError as err:
        raise InvalidRequest(f"request is not a valid {cls.DESCRIPTOR.full_name}: {err}") from None
    return message


def walk_fields(buf: bytes, i: int, end: int, what: str, limit: int) -> Iterator[tuple[int, int, int, int]]:
    """`wire.wire_fields`, with bytes that cannot be walked answered as an `InvalidRequest`."""
    try:
        yield from wire_fields(buf, i, end, what, limit)
    except WireFormatError as err:
        raise InvalidRequest(f"request is {err}" if str(err).startswith("not a valid") else str(err)) from None


def read_lookup_fields(raw: bytes, max_keys: int, max_requests: int = 0) -> LookupFields:
    """LookupRequest bytes read in place, their arrays views of `raw` (`lookup_wire`): for large messages, whose
    arrays protobuf would copy twice. Bytes that are not a LookupRequest, or that carry more keys than
    `max_keys`, are an `InvalidRequest`."""
    try:
        return read_lookup(raw, max_keys, max_requests)
    except WireFormatError as err:
        raise InvalidRequest(f"request is {err}" if str(err).startswith("not a valid") else str(err)) from None


def request_id_of(raw: bytes) -> str:
    """The `request_id` of LookupRequest bytes, read from the wire without parsing the message ("" when it has
    none or its top level cannot be walked): a refusal of a message that is not parsed still names it, so that a
    stream's client can match the answer."""
    request_id = b""
    try:
        for number, wire_type, start, end in walk_fields(raw, 0, len(raw), "the LookupRequest", MAX_OTHER_FIELDS):
            if number == _REQUEST_ID and wire_type == LENGTH_DELIMITED:
                request_id = raw[start:end]  # the last one, as a parser keeps
    except InvalidRequest:
        return ""
    return request_id.decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """How validation messages name what they point at: by default the SparseFeatures fields (`values[7]`). A
    front end with other names for the same arrays (the Open Inference Protocol's per-key tensors) overrides it."""

    batch_size: str = "features.batch_size"

    def element(self, field: str, index: int, key: str) -> str:
        """Element `index` of the flat `field` array (lengths, values or weights), which belongs to `key`."""
        return f"{field}[{index}]"


WIRE_NAMES = FieldNames()


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def decode_lookup(request: LookupMessage, schema: ModelSchema, key_orders: KeyOrders | None = None) -> SparseRequest:
    """Validates a LookupRequest (parsed, or read in place) against the model; raises `InvalidRequest` naming the
    first problem found. `key_orders` caches the check of key lists seen before."""
    output_dtype = OutputDType.of_wire(request.output_dtype)
    if output_dtype is None:
        raise InvalidRequest(f"output_dtype {request.output_dtype} is not FLOAT32, FLOAT16 or BFLOAT16")
    if isinstance(request, LookupFields):
        features = request.features  # its keys were counted as they were read
    else:
        n_keys = len(request.features.keys)  # counted before the keys become Python strings, one per key
        if n_keys > len(schema.keys):
            raise InvalidRequest(f"features.keys has {n_keys} keys; the model has {len(schema.keys)}")
        try:
            features = unpack_features(request.features)
        except WireFormatError as err:
            raise InvalidRequest(str(err)) from None
    return validate_features(
        features, schema, output_dtype=output_dtype, request_id=request.request_id, key_orders=key_orders
    )


KEY_ORDER_CACHE_SIZE = 1024


class KeyOrders:
    """The canonical indices of each key list requests send, checked once per distinct list.

    Callers send the same few key lists over and over; checking a list (known keys, no duplicates, at most one
    step per model table) and mapping it to canonical indices is done once and kept, for at most `max_entries`
    lists (least recently used dropped first).
    """

    def __init__(self, schema: ModelSchema, max_entries: int = KEY_ORDER_CACHE_SIZE) -> None:
        self._schema = schema
        self._max_entries = max_entries
        self._known: collections.OrderedDict[tuple[str, ...], np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # large requests are decoded on threads of their own

    def __call__(self, keys: tuple[str, ...]) -> np.ndarray:
        with self._lock:
            key_index = self._known.get(keys)
            if key_index is not None:
                self._known.move_to_end(keys)
                return key_index
        key_index = _key_indices(keys, self._schema)
        key_index.setflags(write=False)
        with self._lock:
            self._known[keys] = key_index
            if len(self._known) > self._max_entries:
                self._known.popitem(last=False)
        return key_index


def _key_indices(keys: tuple[str, ...], schema: ModelSchema) -> np.ndarray:
    if len(keys) > len(schema.keys):
        raise InvalidRequest(f"features.keys has {len(keys)} keys; the model has {len(schema.keys)}")
    key_index = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):  # one step per key, at most one per model table
        idx = schema.index_of(key)
        if idx is None:
            raise InvalidRequest(
                f"unknown key {echo(key)} at keys[{i}]; the model's keys are {echo(list(schema.keys))}"
            )
        key_index[i] = idx
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidRequest(f"duplicate key {echo(dup)} in features.keys")
    return key_index


def validate_features(
    features: WireFeatures,
    schema: ModelSchema,
    *,
    output_dtype: OutputDType = OutputDType.FLOAT32,
    request_id: str = "",
    key_orders: KeyOrders | None = None,
    names: FieldNames = WIRE_NAMES,
) -> SparseRequest:
    """Checks jagged features against the model and its limits; ids of hashed tables are taken into range.
    Messages name positions as `names` says."""
    batch_size = features.batch_size
    if batch_size <= 0:
        raise InvalidRequest(f"{names.batch_size} must be > 0, got {batch_size}")
    if batch_size > schema.max_request_examples:
        raise InvalidRequest(
            f"{names.batch_size} {batch_size} is over the server's max_request_examples {schema.max_request_examples}"
        )
    if schema.max_response_bytes is not None:
        answer = response_bytes(batch_size, schema.output_dim, output_dtype)
        if answer > schema.max_response_bytes:
            raise InvalidRequest(
                f"the response to {names.batch_size} {batch_size} would be {answer} bytes ({batch_size} x "
                f"{schema.output_dim} x {output_dtype.value}), over the server's max_response_bytes "
                f"{schema.max_response_bytes}; send fewer examples per request"
            )
    keys = features.keys
    key_index = key_orders(keys) if key_orders is not None else _key_indices(keys, schema)
    n_keys = len(key_index)
    lengths = features.lengths
    if lengths.size != n_keys * batch_size:
        raise InvalidRequest(
            f"features.lengths has {lengths.size} entries, expected len(keys) x batch_size = "
            f"{n_keys} x {batch_size} = {n_keys * batch_size}"
        )
    if lengths.size and int(lengths.min()) < 0:
        i = _first(lengths < 0)
        key = keys[i // batch_size]
        raise InvalidRequest(f"negative length {int(lengths[i])} at {names.element('lengths', i, key)} (key {key!r})")
    values = features.values
    if values.size > schema.max_request_ids:
        raise InvalidRequest(f"{values.size} ids is over the server's max_request_ids {schema.max_request_ids}")
    lengths = lengths.reshape(n_keys, batch_size)
    ids_per_key = lengths.sum(axis=1, dtype=np.int64)
    total = int(ids_per_key.sum())
    if total != values.size:
        raise InvalidRequest(f"sum(lengths) = {total} but features.values has {values.size} ids")
    weights = features.weights
    if weights is not None:
        if weights.size != values.size:
            raise InvalidRequest(f"features.weights has {weights.size} entries but features.values has {values.size}")
        if not np.isfinite(weights).all():
            i = _first(~np.isfinite(weights))
            key = keys[int(np.searchsorted(np.cumsum(ids_per_key), i, side="right"))]
            raise InvalidRequest(f"non-finite weight {float(weights[i])} at {names.element('weights', i, key)}")
    if values.size:
        if int(values.min()) < 0:
            i = _first(values < 0)
            key = schema.keys[np.repeat(key_index, ids_per_key)[i]]
            raise InvalidRequest(f"negative id {int(values[i])} at {names.element('values', i, key)} (key {key!r})")
        # One max per key (reduceat over the keys that have ids), compared with the key's rows: the common case
        # of ids all in range costs two passes over the ids, whatever the number of keys.
        present = ids_per_key > 0
        starts = np.concatenate(([0], np.cumsum(ids_per_key)[:-1]))[present]
        rows_present = schema.num_embeddings[key_index[present]]
        if (np.maximum.reduceat(values, starts) >= rows_present).any():
            values = _ids_into_range(values, key_index, ids_per_key, schema, names)
        if weights is not None:
            key_of_id = np.repeat(key_index, ids_per_key)
            unweighted = ~schema.weighted[key_of_id] & (weights != 1.0)
            if unweighted.any():
                i = _first(unweighted)
                key = schema.keys[key_of_id[i]]
                raise InvalidRequest(
                    f"weight {float(weights[i])} at {names.element('weights', i, key)} is for key {key!r}, "
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
        request_id=request_id,
    )


def _ids_into_range(
    values: np.ndarray, key_index: np.ndarray, ids_per_key: np.ndarray, schema: ModelSchema, names: FieldNames
) -> np.ndarray:
    """Ids past their table's rows: hashed into range (`id_policy: hash`), else the first one is an error."""
    key_of_id = np.repeat(key_index, ids_per_key)
    rows = schema.num_embeddings[key_of_id]
    too_big = values >= rows
    reject = too_big & ~schema.hashed[key_of_id]
    if reject.any():
        i = _first(reject)
        key = schema.keys[key_of_id[i]]
        raise InvalidRequest(
            f"id {int(values[i])} at {names.element('values', i, key)} is out of range for key {key!r} "
            f"(num_embeddings {int(rows[i])})"
        )
    return np.where(too_big, values % rows, values)
