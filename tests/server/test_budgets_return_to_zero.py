"""Every budget returns to zero: after mixed traffic over Lookup, LookupStream and ModelInfer that ends in every way
a call can end, the receive budget, the answers owed and not sent, the queue, calls in flight, decodes and open
streams are all back at zero, and a message that needs the whole receive budget is taken.

Each seed runs its own random mix against an in-process server with the smallest budgets the settings allow, so a
single leaked message would show: success, invalid input, a deadline passing in the queue or during a batch, a
full queue, a failing batch, a caller cancelling mid-call and mid-stream, a stream broken by its client, a client
that never reads its answers and then leaves, and finally a drain with calls in flight.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from embserve.embeddings import ServingModel
from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.server.helpers import lookup_request, wrapped
from tests.support import ServerHandle, ended_streams, raw_connection, send_call, wait_until

Factory = Callable[..., ServerHandle]
LOOKUP = method_path("Lookup")
STREAM = method_path("LookupStream")
BUDGET = 1 << 16  # the least each byte bound allows
POISON = 999  # a `user` id that makes its whole batch fail


def _poisoned(features: Any) -> bool:
    return bool((features["user"].values() == POISON).any())


def _lookup(rng: random.Random, kind: str) -> pb.LookupRequest:
    batch = rng.randint(1, 40)
    ids = [rng.randrange(1000) for _ in range(batch)]
    if kind == "invalid":
        ids[0] = 5000  # `user` has 1,000 rows
    elif kind == "poison":
        ids[0] = POISON
    elif ids[0] == POISON:
        ids[0] = 0
    return lookup_request(["user"], np.ones((1, batch), np.int32), np.array(ids))


def _model_infer(request: pb.LookupRequest) -> bytes:
    infer = oip.ModelInferRequest(model_name="small")
    f = request.features
    infer.inputs.add(name=oip.input_name("user", "lengths"), datatype="INT32", shape=[f.batch_size])
    infer.inputs.add(name=oip.input_name("user", "values"), datatype="INT64", shape=[len(f.values) // 8])
    infer.raw_input_contents.extend([f.lengths, f.values])
    return bytes(infer.SerializeToString())


class Traffic:
    """One actor's calls; outcomes are not checked (any status is an ending), only that they end."""

    def __init__(self, address: str, seed: int) -> None:
        self.address = address
        self.rng = random.Random(seed)
        self.channel = grpc.insecure_channel(address)

    def run(self, operations: int) -> None:
        try:
            for _ in range(operations):
                self.rng.choice([self.unary, self.unary, self.model_infer, self.stream, self.non_reader])()
        finally:
            self.channel.close()

    def _kind(self) -> str:
        return self.rng.choice(["ok", "ok", "ok", "invalid", "poison"])

    def _timeout(self) -> float:
        return self.rng.choice([30.0, 30.0, 0.005, 0.03, 0.1])

    def _call(self, method: str, payload: bytes) -> None:
        call = self.channel.unary_unary(method)
        future = call.future(payload, timeout=self._timeout())
        if self.rng.random() < 0.2:
            time.sleep(self.rng.uniform(0, 0.03))
            future.cancel()  # the caller goes away mid-call
        try:
            future.result()
        except (grpc.RpcError, grpc.FutureCancelledError):
            pass

    def unary(self) -> None:
        self._call(LOOKUP, _lookup(self.rng, self._kind()).SerializeToString())

    def model_infer(self) -> None:
        self._call(oip.MODEL_INFER_METHOD, _model_infer(_lookup(self.rng, self._kind())))

    def stream(self) -> None:
        messages = []
        for i in range(self.rng.randint(1, 12)):
            request = _lookup(self.rng, self._kind())
            request.request_id = "" if self.rng.random() < 0.05 else f"m{i}"  # no id: refused in-band
            request.timeout_ms = self.rng.choice([0, 0, 5, 50])
            messages.append(request.SerializeToString())
        cut = self.rng.random() < 0.3
        call = self.channel.stream_stream(STREAM)(iter(messages), timeout=self._timeout())
        try:
            for n, _ in enumerate(call):
                if cut and n == 0:
                    call.cancel()  # the client breaks the stream with messages in progress
        except grpc.RpcError:
            pass

    def non_reader(self) -> None:
        """A raw client that never reads: its answers are computed and not taken, a further call is held; then it
        leaves."""
        try:
            sock = raw_connection(self.address, window=0)
        except OSError:
            return  # the server has stopped
        try:
            ended_streams(sock, 1, timeout=0.05)
            for stream in (1, 3, 5):
                send_call(sock, stream, LOOKUP, _lookup(self.rng, "ok").SerializeToString())
            time.sleep(self.rng.uniform(0, 0.1))
        except OSError:
            pass  # the server closed the connection (it stopped)
        finally:
            sock.close()


