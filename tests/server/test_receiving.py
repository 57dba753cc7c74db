"""The receive budget on a real server: a message counts from the moment its handler has it until it is queued (a
call held by flow control keeps it), and one without room is refused RESOURCE_EXHAUSTED at once, on a call or a
stream; a large LookupRequest's keys are counted on the wire before it is parsed; after a large request the server
trims its heap."""

from __future__ import annotations

import socket
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from embserve.embeddings import ServingModel
from embserve.server.decode import MAX_OTHER_FIELDS, read_lookup_fields, request_id_of
from embserve.server.errors import InvalidRequest
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.reference import pool
from tests.server.helpers import embeddings_of, lookup_request
from tests.support import ServerHandle, ended_streams, raw_connection, send_call, wait_until

Factory = Callable[..., ServerHandle]
MiB = 1 << 20
LOOKUP = method_path("Lookup")


def _lookup(address: str, n_ids: int = 2) -> grpc.RpcError | np.ndarray:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        try:
            return embeddings_of(call(lookup_request(["user"], np.array([[n_ids]]), np.arange(n_ids) % 7), timeout=10))
        except grpc.RpcError as err:
            return err


KiB = 1 << 10
# 40 float32 columns: 160 bytes of answer per example; 300 examples are 48,000 bytes, and a connection is owed at
# most 65,536 (the least allowed), so a second such answer waits for the first to be taken.
HOLDING = {
    "max_message_bytes": MiB,
    "max_receive_bytes": 256 * KiB,
    "max_pending_response_bytes_per_connection": 1 << 16,
    "max_request_examples": 512,
}


def _held_call(server: ServerHandle) -> tuple[socket.socket, int]:
    """A raw client that never reads: its first call's answer is computed and not taken, so its second call, with
    a 60 KB message, is held by flow control and keeps its message in the receive budget. Returns the socket and
    the held message's size."""
    door = server.server.door
    sock = raw_connection(server.address, window=0)
    ended_streams(sock, 1, timeout=0.3)  # acknowledges the server's SETTINGS
    send_call(sock, 1, LOOKUP, pb.LookupRequest(features=pb.SparseFeatures(batch_size=300)).SerializeToString())
    wait_until(lambda: door.responses.unsent == 48_000, what="the first answer computed and not taken")
    held = lookup_request(["user"], np.array([[7500] + [0] * 299]), np.arange(7500) % 1000).SerializeToString()
    send_call(sock, 3, LOOKUP, held)
    wait_until(lambda: door.responses.waiting == 1 and door.receive.used == len(held), what="the second call held")
    return sock, len(held)


def test_a_message_without_room_to_be_held_is_refused_at_once(
    server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(small_serving, limits=HOLDING)
    sock, held = _held_call(server)
    try:
        refused = _lookup(server.address, n_ids=26_000)  # 208 KB more would pass the 256 KiB budget
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_receive_bytes 262144" in refused.details()
        got = _lookup(server.address)  # a small message has room: answered, and right
        assert isinstance(got, np.ndarray)
        expected = pool(small_tables, ["user"], np.array([[2]]), np.arange(2) % 7, None, small_serving.keys)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert server.server.door.receive.used == held  # the refused message was never counted
    finally:
        sock.close()  # the held call ends with its connection: its message leaves the budget
    wait_until(lambda: not any(server.server.door.accounting().values()), what="every budget back at zero")
    assert server.metric("embserve_requests_total", {"method": "Lookup", "code": "RESOURCE_EXHAUSTED"}) == 1


def _features(keys: list[str], batch_size: int = 0, values: bytes = b"") -> bytes:
    features = pb.SparseFeatures(keys=keys, batch_size=batch_size, values=values)
    return bytes(pb.LookupRequest(features=features, request_id="r").SerializeToString())


def test_keys_are_counted_on_the_wire_before_parsing() -> None:
    read_lookup_fields(_features(["a", "b"], batch_size=3, values=b"\0" * 800), max_keys=2)  # valid: passes
    with pytest.raises(InvalidRequest, match="more than 2 keys"):
        read_lookup_fields(_features(["a", "b", "a"]), max_keys=2)
    # Several features fields are merged by protobuf: their keys add up.
    two = _features(["a"]) + _features(["b", "c"])
    assert len(pb.LookupRequest.FromString(two).features.keys) == 3
    with pytest.raises(InvalidRequest, match="more than 2 keys"):
        read_lookup_fields(two, max_keys=2)
    # A flood of unknown fields is bounded too, and so is every walk: it stops at the first field over a bound.
    unknown = b"\xa8\x06\x01" * (MAX_OTHER_FIELDS + 3)  # field 101, varint 1
    with pytest.raises(InvalidRequest, match="more than"):
        read_lookup_fields(unknown, max_keys=2)
    for corrupt in (b"\x0a\x05ab", b"\x80", b"\x0b"):  # a length past the end, a cut varint, a group
        with pytest.raises(InvalidRequest):
            read_lookup_fields(corrupt, max_keys=2)


def test_a_stream_message_without_room_is_refused_with_its_request_id(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    # The budget is held by a call that waits for its connection's answers to be read; a stream message is then
    # refused in-band, and the refusal carries the message's request_id, read from the wire, so a client can match
    # it.
    server = server_factory(small_serving, limits=HOLDING)
    sock, _ = _held_call(server)
    try:
        request = lookup_request(["user"], np.array([[26_000]]), np.arange(26_000) % 1000)
        request.request_id = "stream-7"
        with grpc.insecure_channel(server.address) as ch:
            replies = list(
                ch.stream_stream(method_path("LookupStream"))(iter([request.SerializeToString()]), timeout=10)
            )
    finally:
        sock.close()
    assert len(replies) == 1
    reply = pb.LookupResponse.FromString(replies[0])
    assert reply.request_id == "stream-7"
    assert reply.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_receive_bytes 262144" in reply.status.message
    wait_until(lambda: not any(server.server.door.accounting().values()), what="every budget back at zero")


def test_request_id_is_read_from_the_wire() -> None:
    message = pb.LookupRequest(features=pb.SparseFeatures(keys=["a"], values=b"\0" * 64), request_id="r-9")
    assert request_id_of(message.SerializeToString()) == "r-9"
    assert (
        request_id_of(
            pb.LookupRequest(request_id="a").SerializeToString() + pb.LookupRequest(request_id="b").SerializeToString()
        )
        == "b"
    )  # the last, as parsed
    assert request_id_of(b"\x1a\x09short") == ""  # cut: nothing to name
    assert request_id_of(b"") == ""


def test_heap_is_trimmed_after_a_large_request(
    server_factory: Factory, small_serving: ServingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr("embserve.server.local_backend.release_free_memory", lambda: trims.append(1))
    # A request whose ids are at least offload_decode_bytes (1 KiB here) is large.
    server = server_factory(small_serving, limits={"offload_decode_bytes": 1024})
    assert isinstance(_lookup(server.address), np.ndarray)  # 2 ids: small, no trim
    assert trims == []
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        call(lookup_request(["user"], np.array([[200]]), np.arange(200) % 10), timeout=10)
    assert trims == [1]
