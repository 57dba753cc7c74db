"""A real server on an ephemeral port: batching correctness, validation isolation, overload, deadlines, health."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from embserve.embeddings import ModelConfig, ServingModel
from embserve.v1 import embserve_pb2 as pb
from tests.reference import assert_pooled_close, pool, random_features
from tests.server.helpers import embeddings_of, lookup_request, stub, wrapped
from tests.support import ServerHandle

Factory = Callable[..., ServerHandle]


def _check(
    config: ModelConfig,
    tables: dict[str, np.ndarray],
    keys: list[str],
    lengths: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray | None,
    response: pb.LookupResponse,
) -> None:
    out_keys = list(response.keys)
    dims = {t.name: t.embedding_dim for t in config.tables}
    rows = {t.name: t.num_embeddings for t in config.tables}
    hashed = {t.name for t in config.tables if t.id_policy.value == "hash"}
    # The reference applies the hash policy itself: id mod rows.
    key_of = np.repeat(np.array(keys, dtype=object), lengths.sum(axis=1)) if keys else np.array([], dtype=object)
    ref_values = np.array([v % rows[k] if k in hashed else v for v, k in zip(values.tolist(), key_of)], dtype=np.int64)
    weighted = {t.name for t in config.tables if t.weighted}
    expected = pool(tables, keys, lengths, ref_values, weights, out_keys, weighted_keys=weighted)
    fp16 = {t.name for t in config.tables if t.data_type.value == "fp16"}
    assert_pooled_close(dims, fp16, out_keys, embeddings_of(response), expected)


def _random_request(
    rng: np.random.Generator, config: ModelConfig
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    rows = {t.name: t.num_embeddings for t in config.tables}
    keys = list(rng.permutation(list(rows))[: rng.integers(1, len(rows) + 1)])
    if "topics" in keys and rng.random() < 0.5:
        rows = {**rows, "topics": rows["topics"] * 3}  # ids past the end: the hash policy maps them into range
    batch = int(rng.integers(1, 40))
    keys, lengths, values, _ = random_features(rng, rows, batch, keys=keys, max_len=int(rng.integers(0, 51)))
    weights = None
    if "hashtags" in keys and rng.random() < 0.7:
        key_of = np.repeat(np.array(keys), lengths.sum(axis=1))
        weights = np.where(key_of == "hashtags", rng.uniform(0.1, 3.0, values.size), 1.0).astype(np.float32)
    return keys, lengths, values, weights


@pytest.mark.parametrize(("inflight", "policy"), [(1, "eager"), (2, "eager"), (2, "wait")])
def test_concurrent_callers_each_get_their_own_rows(
    server_factory: Factory,
    small_serving: ServingModel,
    small_config: ModelConfig,
    small_tables: dict[str, np.ndarray],
    inflight: int,
    policy: str,
) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.01),
        batching={"max_batch_size": 256, "max_inflight_batches": inflight, "policy": policy},
    )
    rng = np.random.default_rng(0)
    calls = [_random_request(rng, small_config) for _ in range(120)]
    channel, s = stub(handle.address)
    with channel:
        futures = [s.Lookup.future(lookup_request(*c)) for c in calls]
        responses = [f.result(timeout=60) for f in futures]
    for call, response in zip(calls, responses):
        assert response.model_name == "small" and response.model_version == small_serving.version
        assert list(response.keys) == list(small_serving.keys)
        _check(small_config, small_tables, *call, response)
    batches = handle.metric("embserve_batches_total")
    assert 0 < batches < len(calls), f"{batches} forwards for {len(calls)} calls: no batching happened"
    assert handle.metric("embserve_batch_requests_sum") == len(calls)
    assert handle.metric("embserve_examples_total") == sum(c[1].shape[1] for c in calls)
    assert handle.metric("embserve_requests_total", {"method": "Lookup", "code": "OK"}) == len(calls)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 `x`, rounded to nearest, ties to even (numpy has no bfloat16)."""
    bits = x.astype("<f4").view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_output_dtypes(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    lengths = np.array([[1, 2, 0, 3]], dtype=np.int32)
    values = np.array([5, 6, 7, 8, 9, 10])
    channel, s = stub(handle.address)
    with channel:
        exact = embeddings_of(s.Lookup(lookup_request(["user"], lengths, values)))
        half = s.Lookup(lookup_request(["user"], lengths, values, dtype=pb.DTYPE_FLOAT16))
        bf = s.Lookup(lookup_request(["user"], lengths, values, dtype=pb.DTYPE_BFLOAT16))
    assert half.dtype == pb.DTYPE_FLOAT16 and bf.dtype == pb.DTYPE_BFLOAT16
    # The correctly rounded float32 result, bit for bit: truncating would differ in about half the elements.
    np.testing.assert_array_equal(np.frombuffer(half.embeddings, "<f2").reshape(exact.shape), exact.astype(np.float16))
    np.testing.assert_array_equal(np.frombuffer(bf.embeddings, "<u2").reshape(exact.shape), _bf16_round(exact))


INVALID: list[tuple[pb.LookupRequest, str]] = [
    (lookup_request(["bogus"], np.zeros((1, 2)), np.zeros(0)), "unknown key 'bogus'"),
    (lookup_request(["user", "user"], np.ones((2, 1)), np.ones(2)), "duplicate key 'user'"),
    (lookup_request(["user"], np.array([[5]]), np.ones(2)), r"sum\(lengths\) = 5"),
    (lookup_request(["user"], np.array([[1]]), np.array([1000])), "out of range for key 'user'"),
    (lookup_request(["user"], np.array([[1]]), np.array([-1])), "negative id -1"),
    (lookup_request(["hashtags"], np.array([[1]]), np.array([1]), np.array([np.nan])), "non-finite weight"),
    (lookup_request(["user"], np.array([[1]]), np.array([1]), np.array([3.0])), "not a weighted table"),
    (pb.LookupRequest(features=pb.SparseFeatures(keys=["user"], batch_size=1, lengths=b"\x01")), "not a multiple of 4"),
    (pb.LookupRequest(features=pb.SparseFeatures(batch_size=0)), "batch_size must be > 0"),
]


def test_invalid_requests_fail_alone_while_valid_callers_succeed(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.005))
    rng = np.random.default_rng(1)
    valid = [_random_request(rng, small_config) for _ in range(40)]
    channel, s = stub(handle.address)
    with channel:
        futures: list[tuple[str, Any, Any]] = []
        for i in range(40):
            futures.append(("valid", valid[i], s.Lookup.future(lookup_request(*valid[i]))))
            bad, message = INVALID[i % len(INVALID)]
            futures.append(("invalid", message, s.Lookup.future(bad)))
        for kind, payload, fut in futures:
            if kind == "valid":
                keys, lengths, values, weights = payload
                _check(small_config, small_tables, keys, lengths, values, weights, fut.result(timeout=60))
            else:
                with pytest.raises(grpc.RpcError) as info:
                    fut.result(timeout=60)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert re.search(payload, info.value.details()), info.value.details()
        # Garbage bytes for the method itself: a defined status, and the server keeps serving.
        raw = channel.unary_unary("/embserve.v1.EmbeddingService/Lookup")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xfe\x00garbage\x12\x99", timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid embserve.v1.LookupRequest" in info.value.details()
        _check(small_config, small_tables, *valid[0], s.Lookup(lookup_request(*valid[0]), timeout=10))


