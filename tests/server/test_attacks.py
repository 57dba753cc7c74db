"""Memory and resource attacks on a real server process (127.0.0.1, default byte bounds unless a test says otherwise): each
bounded in time and count, each checking the server's RSS growth against a fixed figure, its memory afterwards,
the status codes, and a well-behaved caller answered correctly (against numpy) within its deadline meanwhile.

The model has two fp32 tables: `wide` (632 dims) and `narrow` (8 dims), so a request with no keys and batch_size
16384 is answered with 16384 x 640 x 4 = 40 MB of zeros, while a 4M-id request on `narrow` alone
costs little to compute.
"""

from __future__ import annotations

import collections
import gzip
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from embserve.benchmarks.procs import ServerProcess, embserve_command
from embserve.oip import wire as oip
from embserve.server.config import ConnectionsConfig
from embserve.server.connections import FD_RESERVE, max_connections
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import method_path
from tests.reference import pool
from tests.server.helpers import embeddings_of, lookup_request
from tests.support import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    call_headers,
    ended_streams,
    float_tables,
    frame,
    grpc_message,
    make_config,
    raw_connection,
    write_model_config,
)

pytestmark = pytest.mark.attack

TABLES = [
    {"name": "wide", "num_embeddings": 100, "embedding_dim": 632},
    {"name": "narrow", "num_embeddings": 100, "embedding_dim": 8},
]
CONFIG = make_config(TABLES, name="attack")
LOOKUP = method_path("Lookup")
MiB = 1 << 20
# Memory bounds every attack here is held to (well under the 1.5 GB such attacks took before).
RSS_GROWTH_BUDGET = 768 * MiB
SETTLED_BUDGET = 512 * MiB
MAX_MESSAGE = 8 * MiB  # the default max_message_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = write_model_config(CONFIG, tmp_path_factory.mktemp("attack") / "attack.yaml")
    proc = ServerProcess(
        embserve_command(
            path,
            "--max-pending-response-bytes-per-connection",
            str(128 * MiB),
            "--max-pending-response-bytes",
            str(256 * MiB),
            "--max-queue-bytes",
            str(512 * MiB),
            "--unused-connection-grace-ms",
            "1000",
        ),
        "embserve",
    )
    proc.start()
    try:
        proc.wait_ready(120)
        yield proc
    finally:
        proc.stop()


WATCHED_ANSWER = 3 * 640 * 4  # bytes of one answer to the watched caller (3 examples of both tables, float32)


