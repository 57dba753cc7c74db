"""Several lookups in one LookupStream message: each is handled as if it came alone (its own id, status and
deadline), a bad one does not fail its neighbours, answers may come several to a message, the stream's bounds hold
per lookup, and the SDK (async and blocking) sends concurrent lookups together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from embserve.client import AsyncClient, Client, InvalidRequest, _streams
from embserve.embeddings import ModelConfig, ServingModel
from embserve.v1 import embserve_pb2 as pb
from tests.server.helpers import wrapped
from tests.server.test_stream import _bad, _check, _exchange, _good
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]


def _answers(replies: list[pb.LookupResponse]) -> dict[str, pb.LookupResponse]:
    return {r.request_id: r for reply in replies for r in (reply.responses or [reply])}


def test_each_lookup_of_a_message_is_answered_on_its_own(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(small_serving)
    rng = np.random.default_rng(0)
    lookups = [_good(rng, f"g{i}") if i % 3 else _bad(f"b{i}") for i in range(9)]
    lookups.append(_good(rng, ""))  # no id: refused alone
    replies = _exchange(
        server.address, [pb.LookupRequest(requests=lookups[:5]), pb.LookupRequest(requests=lookups[5:])]
    )
    answers = _answers(replies)
    assert sorted(answers) == sorted(r.request_id for r in lookups)
    for lookup in lookups:
        answer = answers[lookup.request_id]
        if lookup.request_id.startswith("g"):
            assert not answer.HasField("status")
            _check(answer, lookup, small_config, small_tables)
        elif lookup.request_id.startswith("b"):
            assert answer.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "out of range for key 'user'" in answer.status.message
        else:
            assert "request_id is required" in answer.status.message
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"}) == 6


def test_each_lookup_keeps_its_own_deadline(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.6))
    rng = np.random.default_rng(3)
    late, relaxed = _good(rng, "late"), _good(rng, "relaxed")
    late.timeout_ms, relaxed.timeout_ms = 50, 10_000
    blocker = _good(rng, "first")
    answers = _answers(_exchange(server.address, [blocker, pb.LookupRequest(requests=[late, relaxed])]))
    assert answers["late"].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert not answers["relaxed"].HasField("status") and not answers["first"].HasField("status")


def test_the_outstanding_bound_counts_lookups_not_messages(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.3), limits={"max_stream_outstanding": 3})
    rng = np.random.default_rng(4)
    lookups = [_good(rng, f"g{i}") for i in range(3)]
    answers = _answers(_exchange(server.address, [pb.LookupRequest(requests=lookups), _good(rng, "extra")]))
    assert answers["extra"].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert all(not answers[f"g{i}"].HasField("status") for i in range(3))
    # A message carrying more lookups than that is refused whole, before any is queued.
    (refused,) = _exchange(server.address, [pb.LookupRequest(requests=[_good(rng, f"x{i}") for i in range(4)])])
    assert "carries 4 lookups" in refused.status.message
    assert not any(server.server.door.accounting().values())


def test_nested_lookups_are_refused_alone(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(small_serving)
    rng = np.random.default_rng(5)
    nested = pb.LookupRequest(request_id="nested", requests=[_good(rng, "inner")])
    answers = _answers(_exchange(server.address, [pb.LookupRequest(requests=[nested, _good(rng, "ok")])]))
    assert "carries lookups itself" in answers["nested"].status.message
    assert not answers["ok"].HasField("status")


def _record_messages(client: AsyncClient) -> list[pb.LookupRequest]:
    """The messages the client's one open stream writes from now on."""
    sent: list[pb.LookupRequest] = []
    assert client._streams is not None
    (stream,) = client._streams._streams
    write = stream._call.write

    async def recording(message: pb.LookupRequest) -> None:
        sent.append(message)
        await write(message)

    stream._call.write = recording
    return sent


async def test_the_sdk_sends_concurrent_lookups_together(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(small_serving)
    async with AsyncClient(server.address, streams=1) as client:
        info = await client.metadata()
        assert info.max_stream_batch == info.max_stream_outstanding > 1
        await client.lookup({"user": [[1]]})  # the stream is open: record what it writes from here
        sent = _record_messages(client)
        features = [{"user": [[i % 1000]], "author": [[i % 500]]} for i in range(40)]
        results = await asyncio.gather(*(client.lookup(f) for f in features))
        assert sum(len(m.requests) or 1 for m in sent) == 40 and len(sent) < 40  # several lookups per message
        bad = client.lookup({"user": [[5000]]})
        good = client.lookup({"user": [[7]]})
        outcomes = await asyncio.gather(bad, good, return_exceptions=True)
    async with AsyncClient(server.address, transport="unary") as unary:
        alone = await asyncio.gather(*(unary.lookup(f) for f in features))
    for result, expected in zip(results, alone):  # each answer is its own lookup's, in the caller's order
        assert np.array_equal(result.embeddings, expected.embeddings)
    assert isinstance(outcomes[0], Exception) and "out of range" in str(outcomes[0])
    assert not isinstance(outcomes[1], Exception)
    messages = server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"})
    assert messages == 42  # every lookup counted on its own


async def test_an_sdk_told_not_to_coalesce_sends_one_lookup_per_message(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    server = server_factory(small_serving)
    async with AsyncClient(server.address, streams=1, coalesce=False) as client:
        await client.lookup({"user": [[1]]})
        sent = _record_messages(client)
        await asyncio.gather(*(client.lookup({"user": [[i]]}) for i in range(20)))
    assert len(sent) == 20 and not any(m.requests for m in sent)


def test_the_blocking_sdk_sends_lookups_of_several_threads_together(
    server_factory: Factory, small_serving: ServingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups that threads queue while the stream is sending go out in one message; each thread gets its own
    answer, and a bad lookup among them fails alone."""
    server = server_factory(small_serving)
    sent: list[pb.LookupRequest] = []
    original = _streams._coalesced

    def held(first: pb.LookupRequest, take: Any, max_batch: int, max_bytes: int) -> Any:
        deadline = time.monotonic() + 10
        while client._streams is not None and time.monotonic() < deadline:  # the other threads' lookups queue up
            (stream,) = client._streams._streams
            if stream._outbox.qsize() >= 7:
                break
            time.sleep(0.005)
        messages, closing = original(first, take, max_batch, max_bytes)
        sent.extend(messages)
        return messages, closing

    features = [{"user": [[i]], "author": [[i % 500]]} for i in range(7)] + [{"user": [[5000]]}]
    with Client(server.address, transport="stream", streams=1) as client:
        client.lookup({"user": [[1]]})  # the stream is open
        monkeypatch.setattr(_streams, "_coalesced", held)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.lookup, f) for f in features]
            outcomes = [f.exception() or f.result() for f in futures]
    with Client(server.address, transport="unary") as unary:
        alone = [unary.lookup(f) for f in features[:7]]
    assert max(len(m.requests) for m in sent) == 8  # all eight in one message
    for got, want in zip(outcomes[:7], alone):
        assert not isinstance(got, BaseException) and np.array_equal(got.embeddings, want.embeddings)
    assert isinstance(outcomes[7], InvalidRequest) and "out of range" in str(outcomes[7])