def test_overload_is_rejected_quickly_and_accepted_calls_are_correct(
    server_factory: Factory, small_serving: ServingModel
) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.05),
        batching={"max_batch_size": 8, "max_queue_size": 16, "max_queue_wait_ms": 10_000},
    )
    lengths = np.ones((1, 4), dtype=np.int32)
    channel, s = stub(handle.address)
    with channel:
        expected = embeddings_of(s.Lookup(lookup_request(["user"], lengths, np.arange(4))))
        futures = [s.Lookup.future(lookup_request(["user"], lengths, np.arange(4))) for _ in range(100)]
        codes = []
        for f in futures:
            try:
                np.testing.assert_array_equal(embeddings_of(f.result(timeout=60)), expected)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                assert "queue full" in err.details()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert handle.metric("embserve_dropped_total", {"reason": "queue_full"}) == codes.count(
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_expired_or_cancelled_calls_are_never_computed(
    server_factory: Factory, small_serving: ServingModel, how: str
) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.3), batching={"max_inflight_batches": 1, "max_queue_wait_ms": 10_000}
    )
    channel, s = stub(handle.address)
    with channel:
        blocker = s.Lookup.future(lookup_request(["user"], np.ones((1, 2), np.int32), np.arange(2)))
        time.sleep(0.1)  # the blocker's batch is computing now
        victim_req = lookup_request(["user"], np.ones((1, 7), np.int32), np.arange(7))
        if how == "deadline":
            victim = s.Lookup.future(victim_req, timeout=0.05)
            with pytest.raises(grpc.RpcError) as info:
                victim.result(timeout=10)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            victim = s.Lookup.future(victim_req)
            time.sleep(0.05)
            victim.cancel()
        blocker.result(timeout=10)
        time.sleep(0.5)  # past the blocker's forward: the victim would have run by now
        after = s.Lookup(lookup_request(["user"], np.ones((1, 3), np.int32), np.arange(3)), timeout=10)
        assert after.shape[0] == 3
    # Examples computed: the blocker's 2 and the last call's 3, never the victim's 7.
    assert handle.metric("embserve_batch_examples_sum") == 5
    assert (
        handle.metric("embserve_dropped_total", {"reason": "cancelled"})
        + handle.metric("embserve_dropped_total", {"reason": "deadline"})
        == 1
    )


