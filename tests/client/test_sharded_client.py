"""The SDK's fan-out to shard servers against the router and one server of the whole model: bit for bit the
router's answers (it runs the same split and join), and so one server's table-wise and within the stated bound
row-wise, in every output type, sync and async; a shard down or on another plan fails naming the shard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embserve.client import AsyncShardedClient, Client, InvalidRequest, ServerError, ShardedClient, Unavailable
from embserve.client.sharded import read_plan
from embserve.embeddings import ModelConfig
from embserve.embeddings.plan import dump_plan, make_plan
from embserve.server.config import ServerConfig
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDTypeName
from tests.server.test_inference import random_request
from tests.server.test_sharding_router import RouterHandle, _compare, table_wise_plan
from tests.support import ServerHandle, write_model_config

Factory = Callable[..., ServerHandle]
DTYPES: dict[OutputDTypeName, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}


class Cluster:
    def __init__(self, kind: str, plan: Path, whole: ServerHandle, shards: list[ServerHandle], router: str) -> None:
        self.kind, self.plan, self.whole, self.shards, self.router = kind, plan, whole, shards, router

    @property
    def addresses(self) -> dict[int, str]:
        return {k: s.address for k, s in enumerate(self.shards)}


@pytest.fixture(params=["table_wise", "row_wise"])
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, small_config: ModelConfig, server_factory: Factory
) -> Iterator[Cluster]:
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
    yield Cluster(request.param, tmp_path / "plan.yaml", whole, shards, router.address)
    router.stop()


def _features(call: tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]) -> dict[str, Any]:
    keys, lengths, values, weights = call
    out: dict[str, Any] = {}
    at = 0
    for i, key in enumerate(keys):
        n = int(lengths[i].sum())
        part = (lengths[i], values[at : at + n]) + ((weights[at : at + n],) if weights is not None else ())
        out[key] = part
        at += n
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fan_out_equals_the_router_and_one_server(
    cluster: Cluster, small_config: ModelConfig, dtype: OutputDTypeName
) -> None:
    rng = np.random.default_rng(23)
    calls = [random_request(rng, small_config) for _ in range(20)]
    with (
        ShardedClient(cluster.plan, cluster.addresses) as fan,
        Client(cluster.router) as router,
        Client(cluster.whole.address, transport="unary") as single,
    ):
        for i, call in enumerate(calls):
            features = _features(call)
            got = fan.lookup(features, output_dtype=dtype, request_id=f"r{i}")
            via_router = router.lookup(features, output_dtype=dtype)
            want = single.lookup(features, output_dtype=dtype)
            assert got.keys == via_router.keys == want.keys and got.dims == want.dims and got.offsets == want.offsets
            assert got.dtype == want.dtype and got.model_version == via_router.model_version == want.model_version
            assert got.model_name == want.model_name and got.request_id == f"r{i}"
            assert np.array_equal(got.embeddings, via_router.embeddings)  # the router's own bits
            if got.raw is not None:
                assert via_router.raw is not None and np.array_equal(got.raw, via_router.raw)
            a, b = got.embeddings.astype(np.float64), want.embeddings.astype(np.float64)
            _compare(cluster.kind, small_config, call, a, b, DTYPES[dtype])


async def test_async_fan_out_equals_the_router(cluster: Cluster, small_config: ModelConfig) -> None:
    rng = np.random.default_rng(7)
    with Client(cluster.router, transport="unary") as router:
        async with AsyncShardedClient(str(cluster.plan), cluster.addresses, transport="unary") as fan:
            for _ in range(10):
                features = _features(random_request(rng, small_config))
                got = await fan.lookup(features, output_dtype="float16")
                want = router.lookup(features, output_dtype="float16")
                assert np.array_equal(got.embeddings, want.embeddings) and got.model_version == want.model_version
            infos = await fan.metadata()
            assert sorted(infos) == [0, 1] and all(
                i.plan_digest == read_plan(cluster.plan).digest for i in infos.values()
            )
            assert await fan.health() == {0: "SERVING", 1: "SERVING"}


def test_requests_are_checked_against_the_whole_model(cluster: Cluster) -> None:
    with ShardedClient(cluster.plan, cluster.addresses) as fan, Client(cluster.router) as router:
        for features, message in (
            ({"nope": [[1]]}, "unknown key 'nope'"),
            ({"author": [[1], [10**6]]}, "out of range for key 'author'"),
        ):
            with pytest.raises(InvalidRequest, match=message):
                fan.lookup(features)
            with pytest.raises(InvalidRequest):
                router.lookup(features)
        with pytest.raises(InvalidRequest, match="not a weighted table"):
            fan.lookup({"author": [[1]], "hashtags": [[2]]}, weights={"author": [[0.5]], "hashtags": [[1.0]]})
        assert fan.lookup({"topics": [[10**9]]}).embeddings.shape == (1, 40)  # hashed: taken mod its rows


def test_a_shard_down_fails_naming_it_and_calls_to_the_other_succeed(cluster: Cluster) -> None:
    with ShardedClient(cluster.plan, cluster.addresses, timeout=10) as fan:
        fan.lookup({"author": [[1]], "topics": [[2]]})  # reads both shards' plans
        cluster.shards[1].stop()
        for _ in range(3):  # again after the failure, when its plan is read anew
            with pytest.raises(Unavailable) as info:
                fan.lookup({"author": [[1, 2], [3]]})
            assert info.value.code == "UNAVAILABLE" and "shard 1 (" in info.value.details
            if cluster.kind == "table_wise":  # shard 0 alone holds topics
                assert fan.lookup({"topics": [[1, 2], [3]]}).embeddings.shape == (2, 40)


def test_a_shard_on_another_plan_fails_precondition_naming_it(
    tmp_path: Path, small_config: ModelConfig, server_factory: Factory
) -> None:
    model = str(write_model_config(small_config, tmp_path / "small.yaml"))
    dump_plan(table_wise_plan(small_config), tmp_path / "a.yaml")
    dump_plan(make_plan(small_config, shards=2), tmp_path / "b.yaml")
    shards = {k: server_factory(model=model, plan=str(tmp_path / "b.yaml"), shard=k).address for k in range(2)}
    with ShardedClient(tmp_path / "a.yaml", shards) as fan, pytest.raises(ServerError) as info:
        fan.lookup({"author": [[3]]})
    assert info.value.code == "FAILED_PRECONDITION"
    assert "shard 0 (" in info.value.details and "the client's plan is" in info.value.details
    with ShardedClient(tmp_path / "b.yaml", {0: shards[1], 1: shards[0]}) as swapped, pytest.raises(ServerError):
        swapped.lookup({"author": [[3]]})  # right plan, wrong shard index


def test_plans_are_read_as_the_server_reads_them(tmp_path: Path, small_config: ModelConfig) -> None:
    for plan in (table_wise_plan(small_config), make_plan(small_config, shards=3, row_wise=["author"])):
        digest = dump_plan(plan, tmp_path / "p.yaml")
        assert read_plan(tmp_path / "p.yaml").digest == digest == read_plan(plan).digest
        data = yaml.safe_load((tmp_path / "p.yaml").read_text())
        assert read_plan(data).digest == digest
    data["shards"][0]["tables"].append("extra")
    with pytest.raises(ValueError, match="does not match its content"):
        read_plan(data)
    with pytest.raises(ValueError, match="shard 2 has no address"):
        ShardedClient(tmp_path / "p.yaml", {0: "127.0.0.1:1", 1: ["127.0.0.1:2"]})
    with pytest.raises(ValueError, match="not a shard of the plan"):
        ShardedClient(tmp_path / "p.yaml", {k: "127.0.0.1:1" for k in range(4)})