@pytest.fixture
def server(server_factory: Factory, small_serving: ServingModel) -> Iterator[ServerHandle]:
    model = wrapped(small_serving, delay_s=0.01, fail_when=_poisoned)
    yield server_factory(
        model,
        limits={
            "max_receive_bytes": BUDGET,
            "max_pending_response_bytes": BUDGET,
            "max_pending_response_bytes_per_connection": BUDGET,
            "max_stream_outstanding": 4,
        },
        batching={
            "max_queue_bytes": BUDGET,
            "max_batch_bytes": BUDGET,
            "max_queue_size": 256,
            "max_batch_size": 64,
            "max_queue_wait_ms": 50,
        },
    )


def _settled(handle: ServerHandle) -> dict[str, int]:
    accounting = handle.server.door.accounting()
    return {name: value for name, value in accounting.items() if value}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_budget_returns_to_zero_however_calls_end(server: ServerHandle, seed: int) -> None:
    actors = [Traffic(server.address, seed * 100 + i) for i in range(6)]
    threads = [threading.Thread(target=a.run, args=(25,)) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    wait_until(lambda: not _settled(server), timeout=20, what=f"every budget back at zero ({_settled(server)})")

    # A message of the whole receive budget is taken only when nothing else is counted: a leak would refuse it.
    full = lookup_request(["user"], np.array([[8180]]), np.arange(8180) % POISON)
    assert full.ByteSize() > BUDGET // 2
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        assert call(full, timeout=30).shape[0] == 1
        half = lookup_request(["user"], np.array([[4000]]), np.arange(4000) % POISON)
        futures = [call.future(half, timeout=30) for _ in range(4)]  # answered, or refused at once: never held
        for future in futures:
            try:
                future.result()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_until(lambda: not _settled(server), timeout=20, what=f"every budget back at zero ({_settled(server)})")


def test_budgets_return_to_zero_after_a_drain_with_calls_in_flight(server: ServerHandle) -> None:
    actors = [Traffic(server.address, 900 + i) for i in range(4)]
    threads = [threading.Thread(target=a.run, args=(40,)) for a in actors]
    for t in threads:
        t.start()
    time.sleep(0.3)
    server.call(server.server.stop(2.0))  # drain while calls and streams are in progress
    for t in threads:
        t.join(120)
    assert not _settled(server)


def test_a_held_call_whose_client_leaves_returns_its_budgets(server: ServerHandle) -> None:
    sock = raw_connection(server.address, window=0)
    door = server.server.door
    try:
        ended_streams(sock, 1, timeout=0.05)
        big = pb.LookupRequest(features=pb.SparseFeatures(batch_size=300)).SerializeToString()  # 48,000-byte answer
        send_call(sock, 1, LOOKUP, big)
        wait_until(lambda: door.responses.unsent == 48_000, what="the answer computed and not taken")
        send_call(sock, 3, LOOKUP, big)
        wait_until(lambda: door.responses.waiting == 1, what="the second call held")
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    wait_until(lambda: not _settled(server), what=f"every budget back at zero ({_settled(server)})")
