"""Property-based bad input: decoding only ever answers InvalidRequest, and a live server gives every call a
defined status while concurrent valid callers keep getting correct answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embserve.client import Client
from embserve.embeddings import ServingModel
from embserve.server.config import ServerConfig
from embserve.server.decode import decode_lookup, parse_message
from embserve.server.errors import InvalidRequest
from embserve.server.request import ModelSchema
from embserve.v1 import embserve_pb2 as pb
from tests.reference import assert_pooled_close, pool
from tests.support import SMALL_TABLES, ServerHandle, float_tables, make_config, start_server

KNOWN = [t["name"] for t in SMALL_TABLES]
EXTREME_IDS = [0, 1, 199, 200, 299, 300, 999, 1000, -1, 2**63 - 1, -(2**63), 2**31, 2**32 + 5]


def _i32(xs: list[int]) -> bytes:
    return np.array(xs, dtype="<i8").clip(-(2**31), 2**31 - 1).astype("<i4").tobytes()


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    keys = draw(st.lists(st.one_of(st.sampled_from(KNOWN), st.text(max_size=8)), max_size=6))
    batch = draw(st.one_of(st.integers(-3, 6), st.sampled_from([0, 2**31 - 1, -(2**31), 100_000])))
    coherent = draw(st.booleans())
    n_len = len(keys) * max(batch, 0) if coherent and abs(batch) < 1000 else draw(st.integers(0, 20))
    lengths = draw(
        st.lists(st.one_of(st.integers(-2, 5), st.sampled_from([2**31 - 1, -(2**31)])), min_size=n_len, max_size=n_len)
    )
    total = sum(lengths) if coherent and all(0 <= x < 100 for x in lengths) else draw(st.integers(0, 30))
    values = draw(
        st.lists(st.one_of(st.integers(0, 1200), st.sampled_from(EXTREME_IDS)), min_size=total, max_size=total)
    )
    weights = draw(
        st.one_of(
            st.just(None),
            st.lists(st.one_of(st.floats(width=32), st.just(1.0)), min_size=total, max_size=total),
            st.lists(st.floats(width=32, allow_nan=True), max_size=8),
        )
    )
    req = pb.LookupRequest(
        features=pb.SparseFeatures(
            keys=keys,
            batch_size=batch,
            lengths=_i32(lengths),
            values=np.array(values, dtype="<i8").tobytes(),
            weights=b"" if weights is None else np.array(weights, dtype="<f4").tobytes(),
        ),
        output_dtype=draw(st.sampled_from([0, 1, 2, 3, 7])),
    )
    raw = req.SerializeToString()
    if draw(st.booleans()):  # byte-level damage: truncation or a flipped byte
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + (bytes([draw(st.integers(0, 255))]) if draw(st.booleans()) else b"") + raw[cut + 1 :]
    return raw


@pytest.fixture(scope="module")
def schema_model() -> ServingModel:
    from embserve.embeddings import build_serving_model

    return build_serving_model(make_config())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(requests(), st.binary(max_size=200)))
def test_decode_answers_only_invalid_request(raw: bytes, schema_model: ServingModel) -> None:
    limits = ServerConfig().limits
    schema = ModelSchema.of(
        schema_model, max_request_examples=limits.max_request_examples, max_request_ids=limits.max_request_ids
    )
    try:
        decoded = decode_lookup(parse_message(pb.LookupRequest, raw), schema)
    except InvalidRequest as err:
        assert str(err)
        return
    # Accepted: every invariant the batch relies on holds.
    assert decoded.batch_size > 0 and decoded.lengths.shape == (len(decoded.key_index), decoded.batch_size)
    assert (decoded.lengths >= 0).all() and int(decoded.lengths.sum()) == decoded.values.size
    rows = np.repeat(schema.num_embeddings[decoded.key_index], decoded.ids_per_key)
    assert ((decoded.values >= 0) & (decoded.values < rows)).all()
    if decoded.weights is not None:
        assert np.isfinite(decoded.weights).all()


@pytest.fixture(scope="module")
def live_server(schema_model: ServingModel) -> Iterator[ServerHandle]:
    handle = start_server(ServerConfig(port=0, metrics_port=None), schema_model)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def fuzz_tables() -> dict[str, np.ndarray]:
    return float_tables(make_config())


def _assert_accepted_call_is_correct(raw: bytes, response: pb.LookupResponse, tables: dict[str, np.ndarray]) -> None:
    """An accepted call's answer against the numpy reference, from the request as the server parsed it."""
    config = make_config()
    f = pb.LookupRequest.FromString(raw).features
    keys = list(f.keys)
    lengths = np.frombuffer(f.lengths, "<i4").reshape(len(keys), f.batch_size)
    values = np.frombuffer(f.values, "<i8")
    weights = np.frombuffer(f.weights, "<f4") if f.weights else None
    rows = {t.name: t.num_embeddings for t in config.tables}
    hashed = {t.name for t in config.tables if t.id_policy.value == "hash"}
    key_of = np.repeat(np.array(keys, dtype=object), lengths.sum(axis=1)) if keys else np.array([], dtype=object)
    ids = np.array([v % rows[k] if k in hashed else v for v, k in zip(values.tolist(), key_of)], dtype=np.int64)
    weighted = {t.name for t in config.tables if t.weighted}
    expected = pool(tables, keys, lengths, ids, weights, list(response.keys), weighted_keys=weighted)
    shape = tuple(response.shape)
    if response.dtype == pb.DTYPE_FLOAT32:
        dims = {t.name: t.embedding_dim for t in config.tables}
        assert_pooled_close(
            dims, {"author"}, list(response.keys), np.frombuffer(response.embeddings, "<f4").reshape(shape), expected
        )
    elif response.dtype == pb.DTYPE_FLOAT16:
        out = np.frombuffer(response.embeddings, "<f2").reshape(shape).astype(np.float64)
        np.testing.assert_allclose(out, expected, rtol=2**-10, atol=2e-3)
    else:
        assert response.dtype == pb.DTYPE_BFLOAT16
        bf16 = (np.frombuffer(response.embeddings, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        np.testing.assert_allclose(bf16, expected, rtol=2**-7, atol=2e-3)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(requests(), st.binary(max_size=300)))
def test_server_gives_every_garbage_call_a_defined_status(
    raw: bytes, live_server: ServerHandle, fuzz_tables: dict[str, np.ndarray]
) -> None:
    channel = grpc.insecure_channel(live_server.address)
    with channel:
        call = channel.unary_unary("/embserve.v1.EmbeddingService/Lookup")
        try:
            response = pb.LookupResponse.FromString(call(raw, timeout=10))
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            return
        _assert_accepted_call_is_correct(raw, response, fuzz_tables)


@pytest.mark.slow
def test_valid_callers_stay_correct_during_fuzzing(
    live_server: ServerHandle, fuzz_tables: dict[str, np.ndarray]
) -> None:
    tables = fuzz_tables
    features = {"user": [[1, 2], [999]], "hashtags": [[3], [4, 5]]}
    weights = {"hashtags": [[0.5], [2.0, 1.0]]}
    lengths = np.array([[2, 1], [1, 2]], np.int32)
    values = np.array([1, 2, 999, 3, 4, 5])
    w = np.array([1, 1, 1, 0.5, 2.0, 1.0])
    failures: list[str] = []
    answered: list[int] = []
    done = threading.Event()

    def valid() -> None:
        with Client(live_server.address) as client:
            while not done.is_set():
                r = client.lookup(features, weights=weights)
                answered.append(r.batch_size)
                expected = pool(
                    tables, ["user", "hashtags"], lengths, values, w, list(r.keys), weighted_keys={"hashtags"}
                )
                if not np.allclose(r.embeddings, expected, atol=2e-3, rtol=1e-3):
                    failures.append("wrong answer")

    thread = threading.Thread(target=valid)
    thread.start()
    try:
        test_server_gives_every_garbage_call_a_defined_status(live_server=live_server, fuzz_tables=tables)
    finally:
        done.set()
        thread.join(30)
    assert not failures
    assert answered  # the valid caller was answered (correctly) while the fuzzing went on
