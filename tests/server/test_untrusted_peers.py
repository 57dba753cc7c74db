"""Callers without a token cost little: made-up method names cannot grow `/metrics`, token-free health watches are
capped, and a refused call's large request is not read."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.benchmarks.procs import LogReader, metrics_text, rss_bytes
from embserve.embeddings import ServingModel
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.server.helpers import lookup_request
from tests.server.test_supervision import TINY_MODEL
from tests.server.test_workers import BIN
from tests.support import ServerHandle

pytestmark = pytest.mark.attack

Factory = Callable[..., ServerHandle]
SECRET, LOOKUP_ONLY = "s3cr3t-token-ABC", "lookup-only-QRS"
LOOKUP = method_path("Lookup")


def _tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{SECRET} *\n{LOOKUP_ONLY} Lookup\n")
    return path


def _auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _lookup(channel: grpc.Channel, token: str, key: str = "user") -> pb.LookupResponse:
    request = lookup_request([key], np.array([[1]]), np.array([7]))
    call = channel.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
    response: pb.LookupResponse = call(request, metadata=_auth(token), timeout=10)
    return response


def test_made_up_methods_do_not_grow_metrics(
    tmp_path: Path, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(small_serving, auth={"tokens_file": str(_tokens(tmp_path))}, metrics_port=0)
    port = handle.server.metrics_port
    channel = grpc.insecure_channel(handle.address)
    try:
        _lookup(channel, SECRET)
        before = len(metrics_text(port))
        calls = []
        for i in range(5000):  # half without a token, half with a token that may call Lookup only
            metadata = _auth(LOOKUP_ONLY) if i % 2 else None
            calls.append(channel.unary_unary(method_path(f"Made{i}Up")).future(b"", metadata=metadata, timeout=60))
            if len(calls) >= 200:  # below max_concurrent_streams, so no call is refused for the stream limit
                codes = {c.exception().code() for c in calls}
                assert codes == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
                calls.clear()
        text = metrics_text(port)
    finally:
        channel.close()
    assert len(text) - before < 2048, len(text) - before  # two label sets at most: (unknown, each code)
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert handle.metric("embserve_requests_total", {"method": "unknown", "code": code}) == 2500
    assert "Made" not in text


def _watch(health: health_pb2_grpc.HealthStub, token: str | None = None) -> grpc.Call:
    return health.Watch(health_pb2.HealthCheckRequest(), metadata=_auth(token) if token else None, timeout=60)


def _wait_metric(handle: ServerHandle, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while handle.metric(name) != value:
        assert time.monotonic() < deadline, (name, handle.metric(name), value)
        time.sleep(0.02)


def test_token_free_health_watches_are_capped(
    tmp_path: Path, server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(
        small_serving, auth={"tokens_file": str(_tokens(tmp_path))}, limits={"max_health_watches": 3}
    )
    channel = grpc.insecure_channel(handle.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        open_watches = [_watch(health) for _ in range(3)]
        for w in open_watches:
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        assert handle.metric("embserve_tokenless_health_watches") == 3
        with pytest.raises(grpc.RpcError) as err:
            next(_watch(health))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_health_watches" in str(err.value.details())
        with pytest.raises(grpc.RpcError) as err:  # a token that is not valid does not lift the cap
            next(_watch(health, "wrong"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        tokened = _watch(health, LOOKUP_ONLY)  # any valid token: not counted, not capped
        assert next(tokened).status == health_pb2.HealthCheckResponse.SERVING
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        assert _lookup(channel, SECRET).shape[0] == 1

        open_watches.pop().cancel()  # a watch that ends frees its place
        _wait_metric(handle, "embserve_tokenless_health_watches", 2)
        replacement = _watch(health)
        assert next(replacement).status == health_pb2.HealthCheckResponse.SERVING
        for w in [*open_watches, tokened, replacement]:
            w.cancel()
        _wait_metric(handle, "embserve_tokenless_health_watches", 0)
    finally:
        channel.close()


def test_health_watches_are_capped_without_auth(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, limits={"max_health_watches": 1})
    channel = grpc.insecure_channel(handle.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        first = _watch(health)
        assert next(first).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            next(_watch(health))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
    finally:
        channel.close()


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`embserve serve` with bearer tokens, as its own process, so its memory is measured apart from the client's."""
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY_MODEL))
    proc = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--model",
            str(model),
            "--port",
            "0",
            "--no-metrics",
            "--auth-tokens-file",
            str(_tokens(tmp_path)),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        yield proc, str(LogReader(proc.stderr).wait("serving")[0]["address"])
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_refused_call_is_not_read(auth_server: tuple[subprocess.Popen[str], str]) -> None:
    """8 token-free 32 MB calls at once: before the refusal was made a streaming handler, the server received each
    message in full (about 1.5x its size in RSS, still held afterwards); now it answers from the headers."""
    proc, address = auth_server
    body = b"\x0a" + b"\x01" * (32 << 20)  # never parsed
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(8)]
    start = peak = rss_bytes(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        calls = [c.unary_unary(LOOKUP).future(body, timeout=60) for c in channels]
        codes = {call.exception().code() for call in calls}
        done.set()
        sampler.join(10)
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        assert peak - start < 64 << 20, (peak - start) >> 20  # 256 MB were sent
        with grpc.insecure_channel(address) as channel:  # and the service still answers
            assert _lookup(channel, SECRET, key="a").shape[0] == 1
    finally:
        done.set()
        for c in channels:
            c.close()