class Watch:
    """Samples the server's RSS (peak) and keeps a well-behaved caller calling, checking every answer."""

    def __init__(self, server: ServerProcess, deadline_s: float = 5.0) -> None:
        self.server = server
        self.deadline_s = deadline_s
        self.start = self.peak = server.rss_bytes()
        self.answers = 0
        self.refusals = 0
        self.failures: list[str] = []
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._call, daemon=True),
        ]

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(30)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            time.sleep(0.01)

    def _call(self) -> None:
        tables = float_tables(CONFIG)
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(self.server.address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
            while not self._done.is_set():
                keys = ["narrow", "wide"]
                lengths = rng.integers(0, 4, size=(2, 3)).astype(np.int32)
                values = rng.integers(0, 100, size=int(lengths.sum())).astype(np.int64)
                try:
                    got = embeddings_of(call(lookup_request(keys, lengths, values), timeout=self.deadline_s))
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.refusals += 1  # overload policy, answered at once: a well-behaved caller retries
                    else:
                        self.failures.append(f"{err.code()}: {err.details()}")
                    continue
                expected = pool(tables, keys, lengths, values, None, ["wide", "narrow"])
                if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
                    self.failures.append("wrong embeddings")
                self.answers += 1
                time.sleep(0.02)

    def check(self, growth_budget: int | None = RSS_GROWTH_BUDGET) -> None:
        assert not self.failures, self.failures[:5]
        assert self.answers > 0
        if growth_budget is not None:
            assert self.peak - self.start < growth_budget, f"RSS grew {(self.peak - self.start) >> 20} MB"


def _settles(server: ServerProcess, start: int, timeout: float = 10.0) -> int:
    """The RSS once within `SETTLED_BUDGET` of `start` (waiting up to `timeout`), else the last one seen."""
    deadline = time.monotonic() + timeout
    rss = server.rss_bytes()
    while rss - start >= SETTLED_BUDGET and time.monotonic() < deadline:
        time.sleep(0.1)
        rss = server.rss_bytes()
    return rss


def _alive(server: ServerProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
        assert call(lookup_request(["narrow"], np.array([[1]]), np.array([3])), timeout=10).shape[0] == 1


def _metric(server: ServerProcess, code: str, method: str = "Lookup") -> float:
    return server.metrics().get(f"embserve_requests_total{{code={code},method={method}}}", 0.0)


def _empty_bags(method: str, batch: int) -> bytes:
    """A call of `batch` examples with no ids: a small request whose answer is `batch` full rows."""
    if method == "Lookup":
        return pb.LookupRequest(features=pb.SparseFeatures(batch_size=batch)).SerializeToString()
    # Typed contents (zeros are one byte each), so the request fits one HTTP/2 frame of the raw client.
    request = oip.ModelInferRequest(model_name=CONFIG.name)
    lengths = request.inputs.add(name=oip.input_name("narrow", "lengths"), datatype="INT32", shape=[batch])
    lengths.contents.int_contents.extend([0] * batch)
    request.inputs.add(name=oip.input_name("narrow", "values"), datatype="INT64", shape=[0])
    return bytes(request.SerializeToString())


def _budget(server: ServerProcess, name: str) -> float:
    return server.metrics().get(f"embserve_budget{{budget={name}}}", -1.0)


@pytest.mark.parametrize(("method", "batch"), [("Lookup", 16384), ("ModelInfer", 12000)])
def test_client_that_does_not_read_cannot_pile_up_replies(server: ServerProcess, method: str, batch: int) -> None:
    """20 calls with no ids and 40 MB answers (batch_size 16384; 31 MB for ModelInfer, whose request must fit one
    frame) from a connection with window 0: a connection is owed at most 128 MiB of answers, so 3 (4 of 31 MB) are
    admitted and the rest held by flow control, none refused and none computed; the memory held is bounded, and
    every budget is back at zero once the connection closes. Before: ~72 MB per call, held until the connection
    closed."""
    body = grpc_message(_empty_bags(method, batch))
    answer = batch * 640 * 4
    admitted = (128 * MiB) // answer  # answers that fit the connection's bound
    path = LOOKUP if method == "Lookup" else oip.MODEL_INFER_METHOD
    refusals_before = {code: _metric(server, code, method) for code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")}
    with Watch(server) as watch:
        sock = raw_connection(server.address, window=0)
        try:
            for stream in range(1, 41, 2):  # paced, so that the server's receive window reopens between calls
                sock.sendall(
                    frame(HEADERS, END_HEADERS, call_headers(path), stream) + frame(DATA, END_STREAM, body, stream)
                )
                assert not ended_streams(sock, 1, timeout=0.1)
            deadline = time.monotonic() + 30
            while _budget(server, "held_calls") != 20 - admitted and time.monotonic() < deadline:
                ended_streams(sock, 1, timeout=0.2)  # acknowledges SETTINGS; a refused call would end here
            assert _budget(server, "held_calls") == 20 - admitted
            # The attacker's admitted answers, and the watched caller's one answer when a call of it is in flight.
            assert _budget(server, "owed_response_bytes") in (admitted * answer, admitted * answer + WATCHED_ANSWER)
            assert not ended_streams(sock, 1, timeout=1.0)  # nothing refused
            held = watch.peak - watch.start
        finally:
            sock.close()
    watch.check(512 * MiB)
    # The only refusals are the watched caller's (queue budget while the 40 MB batches run): none of the attacker's.
    refused = sum(_metric(server, code, method) - before for code, before in refusals_before.items())
    assert refused == (watch.refusals if method == "Lookup" else 0)
    print(f"non-reading {method} client: RSS {watch.start >> 20} MB, +{held >> 20} MB peak")
    deadline = time.monotonic() + 10
    while _budget(server, "owed_response_bytes") or _budget(server, "held_calls"):
        assert time.monotonic() < deadline, "budgets not back at zero after the connection closed"
        time.sleep(0.05)
    assert _settles(server, watch.start) - watch.start < SETTLED_BUDGET
    _alive(server)


def test_metadata_reports_the_byte_bounds(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as ch:
        info = ch.unary_unary(
            method_path("GetModelMetadata"), pb.GetModelMetadataRequest.SerializeToString, pb.ModelMetadata.FromString
        )(pb.GetModelMetadataRequest(), timeout=10)
        assert info.max_response_bytes > 0 and info.max_queue_bytes == 512 * MiB
        assert info.max_pending_response_bytes == 256 * MiB
        assert info.max_pending_response_bytes_per_connection == 128 * MiB


def _large_lookup(n_ids: int, request_id: str = "") -> bytes:
    request = lookup_request(["narrow"], np.array([[n_ids]]), np.zeros(n_ids, dtype=np.int64))
    request.request_id = request_id
    return bytes(request.SerializeToString())


def _check_large_answer(raw: bytes, n_ids: int) -> None:
    got = np.frombuffer(pb.LookupResponse.FromString(raw).embeddings, dtype="<f4")
    expected = pool(
        float_tables(CONFIG), ["narrow"], np.array([[n_ids]]), np.zeros(n_ids, dtype=np.int64), None, ["wide", "narrow"]
    )
    # 4M fp32 additions in the kernel's order: rounding accumulates (n x eps bounds it at 0.24; ~4% seen).
    np.testing.assert_allclose(got, expected.ravel(), rtol=0.1, atol=1e-3)


N_IDS = 1_000_000  # 8 MB of ids: the largest valid request at the default limits (8 MiB, 1M ids)


def _flood(server: ServerProcess, body: bytes, calls: int) -> tuple[list[bytes], list[grpc.RpcError], Watch]:
    """`calls` concurrent unary Lookups of `body` over 4 connections, beside a watched well-behaved caller."""
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.address, options=options) for _ in range(4)]
    with Watch(server, deadline_s=10.0) as watch:
        try:
            futures = [channels[i % 4].unary_unary(LOOKUP).future(body, timeout=60) for i in range(calls)]
            outcomes = [f.exception() for f in futures]
        finally:
            for c in channels:
                c.close()
    answers = [f.result() for f, e in zip(futures, outcomes) if e is None]
    return answers, [e for e in outcomes if e is not None], watch


def test_concurrent_oversized_requests_are_refused_unread(server: ServerProcess) -> None:
    """40 concurrent 32 MB requests (4M ids): over the default max_message_bytes (8 MiB), so gRPC
    refuses each from its length prefix, RESOURCE_EXHAUSTED, without receiving it. Before: peak 5.0 GB."""
    answers, errors, watch = _flood(server, _large_lookup(4_000_000), 40)
    assert not answers and len(errors) == 40
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    print(f"40 x 32 MB: refused, RSS {watch.start >> 20} MB, +{(watch.peak - watch.start) >> 20} MB peak")
    # +82 to +230 MB over five runs (the watched caller and what gRPC takes in before it reads a length prefix);
    # receiving the 1.3 GB would take several times this bound.
    watch.check(512 * MiB)
    _alive(server)


def test_concurrent_large_requests_are_bounded_in_bytes(server: ServerProcess) -> None:
    """40 concurrent valid 8 MB requests (1 example, 1M ids, the largest the default limits take): each call
    reserves 8 MiB of max_receive_bytes before its message is read and keeps its size until it ends, beyond it
    RESOURCE_EXHAUSTED at once; the queue holds at most max_queue_bytes and a batch max_batch_bytes. A
    concurrent caller is answered correctly within its 10 s deadline, the answers are right, and the memory is
    given back afterwards."""
    refused_before = _metric(server, "RESOURCE_EXHAUSTED")
    answers, errors, watch = _flood(server, _large_lookup(N_IDS), 40)
    assert {e.code() for e in errors} <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert answers
    # Counted, with the watched caller's own refusals (a well-behaved caller may be refused under the flood).
    assert _metric(server, "RESOURCE_EXHAUSTED") - refused_before == len(errors) + watch.refusals
    for raw in answers[:2]:
        _check_large_answer(raw, N_IDS)
    reasons = collections.Counter(re.sub(r"\d+", "N", e.details())[:60] for e in errors)
    waits = sorted(int(w) for e in errors for w in re.findall(r"waited (\d+) ms", e.details()))
    print(
        f"40 x 8 MB: {len(answers)} answered, {len(errors)} refused {dict(reasons)}, queue-budget waits {waits}, "
        f"RSS {watch.start >> 20} MB, +{(watch.peak - watch.start) >> 20} MB peak"
    )
    # What gRPC's core has taken in for calls not yet dispatched is outside the receive budget (docs/hardening.md):
    # +390 to +895 MB over a dozen runs here, so this attack is held to 1.25 GiB (still well under the 1.5 GB such an
    # attack took before) rather than RSS_GROWTH_BUDGET, with room for a slower machine.
    watch.check(5 << 28)
    assert _settles(server, watch.start) - watch.start < SETTLED_BUDGET
    _alive(server)


def test_concurrent_large_stream_messages_are_bounded_in_bytes(server: ServerProcess) -> None:
    """The same flood over 40 LookupStreams (one 8 MB message each): each message is counted in
    max_receive_bytes from when it is read until it is queued; beyond it the message is answered
    RESOURCE_EXHAUSTED in-band. The answers are right and the memory is bounded and given back."""
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.address, options=options) for _ in range(4)]
    outcomes: list[str] = []

    def one_stream(i: int) -> None:
        call = channels[i % 4].stream_stream(method_path("LookupStream"))
        replies = list(call(iter([_large_lookup(N_IDS, f"r{i}")]), timeout=60))
        assert len(replies) == 1
        reply = pb.LookupResponse.FromString(replies[0])
        assert reply.request_id == f"r{i}"
        if reply.status.code:
            outcomes.append(next(c.name for c in grpc.StatusCode if c.value[0] == reply.status.code))
        else:
            _check_large_answer(replies[0], N_IDS)
            outcomes.append("OK")

    with Watch(server, deadline_s=10.0) as watch:
        try:
            threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            for c in channels:
                c.close()
    counts = collections.Counter(outcomes)
    print(f"40 streams x 8 MB: {dict(counts)}, RSS {watch.start >> 20} MB, +{(watch.peak - watch.start) >> 20} MB peak")
    assert sum(counts.values()) == 40, counts  # every stream answered its message
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"} and counts["OK"] > 0, counts
    watch.check()
    assert _settles(server, watch.start) - watch.start < SETTLED_BUDGET
    _alive(server)


