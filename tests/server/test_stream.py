"""LookupStream against a real server: per-message answers and statuses, completion order, deadlines,
cancellation, the outstanding bound, drain, and the SDK's recovery from a broken stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import pytest

from embserve.client import AsyncClient, Client, DeadlineExceeded, InvalidRequest
from embserve.embeddings import ModelConfig, ServingModel
from embserve.server.streams import StreamServicer
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.reference import assert_pooled_close, pool
from tests.server.helpers import embeddings_of, lookup_request, wrapped
from tests.support import ServerHandle, wait_until

Factory = Callable[..., ServerHandle]
CALL_TIMEOUT = 20


def _good(rng: np.random.Generator, request_id: str, batch: int = 2) -> pb.LookupRequest:
    lengths = rng.integers(0, 3, size=(2, batch)).astype(np.int32)
    values = np.concatenate([rng.integers(0, 1000, lengths[0].sum()), rng.integers(0, 500, lengths[1].sum())])
    request = lookup_request(["user", "author"], lengths, values)
    request.request_id = request_id
    return request


def _bad(request_id: str) -> pb.LookupRequest:
    request = lookup_request(["user"], np.array([[1]]), np.array([5000]))  # user has 1000 rows
    request.request_id = request_id
    return request


def _check(
    response: pb.LookupResponse, request: pb.LookupRequest, config: ModelConfig, tables: dict[str, np.ndarray]
) -> None:
    f = request.features
    lengths = np.frombuffer(f.lengths, "<i4").reshape(len(f.keys), f.batch_size)
    expected = pool(tables, list(f.keys), lengths, np.frombuffer(f.values, "<i8"), None, list(response.keys))
    dims = {t.name: t.embedding_dim for t in config.tables}
    assert_pooled_close(dims, {"author"}, list(response.keys), embeddings_of(response), expected)


def _stream(address: str) -> tuple[grpc.Channel, grpc.StreamStreamMultiCallable]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    method = channel.stream_stream(
        method_path("LookupStream"),
        request_serializer=pb.LookupRequest.SerializeToString,
        response_deserializer=pb.LookupResponse.FromString,
    )
    return channel, method


def _exchange(address: str, requests: list[pb.LookupRequest]) -> list[pb.LookupResponse]:
    channel, method = _stream(address)
    with channel:
        return list(method(iter(requests), timeout=CALL_TIMEOUT))


def test_good_and_bad_messages_interleaved_on_one_stream(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(small_serving)
    rng = np.random.default_rng(0)
    requests = [_good(rng, f"g{i}") if i % 2 == 0 else _bad(f"b{i}") for i in range(10)]
    replies = {r.request_id: r for r in _exchange(server.address, requests)}
    assert sorted(replies) == sorted(r.request_id for r in requests)  # one answer per message, the stream went on
    for request in requests:
        reply = replies[request.request_id]
        if request.request_id.startswith("b"):
            assert reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "id 5000 at values[0] is out of range for key 'user'" in reply.status.message
            assert not reply.embeddings
        else:
            assert not reply.HasField("status")
            _check(reply, request, small_config, small_tables)
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"}) == 5
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "INVALID_ARGUMENT"}) == 5


def test_answers_come_back_as_they_complete(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.5))
    rng = np.random.default_rng(1)
    replies = _exchange(server.address, [_good(rng, "slow"), _bad("fast")])
    assert [r.request_id for r in replies] == ["fast", "slow"]  # the rejected one did not wait for the batch


def test_missing_request_id_is_answered_with_a_status(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(small_serving)
    (reply,) = _exchange(server.address, [_good(np.random.default_rng(2), "")])
    assert (
        reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        and "request_id is required" in reply.status.message
    )


def test_per_message_timeout(server_factory: Factory, small_serving: ServingModel) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.6))
    rng = np.random.default_rng(3)
    late = _good(rng, "late")
    late.timeout_ms = 50
    relaxed = _good(rng, "relaxed")
    relaxed.timeout_ms = 10_000
    replies = {r.request_id: r for r in _exchange(server.address, [_good(rng, "first"), late, relaxed])}
    assert replies["late"].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert not replies["first"].HasField("status") and not replies["relaxed"].HasField("status")
    assert server.metric("embserve_dropped_total", {"reason": "deadline"}) == 1


def test_outstanding_cap_answers_resource_exhausted_at_once(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.5), limits={"max_stream_outstanding": 2})
    rng = np.random.default_rng(4)
    replies = _exchange(server.address, [_good(rng, f"m{i}") for i in range(6)])
    codes = {r.request_id: r.status.code for r in replies}
    assert codes["m0"] == codes["m1"] == 0  # the first two were in progress ...
    for i in range(2, 6):  # ... so the rest were refused without waiting for them
        assert codes[f"m{i}"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    exhausted = next(r for r in replies if r.request_id == "m2")
    assert "max_stream_outstanding" in exhausted.status.message
    assert [r.request_id for r in replies][:4] == ["m2", "m3", "m4", "m5"]


def test_cancel_mid_stream_drops_queued_messages_and_serves_others(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    slow = wrapped(small_serving, delay_s=0.4)
    server = server_factory(slow, batching={"max_batch_size": 2})
    rng = np.random.default_rng(5)
    channel, method = _stream(server.address)
    sent = threading.Event()

    def requests() -> Iterator[pb.LookupRequest]:
        for i in range(5):
            yield _good(rng, f"c{i}")  # 2 examples each: one message per batch
        sent.set()
        threading.Event().wait(CALL_TIMEOUT)  # keep the stream open until it is cancelled

    with channel:
        call = method(requests(), timeout=CALL_TIMEOUT)
        assert sent.wait(CALL_TIMEOUT)
        server.call(asyncio.sleep(0.1))
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    other = _good(rng, "other")
    (reply,) = _exchange(server.address, [other])  # another caller is answered correctly meanwhile
    _check(reply, other, small_config, small_tables)
    assert getattr(slow.module, "calls") <= 3  # the cancelled stream's queued messages never reached a forward
    assert server.metric("embserve_dropped_total", {"reason": "cancelled"}) >= 2


def test_drain_answers_messages_in_flight_then_ends_the_stream(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.5), grace_period_s=10.0)
    rng = np.random.default_rng(6)
    channel, method = _stream(server.address)
    first = [_good(rng, f"d{i}") for i in range(3)]
    after = _good(rng, "after-drain")
    go_on = threading.Event()

    def requests() -> Iterator[pb.LookupRequest]:
        yield from first
        go_on.wait(CALL_TIMEOUT)
        yield after
        threading.Event().wait(CALL_TIMEOUT)  # the client never half-closes: the server must end the stream

    with channel:
        call = method(requests(), timeout=CALL_TIMEOUT)
        server.call(asyncio.sleep(0.2))  # the first messages are in progress
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
        server.call(asyncio.sleep(0.1))
        go_on.set()
        replies = {r.request_id: r for r in call}  # ends by itself, with OK
        assert call.code() == grpc.StatusCode.OK
        stopping.result(CALL_TIMEOUT)
    for request in first:
        _check(replies[request.request_id], request, small_config, small_tables)
    assert replies["after-drain"].status.code == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.fixture
def flaky_first_stream(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The first LookupStream call reads three lookups or more (messages may carry several), answers none, and
    fails UNAVAILABLE."""
    original = StreamServicer.LookupStream
    state = {"broken": 0, "received": 0}

    async def flaky(self: StreamServicer, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        if state["broken"]:
            return await original(self, requests, context)
        state["broken"] = 1
        async for raw in requests:
            state["received"] += len(pb.LookupRequest.FromString(raw).requests) or 1
            if state["received"] >= 3:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected stream failure")

    monkeypatch.setattr(StreamServicer, "LookupStream", flaky)
    return state


def _features(i: int) -> dict[str, list[list[int]]]:
    return {"user": [[i, i + 1], [i + 2]], "author": [[i % 500], []]}


def _expect(i: int, tables: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    f = _features(i)
    lengths = np.array([[len(b) for b in f[k]] for k in f], dtype=np.int32)
    values = np.array([x for k in f for b in f[k] for x in b], dtype=np.int64)
    return pool(tables, list(f), lengths, values, None, keys)


def test_sdk_resends_what_a_broken_stream_left_unanswered(
    flaky_first_stream: dict[str, int],
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.05))
    dims = {t.name: t.embedding_dim for t in small_config.tables}
    with Client(server.address, transport="stream", streams=1, timeout=CALL_TIMEOUT) as client:
        client.metadata()
        results: dict[int, np.ndarray] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i, client.lookup(_features(i), request_id=f"call-{i}").embeddings
                )
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT)
    assert flaky_first_stream["received"] >= 3  # lookups lost with the first stream (several may share a message)
    assert sorted(results) == list(range(6))  # ... and every lookup has exactly its own answer
    keys = list(small_serving.keys)
    for i, got in results.items():
        assert_pooled_close(dims, {"author"}, keys, got, _expect(i, small_tables, keys))
    ok = server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"})
    assert ok == 6  # each answered once by the server that answered


