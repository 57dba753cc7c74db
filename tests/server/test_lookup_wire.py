"""LookupRequest bytes read in place read what protobuf parses from the same bytes, field by field, including the
wire's corner cases (merged features, later scalars, unknown fields, fields of another wire type), and their
arrays are views of the bytes, not copies."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from embserve.server.decode import decode_lookup, parse_message, read_lookup_fields
from embserve.server.errors import InvalidRequest
from embserve.server.lookup_wire import LookupFields, read_lookup
from embserve.server.request import ModelSchema
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import WireFormatError, unpack_features, varint


def _request(keys: list[str], batch_size: int, lengths: list[int], values: list[int], **kw: object) -> bytes:
    features = pb.SparseFeatures(
        keys=keys,
        batch_size=batch_size,
        lengths=np.array(lengths, "<i4").tobytes(),
        values=np.array(values, "<i8").tobytes(),
    )
    return bytes(pb.LookupRequest(features=features, **kw).SerializeToString())  # type: ignore[arg-type]


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = varint(number << 3 | wire_type)
    return tag + (varint(len(payload)) + payload if wire_type == 2 else payload)


def _same_as_protobuf(raw: bytes) -> LookupFields:
    fields = read_lookup(raw, max_keys=8)
    message = pb.LookupRequest.FromString(raw)
    expected = unpack_features(message.features)
    assert fields.output_dtype == message.output_dtype
    assert fields.request_id == message.request_id
    assert fields.timeout_ms == message.timeout_ms
    got = fields.features
    assert got.keys == expected.keys and got.batch_size == expected.batch_size
    assert np.array_equal(got.lengths, expected.lengths) and np.array_equal(got.values, expected.values)
    assert (got.weights is None) == (expected.weights is None)
    if got.weights is not None and expected.weights is not None:
        assert np.array_equal(got.weights, expected.weights)
    return fields


CASES = {
    "plain": _request(["a", "b"], 2, [1, 0, 2, 1], [5, 6, 7, 8], request_id="r1", timeout_ms=250, output_dtype=2),
    "empty": b"",
    # Two features fields merge: keys add up, a later scalar or bytes field replaces an earlier one.
    "merged features": _request(["a"], 1, [1], [3]) + _request(["b"], 2, [1, 1, 0], [4, 5]),
    "later scalars win": _request(["a"], 1, [1], [3], request_id="x", timeout_ms=9)
    + _field(3, 2, b"y")
    + _field(4, 0, varint(17))
    + _field(2, 0, varint(1)),
    # Unknown fields, and known numbers with another wire type, are skipped as protobuf skips them.
    "unknown fields": _request(["a"], 1, [1], [3]) + _field(99, 2, b"zz") + _field(98, 0, varint(7)),
    "wrong wire types": _request(["a"], 1, [1], [3])
    + _field(3, 0, varint(5))  # request_id as a varint
    + _field(4, 2, b"\x01")  # timeout_ms as bytes
    + _field(1, 0, varint(1))  # features as a varint
    + _field(1, 2, _field(4, 0, varint(3)) + _field(2, 2, b"\x05")),  # values as a varint, batch_size as bytes
    # int32 fields take the low 32 bits of a 64-bit varint; uint32 its low 32 bits.
    "negative and wide": _field(1, 2, _field(2, 0, varint((1 << 64) - 3)))
    + _field(2, 0, varint((1 << 64) - 1))
    + _field(4, 0, varint((1 << 33) + 5)),
    "weights": bytes(
        pb.LookupRequest(
            features=pb.SparseFeatures(
                keys=["w"],
                batch_size=1,
                lengths=np.array([2], "<i4").tobytes(),
                values=np.array([1, 2], "<i8").tobytes(),
                weights=np.array([0.5, 2.0], "<f4").tobytes(),
            )
        ).SerializeToString()
    ),
    "empty weights": _request(["a"], 1, [1], [3]) + _field(1, 2, _field(5, 2, b"")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reads_what_protobuf_parses(name: str) -> None:
    _same_as_protobuf(CASES[name])


def test_arrays_are_views_of_the_message_bytes() -> None:
    raw = _request(["a", "b"], 2, [1, 0, 2, 1], [5, 6, 7, 8])
    fields = read_lookup(raw, max_keys=2)
    for array in (fields.features.values, fields.features.lengths):
        assert np.shares_memory(array, np.frombuffer(raw, np.uint8)) and not array.flags.writeable


def test_validated_like_a_parsed_request() -> None:
    schema = ModelSchema(
        keys=("a", "b"),
        num_embeddings=np.array([10, 10], np.int64),
        hashed=np.array([False, True]),
        weighted=np.array([False, False]),
        max_request_examples=16,
        max_request_ids=100,
    )
    raw = _request(["b", "a"], 2, [1, 1, 2, 0], [13, 4, 5, 6], request_id="q", output_dtype=2)
    got = decode_lookup(read_lookup_fields(raw, 2), schema)
    expected = decode_lookup(parse_message(pb.LookupRequest, raw), schema)
    assert got.request_id == expected.request_id == "q" and got.output_dtype == expected.output_dtype
    assert np.array_equal(got.values, expected.values) and np.array_equal(got.lengths, expected.lengths)
    assert np.array_equal(got.key_index, expected.key_index)
    with pytest.raises(InvalidRequest, match="out of range for key 'a'"):
        decode_lookup(read_lookup_fields(_request(["a"], 1, [1], [10]), 2), schema)


@pytest.mark.parametrize(
    "raw, match",
    [
        (_field(3, 2, b"\xff\xfe"), "request_id is not UTF-8"),
        (_field(1, 2, _field(1, 2, b"\xc3")), r"features.keys\[0\] is not UTF-8"),
        (_field(1, 2, _field(4, 2, b"\x00" * 7)), "features.values has 7 bytes, not a multiple of 8"),
        (b"\x0a\x05ab", "runs past its end"),
    ],
)
def test_what_protobuf_refuses_is_refused(raw: bytes, match: str) -> None:
    if "multiple of" not in match:
        with pytest.raises(DecodeError):
            pb.LookupRequest.FromString(raw)
    with pytest.raises(WireFormatError, match=match):
        read_lookup(raw, max_keys=2)
    with pytest.raises(InvalidRequest):
        read_lookup_fields(raw, 2)