def test_failing_forward_fails_only_its_batch(server_factory: Factory, small_serving: ServingModel) -> None:
    model = wrapped(small_serving, fail_when=lambda kjt: int(kjt.values().numel()) == 13)
    handle = server_factory(model, batching={"enabled": False})
    channel, s = stub(handle.address)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            s.Lookup(lookup_request(["user"], np.array([[13]], np.int32), np.arange(13)), timeout=10)
        assert info.value.code() is grpc.StatusCode.INTERNAL and "injected fault" in info.value.details()
        ok = s.Lookup(lookup_request(["user"], np.array([[2]], np.int32), np.arange(2)), timeout=10)
        assert ok.shape[0] == 1


def test_metadata_reports_tables_dtypes_and_bytes(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    channel, s = stub(handle.address)
    with channel:
        meta = s.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=10)
    assert meta.name == "small" and meta.version == small_serving.version and meta.engine == "fused"
    assert list(meta.keys) == list(small_serving.keys) and meta.output_dim == 16 + 8 + 12 + 4
    by_name = {t.name: t for t in meta.tables}
    assert by_name["user"].weight_bytes == 1000 * 16 * 4 and by_name["user"].serving_dtype == "fp32"
    assert by_name["author"].serving_dtype == "fp16" and by_name["author"].weight_bytes == 500 * 8 * 2
    assert by_name["hashtags"].weighted and by_name["topics"].id_policy == "hash"
    assert list(by_name["user"].feature_names) == ["user"]


def test_health_reflection_and_metrics_endpoint(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving, metrics_port=0)
    channel = grpc.insecure_channel(handle.address)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embserve.v1.EmbeddingService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"embserve.v1.EmbeddingService", "grpc.health.v1.Health"} <= services
        lookup = db.FindFileContainingSymbol("embserve.v1.EmbeddingService")
        assert lookup.package == "embserve.v1"
    port = handle.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "embserve_requests_total",
        "embserve_queue_wait_seconds",
        "embserve_batch_examples",
        "embserve_forward_seconds",
        "embserve_request_seconds",
        "embserve_queue_examples",
        "embserve_model_info",
    ):
        assert name in text, name
    assert f'version="{small_serving.version}"' in text


def test_drain_refuses_new_calls_and_finishes_accepted_ones(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    handle = server_factory(
        wrapped(small_serving, delay_s=0.2), batching={"max_inflight_batches": 1, "max_queue_wait_ms": 10_000}
    )
    channel, s = stub(handle.address)
    health = health_pb2_grpc.HealthStub(channel)
    with channel:
        accepted = [
            s.Lookup.future(lookup_request(["user"], np.ones((1, 2), np.int32), np.arange(2))) for _ in range(3)
        ]
        time.sleep(0.1)
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 10.0})
        stopper.start()
        time.sleep(0.05)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as info:
            s.Lookup(lookup_request(["user"], np.ones((1, 1), np.int32), np.arange(1)), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        for f in accepted:  # finished, with the right values
            _check(
                small_config,
                small_tables,
                ["user"],
                np.ones((1, 2), np.int32),
                np.arange(2),
                None,
                f.result(timeout=30),
            )
        stopper.join(30)
