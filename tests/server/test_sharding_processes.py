"""Shard faults with real processes: two shard servers and a router on loopback, under load from client threads
(through the router and fanning out with the SDK). A shard killed with SIGKILL fails the calls that touch it,
naming it, while calls that touch only the other shard keep succeeding; restarted on its port, it serves again.
A rolling reload (SIGHUP each shard in turn) fails no call."""

from __future__ import annotations

import collections
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from embserve.benchmarks.cluster import Cluster
from embserve.client import Client, EmbserveError, OutputDTypeName, ShardedClient, Unavailable
from embserve.embeddings import LargeEmbeddings, init_weights, save_checkpoint
from embserve.embeddings.plan import dump_plan
from embserve.server.config import ServerConfig
from tests.server.test_sharding_router import table_wise_plan
from tests.support import make_config, wait_until, write_model_config

# Shard 0 holds user and topics, shard 1 author and hashtags (table_wise_plan).
ONLY_SHARD_0 = {"user": [[1, 2], [3]], "topics": [[4], []]}
BOTH_SHARDS = {"user": [[1], [2]], "author": [[5, 6], [7]]}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    config = make_config()
    model = write_model_config(config, tmp_path / "small.yaml")
    module = LargeEmbeddings(config)
    init_weights(module, 4)
    save_checkpoint(module, tmp_path / "w.safetensors")
    dump_plan(table_wise_plan(config), tmp_path / "plan.yaml")
    shard_args = ["--checkpoint", str(tmp_path / "w.safetensors"), "--grace-period", "2"]
    with Cluster(model, tmp_path / "plan.yaml", shard_args=shard_args, router_args=["--grace-period", "2"]) as c:
        yield c


class Load:
    """Client threads calling in a loop, through the router and through the SDK's fan-out, counting outcomes per
    (path, features) and keeping the errors."""

    def __init__(self, cluster: Cluster, threads: int = 2) -> None:
        self.ok: collections.Counter[str] = collections.Counter()
        self.errors: dict[str, list[EmbserveError]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(make, name), daemon=True)
            for make, name in [
                (lambda: Client(cluster.router_address, timeout=10), "router"),
                (lambda: ShardedClient(cluster.plan, cluster.shard_addresses, timeout=10), "sdk"),
            ]
            for _ in range(threads)
        ]

    def _run(self, make: Callable[[], Client | ShardedClient], path: str) -> None:
        with make() as client:
            while not self._stop.is_set():
                for what, features in (("shard0", ONLY_SHARD_0), ("both", BOTH_SHARDS)):
                    try:
                        client.lookup(features)
                    except EmbserveError as err:
                        with self._lock:
                            self.errors[f"{path}/{what}"].append(err)
                        continue
                    with self._lock:
                        self.ok[f"{path}/{what}"] += 1

    def counts(self) -> tuple[collections.Counter[str], dict[str, int]]:
        with self._lock:
            return collections.Counter(self.ok), {k: len(v) for k, v in self.errors.items()}

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _grew(load: Load, key: str, by: int, errors: bool = False) -> Callable[[], bool]:
    before = load.counts()[1 if errors else 0].get(key, 0)
    return lambda: load.counts()[1 if errors else 0].get(key, 0) >= before + by


@pytest.mark.slow
def test_a_killed_shard_fails_its_calls_naming_it_and_serves_again_once_restarted(cluster: Cluster) -> None:
    with Load(cluster) as load:
        for key in ("router/both", "sdk/both"):
            wait_until(_grew(load, key, 20), timeout=60, what=f"{key}: calls succeeding")
        cluster.kill_shard(1)
        for key in ("router/both", "sdk/both"):
            wait_until(_grew(load, key, 10, errors=True), timeout=60, what=f"{key}: calls failing")
        for key in ("router/shard0", "sdk/shard0"):  # shard 0 alone keeps answering
            wait_until(_grew(load, key, 20), timeout=60, what=f"{key}: calls succeeding without shard 1")
        cluster.restart_shard(1)
        for key in ("router/both", "sdk/both"):
            wait_until(_grew(load, key, 20), timeout=120, what=f"{key}: calls succeeding after the restart")
    assert not load.errors.get("router/shard0") and not load.errors.get("sdk/shard0"), load.errors
    for key in ("router/both", "sdk/both"):
        for err in load.errors[key]:
            assert isinstance(err, Unavailable) and "shard 1 (" in err.details, f"{key}: {err!r}"


@pytest.mark.slow
def test_a_rolling_reload_across_shards_fails_no_call(cluster: Cluster) -> None:
    with Load(cluster) as load:
        wait_until(_grew(load, "router/both", 20), timeout=60, what="calls succeeding")
        for k, shard in cluster.shards.items():
            shard.signal(signal.SIGHUP)
            shard.logs.wait("reloaded", timeout=120)
            for key in ("router/both", "sdk/both"):
                wait_until(_grew(load, key, 10), timeout=60, what=f"{key}: calls after shard {k}'s reload")
    ok, errors = load.counts()
    assert not errors, {k: [repr(e) for e in v[:3]] for k, v in load.errors.items()}
    assert all(ok[k] > 0 for k in ("router/shard0", "router/both", "sdk/shard0", "sdk/both"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_processes_answer_as_one_server_through_the_router_and_the_sdk(
    cluster: Cluster, tmp_path: Path, dtype: OutputDTypeName
) -> None:
    """Random weighted and unweighted features, keys left out, over unary and stream transports: the router's and
    the fan-out's answers equal one in-process server's over the same checkpoint bit for bit (table-wise plan)."""
    from embserve.embeddings import build_serving_model
    from tests.support import start_server

    config = make_config()
    single = start_server(
        ServerConfig.model_validate({"port": 0, "metrics_port": None}),
        build_serving_model(config, checkpoint=tmp_path / "w.safetensors"),
    )
    rows = {t.name: t.num_embeddings for t in config.tables}
    rng = np.random.default_rng(11)
    try:
        with Client(single.address) as one, ShardedClient(cluster.plan, cluster.shard_addresses) as sdk:
            routers = [Client(cluster.router_address, transport=t) for t in ("unary", "stream")]
            for _ in range(8):  # topics left out: zero columns
                ids = {
                    k: [rng.integers(0, rows[k], int(rng.integers(0, 6))).tolist() for _ in range(5)]
                    for k in ("user", "author", "hashtags")
                }
                weights = {"hashtags": [rng.uniform(0.5, 2, len(bag)).tolist() for bag in ids["hashtags"]]}
                want = one.lookup(ids, weights=weights, output_dtype=dtype)
                clients: list[Client | ShardedClient] = [*routers, sdk]
                for client in clients:
                    got = client.lookup(ids, weights=weights, output_dtype=dtype)
                    assert got.keys == want.keys
                    np.testing.assert_array_equal(got.embeddings, want.embeddings)
            for r in routers:
                r.close()
    finally:
        single.stop()