async def test_async_sdk_resends_what_a_broken_stream_left_unanswered(
    flaky_first_stream: dict[str, int],
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
) -> None:
    server = server_factory(wrapped(small_serving, delay_s=0.05))
    dims = {t.name: t.embedding_dim for t in small_config.tables}
    async with AsyncClient(server.address, transport="stream", streams=1, timeout=CALL_TIMEOUT) as client:
        await client.metadata()
        results = await asyncio.gather(*(client.lookup(_features(i), request_id=f"call-{i}") for i in range(6)))
    assert flaky_first_stream["received"] >= 3  # lookups lost with the first stream (sent together, maybe all six)
    keys = list(small_serving.keys)
    for i, result in enumerate(results):
        assert_pooled_close(dims, {"author"}, keys, result.embeddings, _expect(i, small_tables, keys))
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"}) == 6


def test_response_bytes_bounds_hold_on_streams_and_calls(
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
) -> None:
    # 40 float32 columns: 160 bytes per example. One connection may be owed 65,536 bytes of answers (the least
    # allowed), and no single answer may exceed 60,000 bytes (375 examples).
    server = server_factory(
        wrapped(small_serving, delay_s=0.3),
        limits={
            "max_response_bytes": 60_000,
            "max_pending_response_bytes_per_connection": 65_536,
            "max_request_examples": 512,
        },
    )
    rng = np.random.default_rng(7)
    first, second, big = _good(rng, "first", batch=300), _good(rng, "second", batch=300), _good(rng, "big", batch=376)
    replies = {r.request_id: r for r in _exchange(server.address, [first, second, big])}
    # 48,000 bytes owed while the first batch runs, 96,000 with the second: over the connection's bound, so the
    # stream stops reading until its client takes answers. It reads them, so nothing is refused.
    for name, request in (("first", first), ("second", second)):
        assert not replies[name].HasField("status")
        _check(replies[name], request, small_config, small_tables)
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "RESOURCE_EXHAUSTED"}) == 0
    assert replies["big"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "max_response_bytes 60000" in replies["big"].status.message
    with Client(server.address, transport="unary", retry=None) as client:  # the same bound on a unary call
        with pytest.raises(InvalidRequest, match="max_response_bytes 60000"):
            client.lookup({"user": [[1]] * 376})


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_drain_ends_an_idle_stream_at_once(
    client_kind: str, server_factory: Factory, small_serving: ServingModel
) -> None:
    # An SDK stream with nothing in flight when the drain starts ends at once: the stop returns long before the
    # 60 s grace period, which a stream held open until the end of the grace would take.
    server = server_factory(small_serving, grace_period_s=60.0)
    lookup = {"user": [[3, 4]], "author": [[7]]}
    if client_kind == "sync":
        with Client(server.address, transport="stream", streams=1, timeout=CALL_TIMEOUT) as client:
            client.lookup(lookup)  # the stream is open and idle
            server.call(server.server.stop(), timeout=20)
    else:

        async def run() -> None:
            async with AsyncClient(server.address, transport="stream", streams=1, timeout=CALL_TIMEOUT) as client:
                await client.lookup(lookup)
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop))

        asyncio.run(asyncio.wait_for(run(), 20))
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "OK"}) == 1