def test_slow_compressed_repeated_keys_do_not_stall_other_callers(server: ServerProcess) -> None:
    """3 requests of 8 MB of repeated keys (just under the message limit; 64 MB of them are refused by
    size), gzip-compressed to a few KB and sent at ~64 KB/s: refused
    INVALID_ARGUMENT from the key count alone, counted on the wire before the message is parsed; other callers
    are answered within their deadline (1 s here). Before: ~2.6 s of per-key Python on the event loop per request
    and +1.3 GB while the keys were parsed into strings."""
    keys_field = pb.SparseFeatures(keys=["narrow"] * (MAX_MESSAGE // 8 - 1024), batch_size=1).SerializeToString()
    body = gzip.compress(pb.LookupRequest(features=pb.SparseFeatures.FromString(keys_field)).SerializeToString())
    message = grpc_message(body, compressed=True)
    with Watch(server, deadline_s=1.0) as watch:
        socks = [raw_connection(server.address, window=1 << 20) for _ in range(3)]
        try:
            for sock in socks:
                ended_streams(sock, 1, timeout=0.3)  # acknowledges the server's SETTINGS, or it closes the connection
                sock.sendall(frame(HEADERS, END_HEADERS, call_headers(LOOKUP, gzip_encoded=True), 1))
            chunk = 16 << 10
            for offset in range(0, len(message), chunk):
                for sock in socks:
                    last = offset + chunk >= len(message)
                    sock.sendall(frame(DATA, END_STREAM if last else 0, message[offset : offset + chunk], 1))
                time.sleep(0.25)
            assert all(ended_streams(sock, 1, timeout=20) == {1} for sock in socks)
        finally:
            for sock in socks:
                sock.close()
    # Refused from a walk over the wire fields, before parsing: the message is never ~1M key strings (64 MB
    # ones took +1.3 GB for 3 at once before the message limit).
    watch.check(384 * MiB)
    print(
        f"slow gzip keys: {len(message)} bytes each, RSS +{(watch.peak - watch.start) >> 20} MB, "
        f"{watch.answers} good calls answered"
    )
    _alive(server)


def test_compressed_request_is_limited_by_its_uncompressed_size(server: ServerProcess) -> None:
    """gRPC decompresses before the handler, and max_message_bytes (8 MiB) applies to the decompressed message:
    65 MiB of zeros, 65 KB on the wire, is RESOURCE_EXHAUSTED."""
    body = pb.LookupRequest(request_id="x" * (65 * MiB)).SerializeToString()
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(LOOKUP)(body, timeout=30, compression=grpc.Compression.Gzip)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _alive(server)


def test_huge_unknown_key_name_is_not_echoed(server: ServerProcess) -> None:
    """A 7 MB unknown key name (60 MB is refused by size): INVALID_ARGUMENT with a short message.
    Before: the name echoed whole into the trailer (62.9 MB for 60 MB, +884 MB)."""
    body = pb.LookupRequest(
        features=pb.SparseFeatures(keys=["k" * (MAX_MESSAGE - MiB)], batch_size=1, lengths=b"\0\0\0\0")
    ).SerializeToString()
    with Watch(server) as watch:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(LOOKUP)(body, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) < 1024
    watch.check(384 * MiB)
    _alive(server)


_FLOOD = r"""
import resource, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0"  # and an empty SETTINGS frame
socks = []
for _ in range(count):
    s = socket.socket()
    try:
        s.connect((host, port))
        s.sendall(preface)
    except OSError:
        s.close()
        continue
    s.setblocking(False)
    socks.append(s)
print(len(socks), flush=True)
sys.stdin.readline()  # hold the connections idle until told
closed = 0
for s in socks:
    try:
        while True:
            data = s.recv(65536)
            if not data:
                closed += 1
                break
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(closed, flush=True)
"""


def test_idle_connection_flood_cannot_lock_out_callers(server: ServerProcess) -> None:
    """20,000 idle HTTP/2 connections (set up, no calls) from two processes, against a server whose open-file
    limit is the same 20,000 here: the server takes them up to its cap (its limit, raised to the hard one, less a
    reserve) and closes the rest at once, so a caller's connection keeps being answered within its deadline
    meanwhile; near the cap it closes the connections that made no call within the grace (1 s here), oldest first,
    so that a caller connecting during the flood gets in. Before: the process ran out of descriptors and valid calls
    were DEADLINE_EXCEEDED until the flood closed; then new callers were refused until the idle limit (5 min)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the server's too: it inherits this limit
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"the open-file limit ({hard}) cannot hold 10,000 connections per process")
    cap = max_connections(ConnectionsConfig()) if hard == resource.RLIM_INFINITY else hard - FD_RESERVE
    host, port = server.address.rsplit(":", 1)
    flooders = [
        subprocess.Popen(
            [sys.executable, "-c", _FLOOD, host, port, "10000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        with Watch(server) as watch:
            opened = [int(f.stdout.readline()) for f in flooders]  # type: ignore[union-attr]
            time.sleep(2)  # the server settles its accepts and closes what it is over its cap
            before = watch.answers
            time.sleep(2)
            assert watch.answers > before  # still answered while the flood is held open
            # A new caller, on a new connection, while the flood is held open: unused connections make room.
            with grpc.insecure_channel(server.address) as channel:
                call = channel.unary_unary(LOOKUP, pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString)
                request = lookup_request(["narrow"], np.array([[2]]), np.array([3, 5]))
                newcomer = embeddings_of(call(request, timeout=10, wait_for_ready=True))
            expected = pool(
                float_tables(CONFIG), ["narrow"], np.array([[2]]), np.array([3, 5]), None, ["wide", "narrow"]
            )
            np.testing.assert_allclose(newcomer, expected, rtol=1e-6)
            for f in flooders:
                f.stdin.write("\n")  # type: ignore[union-attr]
                f.stdin.flush()  # type: ignore[union-attr]
            closed = [int(f.stdout.readline()) for f in flooders]  # type: ignore[union-attr]
    finally:
        for f in flooders:
            f.kill()
            f.wait()
            f.stdin.close()  # type: ignore[union-attr]
            f.stdout.close()  # type: ignore[union-attr]
    print(
        f"idle flood: {sum(opened)} connections opened, {sum(closed)} closed by the server, RSS "
        f"{watch.start >> 20} MB, +{(watch.peak - watch.start) >> 20} MB peak, {watch.answers} calls answered"
    )
    assert sum(opened) >= 19_000
    assert sum(closed) >= sum(opened) - cap  # those over the cap (the limit less FD_RESERVE) closed at once
    watch.check()
    assert _settles(server, watch.start) - watch.start < SETTLED_BUDGET
    _alive(server)  # a new connection is taken once the flood has gone


def test_budgets_are_back_at_zero_after_the_attacks(server: ServerProcess) -> None:
    """Runs last in this module, on the server every attack above used: whatever they did, once their calls end
    every budget is back at zero."""
    deadline = time.monotonic() + 30
    while True:
        budgets = {k: v for k, v in server.metrics().items() if k.startswith("embserve_budget{")}
        assert budgets, "the server exports its budgets"
        if not any(budgets.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(budgets.values()), budgets
    _alive(server)
