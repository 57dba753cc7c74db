"""Every invalid input is rejected with a message that names the problem."""

from __future__ import annotations

import numpy as np
import pytest

from embserve.server.decode import ECHO_CHARS, KeyOrders, decode_lookup
from embserve.server.errors import InvalidRequest
from embserve.server.request import ModelSchema
from embserve.v1 import embserve_pb2 as pb

SCHEMA = ModelSchema(
    keys=("user", "hashtags", "topics"),
    num_embeddings=np.array([100, 50, 10]),
    hashed=np.array([False, False, True]),
    weighted=np.array([False, True, False]),
    max_request_examples=64,
    max_request_ids=1000,
)


def request(
    keys: list[str],
    batch_size: int,
    lengths: list[int],
    values: list[int],
    weights: list[float] | None = None,
    *,
    raw: dict[str, bytes] | None = None,
) -> pb.LookupRequest:
    raw = raw or {}
    f = pb.SparseFeatures(
        keys=keys,
        batch_size=batch_size,
        lengths=raw.get("lengths", np.array(lengths, "<i4").tobytes()),
        values=raw.get("values", np.array(values, "<i8").tobytes()),
        weights=raw.get("weights", b"" if weights is None else np.array(weights, "<f4").tobytes()),
    )
    return pb.LookupRequest(features=f)


INVALID = [
    (
        request(["nope"], 1, [1], [1]),
        r"unknown key 'nope' at keys\[0\]; the model's keys are \['user', 'hashtags', 'topics'\]",
    ),
    (request(["user", "user"], 1, [1, 1], [1, 2]), "duplicate key 'user'"),
    (request(["user"], 2, [1], [1]), r"lengths has 1 entries, expected len\(keys\) x batch_size = 1 x 2 = 2"),
    (request(["user"], 2, [1, 1], [1]), r"sum\(lengths\) = 2 but features.values has 1 ids"),
    (request(["user"], 2, [2, -1], [1]), r"negative length -1 at lengths\[1\] \(key 'user'\)"),
    (request(["user"], 1, [1], [-5]), r"negative id -5 at values\[0\] \(key 'user'\)"),
    (
        request(["user"], 1, [2], [3, 100]),
        r"id 100 at values\[1\] is out of range for key 'user' \(num_embeddings 100\)",
    ),
    (request(["hashtags"], 1, [2], [1, 2], [1.0]), "features.weights has 1 entries but features.values has 2"),
    (request(["hashtags"], 1, [1], [1], [float("nan")]), r"non-finite weight nan at weights\[0\]"),
    (request(["hashtags"], 1, [1], [1], [float("inf")]), r"non-finite weight inf at weights\[0\]"),
    (request(["user", "hashtags"], 1, [1, 1], [1, 2], [0.5, 2.0]), "weight 0.5 at weights.0. is for key 'user'"),
    (
        request(["user"], 1, [1], [1], raw={"lengths": b"\x01\x00\x00"}),
        "features.lengths has 3 bytes, not a multiple of 4",
    ),
    (request(["user"], 1, [1], [1], raw={"values": b"\x01" * 9}), "features.values has 9 bytes, not a multiple of 8"),
    (request(["hashtags"], 1, [1], [1], raw={"weights": b"\x01\x00"}), "features.weights has 2 bytes"),
    (request(["user"], 0, [], []), "batch_size must be > 0, got 0"),
    (request(["user"], -3, [], []), "batch_size must be > 0, got -3"),
    (request(["user"], 65, [0] * 65, []), "batch_size 65 is over the server's max_request_examples 64"),
    (request(["user"], 1, [1001], list(range(1001))), "1001 ids is over the server's max_request_ids 1000"),
]


@pytest.mark.parametrize(("req", "message"), INVALID)
def test_invalid_requests_are_named(req: pb.LookupRequest, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_lookup(req, SCHEMA)


def test_bad_output_dtype() -> None:
    req = request(["user"], 1, [1], [1])
    req.output_dtype = 42  # type: ignore[assignment]
    with pytest.raises(InvalidRequest, match="output_dtype 42"):
        decode_lookup(req, SCHEMA)


def test_hash_policy_maps_ids_into_range_and_weights_of_one_are_allowed() -> None:
    req = request(["topics", "user"], 2, [2, 1, 1, 0], [10, 23, 9, 99], [1.0, 1.0, 1.0, 1.0])
    decoded = decode_lookup(req, SCHEMA)
    np.testing.assert_array_equal(decoded.values, [0, 3, 9, 99])
    np.testing.assert_array_equal(decoded.ids_per_key, [3, 1])


def test_valid_empty_request_and_missing_keys() -> None:
    decoded = decode_lookup(request([], 3, [], []), SCHEMA)
    assert decoded.batch_size == 3 and decoded.values.size == 0 and decoded.lengths.shape == (0, 3)


def test_key_order_cache_is_bounded_and_never_keeps_a_bad_list() -> None:
    orders = KeyOrders(SCHEMA, max_entries=2)
    lists = [("user",), ("hashtags",), ("topics",), ("user", "topics"), ("topics", "user")]
    for keys in lists * 2:
        np.testing.assert_array_equal(orders(keys), [SCHEMA.index_of(k) for k in keys])
    assert len(orders._known) == 2  # pushed past its bound: the least recently used lists were dropped
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="unknown key 'nope'"):
            orders(("user", "nope"))
    assert ("user", "nope") not in orders._known
    r = decode_lookup(request(["topics", "user"], 1, [1, 1], [12, 7]), SCHEMA, orders)
    assert r.key_index.tolist() == [2, 0] and r.values.tolist() == [2, 7]  # topics hashes: 12 mod 10


def test_more_keys_than_the_model_is_rejected_before_any_per_key_work() -> None:
    keys = [f"k{i}" for i in range(10_000)]
    with pytest.raises(InvalidRequest, match="features.keys has 10000 keys; the model has 3"):
        decode_lookup(request(keys, 1, [0] * 10_000, []), SCHEMA)


def test_echoed_input_is_bounded() -> None:
    name = "x" * 1_000_000
    with pytest.raises(InvalidRequest) as err:
        decode_lookup(request([name], 1, [0], []), SCHEMA)
    message = str(err.value)
    assert len(message) < 3 * ECHO_CHARS + 200 and "(1000002 characters)" in message