def test_a_lookup_the_sdk_gave_up_on_is_never_computed(server_factory: Factory, small_serving: ServingModel) -> None:
    # The SDK sends each lookup's remaining deadline as timeout_ms: a lookup queued behind a slow batch whose
    # caller gave up is dropped by the server when its deadline passes, before any forward runs it.
    slow = wrapped(small_serving, delay_s=1.0)
    server = server_factory(slow)
    with Client(server.address, transport="stream", streams=1, timeout=CALL_TIMEOUT) as client:
        client.metadata()
        first = threading.Thread(target=lambda: client.lookup({"user": [[1]]}))
        first.start()
        wait_until(lambda: getattr(slow.module, "calls") == 1, what="the first batch running")
        with pytest.raises(DeadlineExceeded):
            client.lookup({"user": [[2]]}, timeout=0.2)
        first.join(CALL_TIMEOUT)
        wait_until(lambda: server.metric("embserve_dropped_total", {"reason": "deadline"}) == 1, what="the drop")
        assert getattr(slow.module, "calls") == 1  # the abandoned lookup reached no forward
        client.lookup({"user": [[3]]})  # the stream goes on
    assert getattr(slow.module, "calls") == 2
    assert server.metric("embserve_requests_total", {"method": "LookupStream", "code": "DEADLINE_EXCEEDED"}) == 1
