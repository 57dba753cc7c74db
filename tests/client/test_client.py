"""The SDK against a real server: every input form, results, chunking, retries, round-robin, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embserve.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidRequest,
    LookupResult,
    Overloaded,
    RetryPolicy,
    Unavailable,
)
from embserve.embeddings import ModelConfig, ServingModel
from tests.reference import assert_pooled_close, pool
from tests.server.helpers import wrapped
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]
TRANSPORTS = ["unary", "stream"]


def calls(handle: ServerHandle, code: str) -> float:
    """Lookups the server answered with `code`, over either transport (a stream message counts as one)."""
    return sum(
        handle.metric("embserve_requests_total", {"method": m, "code": code}) for m in ("Lookup", "LookupStream")
    )


FEATURES = {"hashtags": [[1, 2, 3], [], [299]], "user": [[10], [11, 12], []], "author": [[], [5], [6, 7]]}
WEIGHTS = {"hashtags": [[0.5, 1.5, 2.0], [], [3.0]]}


def _expected(
    config: ModelConfig,
    tables: dict[str, np.ndarray],
    keys: list[str],
    features: dict[str, list[list[int]]],
    weights: dict[str, list[list[float]]] | None,
) -> np.ndarray:
    lengths = np.array([[len(b) for b in features[k]] for k in features], dtype=np.int32)
    values = np.array([i for k in features for b in features[k] for i in b], dtype=np.int64)
    w = None
    if weights:
        w = np.array(
            [
                x
                for k in features
                for j, b in enumerate(features[k])
                for x in (weights[k][j] if k in weights else [1.0] * len(b))
            ],
            dtype=np.float64,
        )
    return pool(tables, list(features), lengths, values, w, keys, weighted_keys={"hashtags"})


def _assert_result(
    config: ModelConfig,
    tables: dict[str, np.ndarray],
    result: LookupResult,
    weights: dict[str, list[list[float]]] | None = WEIGHTS,
) -> None:
    expected = _expected(config, tables, list(result.keys), FEATURES, weights)
    dims = {t.name: t.embedding_dim for t in config.tables}
    assert_pooled_close(dims, {"author"}, list(result.keys), result.embeddings, expected)
    offset = 0
    for key in result.keys:  # per-key views are the right columns
        np.testing.assert_array_equal(result[key], result.embeddings[:, offset : offset + dims[key]])
        offset += dims[key]


def _numpy_form() -> dict[str, tuple[np.ndarray, ...]]:
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for k, bags in FEATURES.items():
        lengths = np.array([len(b) for b in bags])
        values = np.array([i for b in bags for i in b])
        if k in WEIGHTS:
            out[k] = (lengths, values, np.array([x for b in WEIGHTS[k] for x in b]))
        else:
            out[k] = (lengths, values)
    return out


def _kjt_form() -> KeyedJaggedTensor:
    keys = list(FEATURES)
    lengths = torch.tensor([len(b) for k in keys for b in FEATURES[k]], dtype=torch.int32)
    values = torch.tensor([i for k in keys for b in FEATURES[k] for i in b])
    weights = torch.tensor(
        [
            x
            for k in keys
            for j, b in enumerate(FEATURES[k])
            for x in (WEIGHTS[k][j] if k in WEIGHTS else [1.0] * len(b))
        ]
    )
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def test_every_input_form_gives_identical_correct_results(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    handle = server_factory(small_serving)
    with Client(handle.address) as client:
        lists = client.lookup(FEATURES, weights=WEIGHTS)
        arrays = client.lookup(_numpy_form())
        kjt = client.lookup(_kjt_form())
    _assert_result(small_config, small_tables, lists)
    np.testing.assert_array_equal(lists.embeddings, arrays.embeddings)
    np.testing.assert_array_equal(lists.embeddings, kjt.embeddings)
    assert lists.model_name == "small" and lists.model_version == small_serving.version
    assert not lists.embeddings.flags.writeable  # a view over the response bytes, not a copy
    kt = lists.to_torch()
    assert isinstance(kt, KeyedTensor) and kt.keys() == list(lists.keys)
    np.testing.assert_array_equal(kt["user"].numpy(), lists["user"])


def test_async_client_matches_sync(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    handle = server_factory(small_serving)

    async def go() -> tuple[LookupResult, str, list[LookupResult]]:
        async with AsyncClient(handle.address) as client:
            one = await client.lookup(FEATURES, weights=WEIGHTS, output_dtype="float16")
            many = await asyncio.gather(*(client.lookup(FEATURES, weights=WEIGHTS) for _ in range(20)))
            return one, await client.health(), list(many)

    half, health, many = asyncio.run(go())
    assert health == "SERVING" and half.dtype == "float16"
    _assert_result(small_config, small_tables, many[0])
    for r in many[1:]:
        np.testing.assert_array_equal(r.embeddings, many[0].embeddings)
    np.testing.assert_allclose(half.embeddings.astype(np.float32), many[0].embeddings, atol=2e-3)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_oversized_request_is_chunked_and_joined_in_order(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(small_serving, limits={"max_request_examples": 16}, batching={"max_batch_size": 16})
    rng = np.random.default_rng(0)
    n = 100
    features = {
        "user": (rng.integers(0, 4, n), None),
        "hashtags": (rng.integers(0, 3, n), None),
    }
    arrays: dict[str, tuple[np.ndarray, ...]] = {}
    for k, (lengths, _) in features.items():
        rows = 1000 if k == "user" else 300
        arrays[k] = (lengths, rng.integers(0, rows, int(lengths.sum())), rng.uniform(0.5, 2, int(lengths.sum())))
    arrays["user"] = arrays["user"][:2]
    with Client(handle.address, transport=transport) as client:
        assert client.metadata().max_request_examples == 16
        whole = client.lookup(arrays, output_dtype="bfloat16")
        assert whole.batch_size == n
        # The same rows, asked for 10 examples at a time: identical.
        for start in range(0, n, 10):
            part = {}
            for k, spec in arrays.items():
                lengths = spec[0]
                s = int(lengths[:start].sum())
                e = int(lengths[: start + 10].sum())
                part[k] = (lengths[start : start + 10],) + tuple(a[s:e] for a in spec[1:])
            np.testing.assert_array_equal(
                client.lookup(part, output_dtype="bfloat16").embeddings, whole.embeddings[start : start + 10]
            )
    assert calls(handle, "OK") == 7 + 10


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retries_stop_at_the_bound_and_can_be_switched_off(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(small_serving)
    handle.server.door.begin_drain()  # every lookup is answered UNAVAILABLE
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with Client(handle.address, retry=policy, transport=transport) as client:
        client.metadata()
        with pytest.raises(Unavailable, match="shutting down"):
            client.lookup(FEATURES)
    assert calls(handle, "UNAVAILABLE") == 3
    with Client(handle.address, retry=None, transport=transport) as client:
        with pytest.raises(Unavailable):
            client.lookup(FEATURES)
    assert calls(handle, "UNAVAILABLE") == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_on_overload_then_success(transport: str, server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.05),
        batching={"max_batch_size": 3, "max_queue_size": 3, "max_queue_wait_ms": 10_000},
    )
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2)

    async def go(retry: RetryPolicy | None) -> list[object]:
        async with AsyncClient(handle.address, retry=retry, timeout=30, transport=transport) as client:
            await client.metadata()
            return list(await asyncio.gather(*(client.lookup(FEATURES) for _ in range(12)), return_exceptions=True))

    without = asyncio.run(go(None))
    assert any(isinstance(r, Overloaded) for r in without)
    rejected_before = calls(handle, "RESOURCE_EXHAUSTED")
    with_retry = asyncio.run(go(policy))
    rejected = calls(handle, "RESOURCE_EXHAUSTED")
    ok_with_retry = sum(isinstance(r, LookupResult) for r in with_retry)
    assert ok_with_retry > sum(isinstance(r, LookupResult) for r in without)
    assert rejected > rejected_before  # some calls were rejected and then retried successfully


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_round_robin_spreads_calls_over_replicas(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    a = server_factory(small_serving)
    b = server_factory(small_serving)
    with Client([a.address, b.address], transport=transport) as client:
        for _ in range(40):
            client.lookup(FEATURES, weights=WEIGHTS)
    calls_a, calls_b = calls(a, "OK"), calls(b, "OK")
    assert calls_a + calls_b == 40
    assert calls_a >= 10 and calls_b >= 10, (calls_a, calls_b)


def test_errors_map_to_sdk_exceptions(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.3))
    with Client(handle.address) as client:
        with pytest.raises(InvalidRequest, match="unknown key 'nope'") as info:
            client.lookup({"nope": [[1]]})
        assert info.value.code == "INVALID_ARGUMENT" and info.value.__cause__ is None
        with pytest.raises(InvalidRequest, match="out of range for key 'user'"):
            client.lookup({"user": [[10**6]]})
        with pytest.raises(DeadlineExceeded):
            client.lookup({"user": [[1]]}, timeout=0.05)
    with Client("127.0.0.1:1", timeout=1, retry=None) as client:
        with pytest.raises(Unavailable):
            client.metadata()


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        ({"a": [[1]], "b": [[1], [2]]}, {}, "keys disagree on the batch size: a=1, b=2"),
        ({"a": [[-1]]}, {}, r"key 'a': negative id -1 in example 0 \(values\[0\]\)"),
        ({"a": [[1], [2]], "b": [[3], [4, -7]]}, {}, r"key 'b': negative id -7 in example 1 \(values\[4\]\)"),
        ({"a": [[], [2]], "b": [[-3], []]}, {}, r"key 'b': negative id -3 in example 0 \(values\[1\]\)"),
        ({"a": [["x"]]}, {}, "ids must be integers"),
        ({"a": [[1, 2]]}, {"weights": {"a": [[1.0]]}}, "weights lists do not match"),
        ({"a": [[1]]}, {"weights": {"b": [[1.0]]}}, r"weights given for keys not in features: \['b'\]"),
        ({"a": (np.array([2]), np.array([1]))}, {}, r"sum\(lengths\) = 2 but there are 1 ids"),
        ({"a": (np.array([1]), np.array([1]), np.array([np.inf]))}, {}, "non-finite weight"),
        ({"a": (np.array([1]), np.array([1.5]))}, {}, "must hold integers"),
        ({}, {}, "pass batch_size"),
        ({"a": [[1]]}, {"batch_size": 3}, "batch_size=3 but the features hold 1 examples"),
        ([1, 2], {}, "features must be a dict"),
    ],
)
def test_client_side_validation(features: object, kwargs: dict[str, object], message: str) -> None:
    from embserve.client import to_sparse_input

    with pytest.raises(InvalidRequest, match=message):
        to_sparse_input(features, **kwargs)  # type: ignore[arg-type]


def test_empty_features_with_batch_size_are_zero_rows(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    with Client(handle.address) as client:
        result = client.lookup({}, batch_size=4)
    assert result.embeddings.shape == (4, small_serving.output_dim) and not result.embeddings.any()


def test_bad_retry_policy() -> None:
    with pytest.raises(ValueError, match="max_attempts must be 2..5"):
        RetryPolicy(max_attempts=9)


def test_request_id_is_echoed(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    with Client(handle.address) as client:
        result = client.lookup(FEATURES, weights=WEIGHTS, request_id="req-sync-7")
        plain = client.lookup(FEATURES, weights=WEIGHTS)
    assert result.request_id == "req-sync-7" and plain.request_id == ""
