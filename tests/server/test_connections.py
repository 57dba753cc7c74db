"""Connection bounds on a real server: idle, never-set-up and surplus connections are closed, and the calls open
on one connection are capped. Raw HTTP/2 frames where the grpc client would hide what the server did."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.embeddings import ServingModel
from embserve.server.config import ConnectionsConfig
from embserve.server.connections import FD_RESERVE, grpc_options, max_connections, raise_fd_limit
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _GOAWAY = 0x4, 0x7
_ACK = 0x1
_MAX_CONCURRENT_STREAMS = 0x3


def _frame(kind: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + b"\0\0\0\0" + payload


def _connect(address: str, *, http2: bool = True) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    if http2:
        sock.sendall(_PREFACE + _frame(_SETTINGS))
    return sock


def _frames(sock: socket.socket, *, ack: bool = True) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of each frame the server sends, until it closes the connection; `ack`: acknowledge
    its SETTINGS, as a client must. A recv that waits longer than the socket's timeout raises, so a test of a
    limit fails instead of hanging."""
    buffer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
            buffer = buffer[9 + length :]
            if ack and kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK))
            yield kind, flags, payload


def _settings(payload: bytes) -> dict[int, int]:
    return {ident: value for ident, value in struct.iter_unpack(">HI", payload)}


def test_grpc_options_follow_the_config() -> None:
    options = dict(grpc_options(ConnectionsConfig(max_connection_idle_ms=1234, max_concurrent_streams=7)))
    assert options["grpc.max_connection_idle_ms"] == 1234
    assert options["grpc.max_concurrent_streams"] == 7
    soft = raise_fd_limit()
    assert max_connections(ConnectionsConfig()) == max(1, soft - FD_RESERVE)
    assert options["grpc.max_allowed_incoming_connections"] == max(1, soft - FD_RESERVE)
    assert max_connections(ConnectionsConfig(max_connections=5)) == 5


def test_idle_connection_is_closed(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, connections={"max_connection_idle_ms": 300})
    start = time.monotonic()
    with _connect(handle.address) as sock:
        kinds = [kind for kind, _, _ in _frames(sock)]
    assert _GOAWAY in kinds, kinds  # told to go away, then closed
    assert time.monotonic() - start < 10  # not by a default timeout of minutes


def test_connection_that_never_sets_up_is_closed(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, connections={"handshake_timeout_ms": 300})
    start = time.monotonic()
    with _connect(handle.address, http2=False) as sock:  # TCP only: no HTTP/2 preface, no TLS
        list(_frames(sock, ack=False))  # ends when the server closes the connection (a recv waiting 10 s raises)
    assert time.monotonic() - start < 10  # not by the default timeout of 120 s


def test_connections_beyond_the_cap_are_closed(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, connections={"max_connections": 2})
    held = [_connect(handle.address) for _ in range(2)]
    try:
        for sock in held:  # each was accepted: the server sends its SETTINGS
            kind, _, _ = next(_frames(sock))
            assert kind == _SETTINGS
        with _connect(handle.address) as extra:
            assert [kind for kind, _, _ in _frames(extra, ack=False)] == []  # closed at once, unanswered
    finally:
        for sock in held:
            sock.close()
    channel = grpc.insecure_channel(handle.address)
    try:  # the cap counts open connections: once they close, calls get through again
        deadline = time.monotonic() + 10
        while True:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
    finally:
        channel.close()


def test_concurrent_streams_per_connection_are_capped(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, connections={"max_concurrent_streams": 2})
    with _connect(handle.address) as sock:
        kind, _, payload = next(_frames(sock))
        assert kind == _SETTINGS and _settings(payload)[_MAX_CONCURRENT_STREAMS] == 2

    channel = grpc.insecure_channel(handle.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        for watch in watches:  # both streams are open on the server
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:  # a third call on this connection waits for a free stream
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        watches[0].cancel()
        # Once the server has seen the cancel, the stream is free. (A call sent before that would be refused with
        # REFUSED_STREAM, which the grpc client reports as UNAVAILABLE: see docs/hardening.md.)
        deadline = time.monotonic() + 10
        while handle.metric("embserve_tokenless_health_watches") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        watches[1].cancel()
    finally:
        channel.close()


def test_kernel_addresses_name_peers_as_grpc_does() -> None:
    from embserve.server.unused_connections import PeerActivity, _peer_name

    assert _peer_name("0100007F:D036") == "ipv4:127.0.0.1:53302"
    assert _peer_name("00000000000000000000000001000000:1F90") == "ipv6:[::1]:8080"
    assert _peer_name("0000000000000000FFFF00000100007F:0050") == "ipv4:127.0.0.1:80"  # IPv4-mapped
    activity = PeerActivity(max_peers=2)
    for peer in ("a", "b", "c"):
        activity.saw(peer)
    assert "a" not in activity and "b" in activity and "c" in activity  # bounded: the oldest forgotten
    activity.keep_only({"c"})
    assert "b" not in activity and "c" in activity
