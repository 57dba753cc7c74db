"""`AsyncClient` against a real server: the cases of `test_client.py`, awaited. Every call has a deadline, so a
broken client fails the test within seconds instead of hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from embserve.client import AsyncClient, DeadlineExceeded, InvalidRequest, LookupResult, RetryPolicy, Unavailable
from embserve.embeddings import ModelConfig, ServingModel
from tests.client.test_client import FEATURES, TRANSPORTS, WEIGHTS, _assert_result, _kjt_form, _numpy_form, calls
from tests.server.helpers import wrapped
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]
T = TypeVar("T")
LIMIT_S = 30.0


async def within(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, LIMIT_S)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_input_form_gives_identical_correct_results(
    transport: str,
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
) -> None:
    handle = server_factory(small_serving)
    async with AsyncClient(handle.address, transport=transport) as client:
        lists = await within(client.lookup(FEATURES, weights=WEIGHTS))
        arrays = await within(client.lookup(_numpy_form()))
        kjt = await within(client.lookup(_kjt_form()))
        assert await within(client.health()) == "SERVING"
    _assert_result(small_config, small_tables, lists)
    np.testing.assert_array_equal(lists.embeddings, arrays.embeddings)
    np.testing.assert_array_equal(lists.embeddings, kjt.embeddings)
    assert lists.model_name == "small" and lists.model_version == small_serving.version


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_oversized_request_is_chunked_and_joined_in_order(
    transport: str,
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
) -> None:
    handle = server_factory(small_serving, limits={"max_request_examples": 16}, batching={"max_batch_size": 16})
    rng = np.random.default_rng(0)
    n = 100
    lengths = {"user": rng.integers(0, 4, n), "hashtags": rng.integers(0, 3, n)}
    ids = {
        "user": rng.integers(0, 1000, int(lengths["user"].sum())),
        "hashtags": rng.integers(0, 300, int(lengths["hashtags"].sum())),
    }
    w = rng.uniform(0.5, 2, int(lengths["hashtags"].sum()))
    arrays = {"user": (lengths["user"], ids["user"]), "hashtags": (lengths["hashtags"], ids["hashtags"], w)}
    async with AsyncClient(handle.address, transport=transport) as client:
        assert (await within(client.metadata())).max_request_examples == 16
        whole = await within(client.lookup(arrays))
    assert whole.batch_size == n
    # Each example against the numpy reference: chunks joined out of order put rows in the wrong place.
    from tests.reference import assert_pooled_close, pool

    keys = ["user", "hashtags"]
    all_weights = np.concatenate([np.ones(ids["user"].size), w])
    expected = pool(
        small_tables,
        keys,
        np.stack([lengths[k] for k in keys]),
        np.concatenate([ids[k] for k in keys]),
        all_weights,
        list(whole.keys),
        weighted_keys={"hashtags"},
    )
    dims = {t.name: t.embedding_dim for t in small_config.tables}
    assert_pooled_close(dims, {"author"}, list(whole.keys), whole.embeddings, expected)
    assert calls(handle, "OK") == 7


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_request_id_is_echoed(transport: str, server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    async with AsyncClient(handle.address, transport=transport) as client:
        result = await within(client.lookup(FEATURES, weights=WEIGHTS, request_id="req-async-42"))
        plain = await within(client.lookup(FEATURES, weights=WEIGHTS))
    assert result.request_id == "req-async-42" and plain.request_id == ""


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_retries_stop_at_the_bound_and_can_be_switched_off(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(small_serving)
    handle.server.door.begin_drain()  # every lookup is answered UNAVAILABLE
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncClient(handle.address, retry=policy, transport=transport) as client:
        await within(client.metadata())
        with pytest.raises(Unavailable, match="shutting down"):
            await within(client.lookup(FEATURES))
    assert calls(handle, "UNAVAILABLE") == 3
    async with AsyncClient(handle.address, retry=None, transport=transport) as client:
        with pytest.raises(Unavailable):
            await within(client.lookup(FEATURES))
    assert calls(handle, "UNAVAILABLE") == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_round_robin_spreads_calls_over_replicas(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    a = server_factory(small_serving)
    b = server_factory(small_serving)
    async with AsyncClient([a.address, b.address], transport=transport) as client:
        for _ in range(40):
            await within(client.lookup(FEATURES, weights=WEIGHTS))
    calls_a, calls_b = calls(a, "OK"), calls(b, "OK")
    assert calls_a + calls_b == 40
    assert calls_a >= 10 and calls_b >= 10, (calls_a, calls_b)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_errors_map_to_sdk_exceptions(
    transport: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.3))
    async with AsyncClient(handle.address, transport=transport) as client:
        with pytest.raises(InvalidRequest, match="unknown key 'nope'") as info:
            await within(client.lookup({"nope": [[1]]}))
        assert info.value.code == "INVALID_ARGUMENT" and info.value.__cause__ is None
        with pytest.raises(InvalidRequest, match="out of range for key 'user'"):
            await within(client.lookup({"user": [[10**6]]}))
        with pytest.raises(DeadlineExceeded):
            await within(client.lookup({"user": [[1]]}, timeout=0.05))
    async with AsyncClient("127.0.0.1:1", timeout=1, retry=None, transport=transport) as client:
        with pytest.raises(Unavailable):
            await within(client.metadata())


async def test_empty_features_with_batch_size_are_zero_rows(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(small_serving)
    async with AsyncClient(handle.address) as client:
        result: LookupResult = await within(client.lookup({}, batch_size=4))
    assert result.embeddings.shape == (4, small_serving.output_dim) and not result.embeddings.any()
