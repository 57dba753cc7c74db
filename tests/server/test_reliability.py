"""Reliability: hot reload under traffic, failed reloads, overload at 3x capacity, cancellation mid-batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from embserve.client import AsyncClient, Client, LookupResult, Overloaded
from embserve.embeddings import (
    LargeEmbeddings,
    ModelConfig,
    ServingModel,
    build_serving_model,
    init_weights,
    save_checkpoint,
)
from embserve.oip import wire as oip
from embserve.server.app import ReloadFailed
from tests.reference import assert_pooled_close, pool
from tests.server.helpers import embeddings_of, lookup_request, stub, wrapped
from tests.support import ServerHandle, float_tables, wait_until, write_model_config

Factory = Callable[..., ServerHandle]
FEATURES = {"user": [[1, 2], [3], [999]], "topics": [[5], [], [250]]}


def _expected(tables: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    lengths = np.array([[2, 1, 1], [1, 0, 1]], np.int32)
    values = np.array([1, 2, 3, 999, 5, 250 % 200])
    return pool(tables, ["user", "topics"], lengths, values, None, keys)


def _assert_user_rows(config: ModelConfig, tables: dict[str, np.ndarray], ids: np.ndarray, response: object) -> None:
    """A response to examples of one `user` id each, `ids` (other bags empty), against the numpy reference."""
    keys = list(response.keys)  # type: ignore[attr-defined]
    expected = pool(tables, ["user"], np.ones((1, len(ids)), np.int32), ids, None, keys)
    dims = {t.name: t.embedding_dim for t in config.tables}
    assert_pooled_close(dims, {"author"}, keys, embeddings_of(response), expected)  # type: ignore[arg-type]


def _checkpoint(config: ModelConfig, seed: int, path: Path) -> Path:
    model = LargeEmbeddings(config)
    init_weights(model, seed)
    save_checkpoint(model, path)
    return path


def test_hot_reload_under_traffic_fails_no_call(
    tmp_path: Path, server_factory: Factory, small_config: ModelConfig
) -> None:
    a = _checkpoint(small_config, 1, tmp_path / "a.safetensors")
    b = _checkpoint(small_config, 2, tmp_path / "b.safetensors")
    model = build_serving_model(small_config, checkpoint=a)
    config_path = write_model_config(small_config, tmp_path / "small.yaml")
    handle = server_factory(model, model=str(config_path), checkpoint=str(a))
    results: list[LookupResult] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def traffic() -> None:
        with Client(handle.address, retry=None) as client:
            while not stop.is_set():
                try:
                    results.append(client.lookup(FEATURES))
                except Exception as err:  # any failure is a test failure below
                    errors.append(err)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        handle.call(handle.server.reload(str(b)))
        time.sleep(0.3)
        handle.call(handle.server.reload(str(a), version="a-again"))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    versions = [r.model_version for r in results]
    va = model.version
    assert versions[0] == va and versions[-1] == "a-again"
    vb = next(v for v in versions if v not in (va, "a-again"))
    assert vb.startswith("b-")
    refs = {
        va: float_tables(small_config, 1),
        vb: float_tables(small_config, 2),
        "a-again": float_tables(small_config, 1),
    }
    for r in results:  # every response computed wholly by the version it names
        np.testing.assert_allclose(r.embeddings, _expected(refs[r.model_version], list(r.keys)), atol=2e-3, rtol=1e-3)
    assert handle.metric("embserve_model_reloads_total", {"outcome": "ok"}) == 2


def test_failed_reload_keeps_the_old_version(
    tmp_path: Path, server_factory: Factory, small_config: ModelConfig
) -> None:
    a = _checkpoint(small_config, 1, tmp_path / "a.safetensors")
    config_path = write_model_config(small_config, tmp_path / "small.yaml")
    handle = server_factory(build_serving_model(small_config, checkpoint=a), model=str(config_path), checkpoint=str(a))
    with Client(handle.address) as client:
        before = client.lookup(FEATURES)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a checkpoint")
        with pytest.raises(ReloadFailed, match="cannot read checkpoint"):
            handle.call(handle.server.reload(str(bad)))
        wrong_shape = tmp_path / "shape.pt"
        import torch

        torch.save({"ebc.embedding_bags.user.weight": torch.zeros(3, 3)}, wrong_shape)
        with pytest.raises(ReloadFailed, match="table 'user'"):
            handle.call(handle.server.reload(str(wrong_shape)))
        after = client.lookup(FEATURES)
    assert after.model_version == before.model_version
    np.testing.assert_array_equal(after.embeddings, before.embeddings)
    assert handle.metric("embserve_model_reloads_total", {"outcome": "failed"}) == 2


def test_cancel_mid_batch_does_not_disturb_others(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig, small_tables: dict[str, np.ndarray]
) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.3), batching={"max_queue_wait_ms": 10_000})
    channel, s = stub(handle.address)
    with channel:
        blocker = s.Lookup.future(lookup_request(["user"], np.ones((1, 1), np.int32), np.arange(1)))
        time.sleep(0.1)
        batch = [
            s.Lookup.future(lookup_request(["user"], np.ones((1, 2), np.int32), np.arange(2) + i)) for i in range(6)
        ]
        time.sleep(0.35)  # the six now share one running batch
        batch[2].cancel()
        batch[4].cancel()
        for i, f in enumerate(batch):
            if i in (2, 4):
                assert f.cancelled()
            else:
                _assert_user_rows(small_config, small_tables, np.arange(2) + i, f.result(timeout=10))
        _assert_user_rows(small_config, small_tables, np.arange(1), blocker.result(timeout=10))
        after = s.Lookup(lookup_request(["user"], np.ones((1, 1), np.int32), np.arange(1) + 7), timeout=10)
        _assert_user_rows(small_config, small_tables, np.array([7]), after)


@pytest.mark.slow
def test_overload_at_three_times_capacity(
    server_factory: Factory, small_serving: ServingModel, small_config: ModelConfig
) -> None:
    # Capacity is pinned by a 20 ms forward of at most 8 examples: 400 examples/s. Send 1,200/s for 2 s.
    handle = server_factory(
        wrapped(small_serving, delay_s=0.02),
        batching={"max_batch_size": 8, "max_queue_size": 32, "max_queue_wait_ms": 100},
    )
    tables = float_tables(small_config)

    async def load(rate: float, seconds: float) -> list[object]:
        async with AsyncClient(handle.address, retry=None, timeout=5) as client:
            await client.metadata()
            tasks = []
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                tasks.append(asyncio.ensure_future(client.lookup(FEATURES)))
            return list(await asyncio.gather(*tasks, return_exceptions=True))

    outcomes = asyncio.run(load(400.0, 2.0))  # 3 examples per call: 1,200 examples/s
    ok = [o for o in outcomes if isinstance(o, LookupResult)]
    rejected = [o for o in outcomes if isinstance(o, Overloaded)]
    others = [o for o in outcomes if not isinstance(o, (LookupResult, Overloaded))]
    assert not others, others[:3]
    assert ok and rejected
    expected = _expected(tables, list(ok[0].keys))
    for r in ok:
        np.testing.assert_allclose(r.embeddings, expected, atol=2e-3, rtol=1e-3)
    # Accepted calls never waited past the queue budget: they were computed, or answered RESOURCE_EXHAUSTED.
    waits = handle.metric("embserve_queue_wait_seconds_count")
    assert waits >= len(ok)  # every computed call observed its wait (0 == 0 would prove nothing)
    assert handle.metric("embserve_queue_wait_seconds_bucket", {"le": "0.25"}) == waits
    assert handle.metric("embserve_queue_examples") <= 32
    # Load gone: served normally again.
    after = asyncio.run(load(20.0, 0.5))
    assert all(isinstance(o, LookupResult) for o in after)


def test_reload_updates_metadata_and_the_model_info_metric(
    tmp_path: Path, server_factory: Factory, small_config: ModelConfig
) -> None:
    a = _checkpoint(small_config, 1, tmp_path / "a.safetensors")
    b = _checkpoint(small_config, 2, tmp_path / "b.safetensors")
    config_path = write_model_config(small_config, tmp_path / "small.yaml")
    model = build_serving_model(small_config, checkpoint=a)
    handle = server_factory(model, model=str(config_path), checkpoint=str(a))

    def info(version: str) -> float:
        labels = {"name": "small", "version": version, "engine": "fused", "device": "cpu"}
        return handle.metric("embserve_model_info", labels)

    with Client(handle.address) as client:
        assert client.metadata().version == model.version and info(model.version) == 1
        handle.call(handle.server.reload(str(b), version="v2"))
        assert client.metadata().version == "v2"
        assert client.lookup(FEATURES).model_version == "v2"
    assert info("v2") == 1 and info(model.version) == 0


def test_every_computed_request_observes_its_queue_wait(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(wrapped(small_serving, delay_s=0.01), batching={"max_batch_size": 8})
    before = handle.metric("embserve_queue_wait_seconds_count")
    channel, s = stub(handle.address)
    with channel:
        futures = [
            s.Lookup.future(lookup_request(["user"], np.ones((1, 2), np.int32), np.arange(2))) for _ in range(25)
        ]
        for f in futures:
            f.result(timeout=30)
    assert handle.metric("embserve_queue_wait_seconds_count") - before == 25
    assert handle.metric("embserve_queue_wait_seconds_bucket", {"le": "+Inf"}) - before == 25


def _model_infer(address: str, model: str, user_ids: list[int], version: str = "") -> tuple[str, np.ndarray]:
    """A ModelInfer of one `user` id per example; returns the version named and the rows."""
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    lengths = np.ones(len(user_ids), "<i4")
    values = np.array(user_ids, "<i8")
    request.inputs.add(name=oip.input_name("user", "lengths"), datatype="INT32", shape=[lengths.size])
    request.inputs.add(name=oip.input_name("user", "values"), datatype="INT64", shape=[values.size])
    request.raw_input_contents.extend([lengths.tobytes(), values.tobytes()])
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(oip.MODEL_INFER_METHOD)(request.SerializeToString(), timeout=60)
    response = oip.ModelInferResponse.FromString(raw)
    rows = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(response.outputs[0].shape))
    return response.model_version, rows


def test_model_infer_names_the_version_that_computed_it(
    tmp_path: Path, server_factory: Factory, small_config: ModelConfig
) -> None:
    # A ModelInfer decoded while one version serves and computed after a reload is named by the version that
    # computed its rows: the reload lands while it waits behind a slow batch. One that asked for the old version
    # by name is refused NOT_FOUND rather than answered by another.
    a = _checkpoint(small_config, 1, tmp_path / "a.safetensors")
    b = _checkpoint(small_config, 2, tmp_path / "b.safetensors")
    slow = wrapped(build_serving_model(small_config, checkpoint=a), delay_s=3.0)
    config_path = write_model_config(small_config, tmp_path / "small.yaml")
    handle = server_factory(slow, model=str(config_path), checkpoint=str(a))
    va = slow.version
    with concurrent.futures.ThreadPoolExecutor(2) as pool_:
        ahead = pool_.submit(_model_infer, handle.address, "small", [1])
        wait_until(lambda: getattr(slow.module, "calls") == 1, what="the slow batch running")
        queued = pool_.submit(_model_infer, handle.address, "small", [5, 6])
        named = pool_.submit(_model_infer, handle.address, "small", [5], va)  # names the version serving now
        time.sleep(0.2)  # decoded and queued behind the slow batch
        new = handle.call(handle.server.reload(str(b)))
        assert ahead.result(60)[0] == va
        version, rows = queued.result(60)
        with pytest.raises(grpc.RpcError) as refused:
            named.result(60)
    assert version == new.version != va
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert va in refused.value.details() and new.version in refused.value.details()
    keys = list(new.keys)
    ids = np.array([5, 6])
    expected = pool(float_tables(small_config, 2), ["user"], np.ones((1, 2), np.int32), ids, None, keys)
    np.testing.assert_allclose(rows, expected, rtol=1e-6)
    later_version, _ = _model_infer(handle.address, "small", [7])
    assert later_version == new.version
