"""The receive budget on a real server: a call with a unary request reserves room for the largest message before
its message is read, and is refused RESOURCE_EXHAUSTED at once when there is none; the health service is served
the same way; a large LookupRequest's keys are counted on the wire before it is parsed; after a large request
the server trims its heap."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.embeddings import ServingModel
from embserve.server.decode import MAX_OTHER_FIELDS, check_lookup_wire, request_id_of
from embserve.server.errors import InvalidRequest
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.conftest import ServerHandle
from tests.reference import pool
from tests.server.helpers import embeddings_of, lookup_request
from tests.server.test_attacks import _END_HEADERS, _HEADERS, _call_headers, _ended_streams, _frame, _raw_connection

Factory = Callable[..., ServerHandle]
MiB = 1 << 20
LOOKUP = method_path("Lookup")


def _lookup(address: str) -> grpc.RpcError | np.ndarray:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        try:
            return embeddings_of(call(lookup_request(["user"], np.array([[2]]), np.array([3, 5])), timeout=10))
        except grpc.RpcError as err:
            return err


def test_a_call_without_room_to_receive_is_refused_at_once(
    server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    # Room for exactly one message of the largest size; a raw client opens a call and never sends its message,
    # so its handler holds the reservation while it waits to read.
    server = server_factory(small_serving, limits={"max_message_bytes": MiB, "max_receive_bytes": MiB})
    sock = _raw_connection(server.address, window=1 << 16)
    try:
        _ended_streams(sock, 1, timeout=0.3)  # acknowledges the server's SETTINGS
        sock.sendall(_frame(_HEADERS, _END_HEADERS, _call_headers(LOOKUP), 1))
        deadline = time.monotonic() + 10
        while server.server.servicer.receive.used < MiB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.server.servicer.receive.used == MiB
        refused = _lookup(server.address)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "max_receive_bytes 1048576" in refused.details()  # type: ignore[attr-defined]
        with grpc.insecure_channel(server.address) as ch:  # the health service is read the same way
            with pytest.raises(grpc.RpcError) as health_err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    finally:
        sock.close()  # the waiting call ends: its reservation is released
    deadline = time.monotonic() + 10
    while server.server.servicer.receive.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.servicer.receive.used == 0
    got = _lookup(server.address)
    assert isinstance(got, np.ndarray)
    expected = pool(small_tables, ["user"], np.array([[2]]), np.array([3, 5]), None, small_serving.keys)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert server.metric("embserve_requests_total", {"method": "Lookup", "code": "RESOURCE_EXHAUSTED"}) == 1


def _features(keys: list[str], **fields: object) -> bytes:
    return bytes(pb.LookupRequest(features=pb.SparseFeatures(keys=keys, **fields), request_id="r").SerializeToString())


def test_keys_are_counted_on_the_wire_before_parsing() -> None:
    check_lookup_wire(_features(["a", "b"], batch_size=3, values=b"\0" * 800), max_keys=2)  # valid: passes
    with pytest.raises(InvalidRequest, match="more than 2 keys"):
        check_lookup_wire(_features(["a", "b", "a"]), max_keys=2)
    # Several features fields are merged by protobuf: their keys add up.
    two = _features(["a"]) + _features(["b", "c"])
    assert len(pb.LookupRequest.FromString(two).features.keys) == 3
    with pytest.raises(InvalidRequest, match="more than 2 keys"):
        check_lookup_wire(two, max_keys=2)
    # A flood of unknown fields is bounded too, and so is every walk: it stops at the first field over a bound.
    unknown = b"\xa8\x06\x01" * (MAX_OTHER_FIELDS + 3)  # field 101, varint 1
    with pytest.raises(InvalidRequest, match="more than"):
        check_lookup_wire(unknown, max_keys=2)
    for corrupt in (b"\x0a\x05ab", b"\x80", b"\x0b"):  # a length past the end, a cut varint, a group
        with pytest.raises(InvalidRequest):
            check_lookup_wire(corrupt, max_keys=2)


def test_a_stream_message_without_room_is_refused_with_its_request_id(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    # The budget is held by a call that never sends its message; a stream message is then refused in-band, and
    # the refusal carries the message's request_id, read from the wire, so a client can match it.
    server = server_factory(small_serving, limits={"max_message_bytes": MiB, "max_receive_bytes": MiB})
    sock = _raw_connection(server.address, window=1 << 16)
    try:
        _ended_streams(sock, 1, timeout=0.3)
        sock.sendall(_frame(_HEADERS, _END_HEADERS, _call_headers(LOOKUP), 1))
        deadline = time.monotonic() + 10
        while server.server.servicer.receive.used < MiB and time.monotonic() < deadline:
            time.sleep(0.01)
        request = lookup_request(["user"], np.array([[2]]), np.array([3, 5]))
        request.request_id = "stream-7"
        with grpc.insecure_channel(server.address) as ch:
            replies = list(ch.stream_stream(method_path("LookupStream"))(
                iter([request.SerializeToString()]), timeout=10))
    finally:
        sock.close()
    assert len(replies) == 1
    reply = pb.LookupResponse.FromString(replies[0])
    assert reply.request_id == "stream-7"
    assert reply.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_receive_bytes 1048576" in reply.status.message


def test_request_id_is_read_from_the_wire() -> None:
    message = pb.LookupRequest(features=pb.SparseFeatures(keys=["a"], values=b"\0" * 64), request_id="r-9")
    assert request_id_of(message.SerializeToString()) == "r-9"
    assert request_id_of(pb.LookupRequest(request_id="a").SerializeToString()
                         + pb.LookupRequest(request_id="b").SerializeToString()) == "b"  # the last, as parsed
    assert request_id_of(b"\x1a\x09short") == ""  # cut: nothing to name
    assert request_id_of(b"") == ""


def test_heap_is_trimmed_after_a_large_request(
    server_factory: Factory, small_serving: ServingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr("embserve.server.app.release_free_memory", lambda: trims.append(1))
    # A request whose ids are at least offload_decode_bytes (1 KiB here) is large.
    server = server_factory(small_serving, limits={"offload_decode_bytes": 1024})
    assert isinstance(_lookup(server.address), np.ndarray)  # 2 ids: small, no trim
    assert trims == []
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        call(lookup_request(["user"], np.array([[200]]), np.arange(200) % 10), timeout=10)
    assert trims == [1]
