"""The router against a single server of the whole model: table-wise shards answer bit for bit, row-wise within
the stated float32 summation bound, over Lookup, LookupStream and ModelInfer, in every output type; a shard that
is down or on another plan fails the calls that touch it, naming it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from embserve.client import AsyncClient
from embserve.embeddings import ModelConfig
from embserve.embeddings.plan import ShardingPlan, ShardPlan, dump_plan, make_plan, model_digest, plan_digest
from embserve.server.config import ServerConfig
from embserve.v1 import embserve_pb2 as pb
from tests.reference import pool
from tests.server.helpers import lookup_request, stub
from tests.server.test_inference import DTYPES, random_request, triton_inputs
from tests.support import ServerHandle, float_tables, write_model_config

Factory = Callable[..., ServerHandle]
U = 2.0**-24  # float32 unit roundoff
WEIGHTED = {"hashtags"}


class RouterHandle:
    def __init__(self, config: ServerConfig) -> None:
        from embserve.server.router_app import RouterServer

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def boot() -> None:
                try:
                    box["router"] = RouterServer(config)
                    await box["router"].start()
                except BaseException as err:
                    box["error"] = err
                ready.set()

            self.loop.run_until_complete(boot())
            if "error" not in box:
                self.loop.run_forever()
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(60)
        if "error" in box:
            raise box["error"]
        self.router = box["router"]
        self.address = self.router.address

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return float(self.router.metrics.value(name, labels))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.router.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def table_wise_plan(config: ModelConfig) -> ShardingPlan:
    plan = ShardingPlan(
        model=config.name,
        model_digest=model_digest(config),
        shards=[ShardPlan(index=0, tables=["user", "topics"]), ShardPlan(index=1, tables=["author", "hashtags"])],
    )
    return plan.model_copy(update={"digest": plan_digest(plan)})


@pytest.fixture(params=["table_wise", "row_wise"])
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, small_config: ModelConfig, server_factory: Factory
) -> Iterator[tuple[str, str, str, list[ServerHandle]]]:
    """(kind, whole server's address, router's address, shards)."""
    model = str(write_model_config(small_config, tmp_path / "small.yaml"))
    plan = table_wise_plan(small_config) if request.param == "table_wise" else make_plan(small_config, shards=2)
    dump_plan(plan, tmp_path / "plan.yaml")
    whole = server_factory(model=model)
    shards = [server_factory(model=model, plan=str(tmp_path / "plan.yaml"), shard=k) for k in range(2)]
    router = RouterHandle(
        ServerConfig.model_validate(
            {
                "model": model,
                "plan": str(tmp_path / "plan.yaml"),
                "port": 0,
                "metrics_port": None,
                "router": {"shards": [f"{k}={s.address}" for k, s in enumerate(shards)]},
            }
        )
    )
    yield request.param, whole.address, router.address, shards
    router.stop()


def _decoded(response: pb.LookupResponse) -> np.ndarray:
    raw = response.embeddings
    shape = tuple(response.shape)
    if response.dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float64)
    if response.dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape).astype(np.float64)
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float64)


def _row_wise_bound(
    config: ModelConfig,
    call: tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None],
    single: np.ndarray,
    dtype: int,
) -> np.ndarray:
    """Per element: the router adds each shard's float32 partial sum; the single server sums every id in one
    order. Both are within n*u*sum|w*x| of the exact sum (n ids in the bag, u = 2^-24), so they differ by at most
    2*n*u*sum|w*x| (1% margin for the rounding of the stored rows), plus half an ulp of the output type each
    when the answer is rounded to fp16 (2^-11) or bf16 (2^-8) after the sum."""
    keys, lengths, values, weights = call
    tables = {k: np.abs(v) for k, v in float_tables(config).items()}
    rows = {t.name: t.num_embeddings for t in config.tables}
    values = values.copy()
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))]).astype(np.int64)
    for k, key in enumerate(keys):
        values[starts[k] : starts[k + 1]] %= rows[key]
    w = np.abs(weights) if weights is not None else None
    order = ["user", "author", "topics", "hashtags"]
    magnitude = pool(tables, keys, lengths, values, w, order, WEIGHTED)
    counts = pool({k: np.ones((rows[k], v.shape[1])) for k, v in tables.items()}, keys, lengths, values, None, order)
    rel = {int(pb.DTYPE_FLOAT16): 2.0**-11, int(pb.DTYPE_BFLOAT16): 2.0**-8}.get(dtype, 0.0)
    bound: np.ndarray = 2.02 * counts * U * magnitude + 2 * rel * np.abs(single) + 1e-30
    return bound


def _compare(kind: str, config: ModelConfig, call: Any, got: np.ndarray, want: np.ndarray, dtype: int) -> None:
    if kind == "table_wise":
        assert np.array_equal(got, want)
        return
    user = slice(0, 16)  # the row-wise table's columns; every other column is exact
    others = np.ones(got.shape[1], dtype=bool)
    others[user] = False
    assert np.array_equal(got[:, others], want[:, others])
    bound = _row_wise_bound(config, call, want, dtype)
    assert (np.abs(got - want)[:, user] <= bound[:, user]).all()


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_lookup_and_infer_through_the_router_equal_one_server(
    cluster: tuple[str, str, str, list[ServerHandle]], small_config: ModelConfig, datatype: str
) -> None:
    kind, whole, routed, _ = cluster
    rng = np.random.default_rng(11)
    calls = [random_request(rng, small_config) for _ in range(20)]
    dtype = DTYPES[datatype]
    params = {} if datatype == "FP32" else {"output_datatype": datatype}
    c1, single = stub(whole)
    c2, router = stub(routed)
    with c1, c2, triton.InferenceServerClient(routed) as oip:
        for call in calls:
            want = single.Lookup(lookup_request(*call, dtype=dtype))
            got = router.Lookup(lookup_request(*call, dtype=dtype))
            assert list(got.keys) == list(want.keys) and got.model_version == want.model_version
            _compare(kind, small_config, call, _decoded(got), _decoded(want), dtype)
            infer = oip.infer(small_config.name, triton_inputs(*call), parameters=params).get_response()
            assert infer.raw_output_contents[0] == got.embeddings  # ModelInfer: the router's Lookup, bit for bit


async def test_stream_through_the_router_equals_one_server(
    cluster: tuple[str, str, str, list[ServerHandle]], small_config: ModelConfig
) -> None:
    kind, whole, routed, _ = cluster
    rng = np.random.default_rng(5)
    async with AsyncClient(whole, transport="unary") as single, AsyncClient(routed, transport="stream") as router:
        for _ in range(12):
            keys, lengths, values, weights = random_request(rng, small_config)
            features = {k: _bags(lengths[i], values, lengths, i) for i, k in enumerate(keys)}
            w = None
            if weights is not None:
                w = {k: _bags(lengths[i], weights, lengths, i) for i, k in enumerate(keys) if k in WEIGHTED}
            want = await single.lookup(features, weights=w)
            got = await router.lookup(features, weights=w)
            call = (keys, lengths, values, weights)
            _compare(kind, small_config, call, got.embeddings.astype(np.float64), want.embeddings.astype(np.float64), 0)


def _bags(lengths: np.ndarray, flat: np.ndarray, all_lengths: np.ndarray, k: int) -> list[list[Any]]:
    start = int(all_lengths[:k].sum())
    out, at = [], start
    for n in lengths.tolist():
        out.append(flat[at : at + n].tolist())
        at += n
    return out


def test_metadata_of_the_router_is_the_whole_model(cluster: tuple[str, str, str, list[ServerHandle]]) -> None:
    _, whole, routed, _ = cluster
    c1, single = stub(whole)
    c2, router = stub(routed)
    with c1, c2:
        a = single.GetModelMetadata(pb.GetModelMetadataRequest())
        b = router.GetModelMetadata(pb.GetModelMetadataRequest())
    assert list(a.keys) == list(b.keys) and a.output_dim == b.output_dim
    assert [t.num_embeddings for t in a.tables] == [t.num_embeddings for t in b.tables]
    assert b.plan_digest.startswith("sha256:") and b.shard_count == 0 and b.engine == "router"


def test_a_shard_down_fails_its_calls_naming_it_and_others_succeed(
    cluster: tuple[str, str, str, list[ServerHandle]], small_config: ModelConfig
) -> None:
    kind, _, routed, shards = cluster
    shards[1].stop()
    lengths = np.array([[2, 1]], dtype=np.int32)
    channel, router = stub(routed)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            router.Lookup(lookup_request(["author"], lengths, np.array([1, 2, 3])), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 1" in (info.value.details() or "")
        if kind == "table_wise":  # shard 0 alone holds topics: its calls keep succeeding
            ok = router.Lookup(lookup_request(["topics"], lengths, np.array([1, 2, 3])), timeout=10)
            assert ok.shape == [2, 40]


def test_a_shard_on_another_plan_fails_precondition(
    tmp_path: Path, small_config: ModelConfig, server_factory: Factory
) -> None:
    model = str(write_model_config(small_config, tmp_path / "small.yaml"))
    dump_plan(table_wise_plan(small_config), tmp_path / "a.yaml")
    dump_plan(make_plan(small_config, shards=2), tmp_path / "b.yaml")
    shards = [server_factory(model=model, plan=str(tmp_path / "b.yaml"), shard=k) for k in range(2)]
    router = RouterHandle(
        ServerConfig.model_validate(
            {
                "model": model,
                "plan": str(tmp_path / "a.yaml"),
                "port": 0,
                "metrics_port": None,
                "router": {"shards": [f"{k}={s.address}" for k, s in enumerate(shards)]},
            }
        )
    )
    try:
        channel, s = stub(router.address)
        with channel, pytest.raises(grpc.RpcError) as info:
            s.Lookup(lookup_request(["author"], np.array([[1]], dtype=np.int32), np.array([3])), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "shard 1" in (info.value.details() or "") and "the router's plan is" in (info.value.details() or "")
        assert router.metric("embserve_shard_errors_total", {"shard": "1", "code": "FAILED_PRECONDITION"}) == 1
    finally:
        router.stop()
