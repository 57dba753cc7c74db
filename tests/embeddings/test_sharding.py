"""torchrec table sharding over two devices (here: CPU shards) answers exactly as the unsharded fused module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import ConfigError, build_serving_model
from tests.reference import random_features
from tests.support import ServerHandle, make_config

TABLES = [
    {"name": "user", "num_embeddings": 1000, "embedding_dim": 16, "serving_dtype": "int8"},
    {"name": "author", "num_embeddings": 700, "embedding_dim": 32, "serving_dtype": "int8", "data_type": "fp16"},
    {"name": "topics", "num_embeddings": 300, "embedding_dim": 8, "serving_dtype": "int4"},
    {"name": "hashtags", "num_embeddings": 500, "embedding_dim": 16, "serving_dtype": "int8", "weighted": True},
]


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sharded_forward_equals_unsharded(sharding: str) -> None:
    config = make_config(TABLES)
    plain = build_serving_model(config)
    sharded = build_serving_model(config, shard_devices=2, sharding=sharding)
    assert sharded.keys == plain.keys and sharded.weight_bytes == plain.weight_bytes
    rng = np.random.default_rng(1)
    rows = {t.name: t.num_embeddings for t in config.tables}
    keys, lengths, values, weights = random_features(rng, rows, 37, keys=list(plain.keys), weighted=True)
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        weights=torch.from_numpy(weights) if weights is not None else None,
    )
    got, want = sharded.forward(kjt).numpy(), plain.forward(kjt).numpy()
    if sharding == "table_wise":
        np.testing.assert_array_equal(got, want)
    else:  # a bag's partial sums from two shards are added in another order: float rounding only
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_sharding_needs_quantized_tables_and_the_fused_engine() -> None:
    with pytest.raises(ConfigError, match=r"serving_dtype int8 or int4 for every table .* \['plain'\]"):
        build_serving_model(
            make_config([*TABLES[:1], {"name": "plain", "num_embeddings": 10, "embedding_dim": 4}]), shard_devices=2
        )
    with pytest.raises(ConfigError, match="sharding needs the fused engine"):
        build_serving_model(make_config(TABLES), shard_devices=2, engine="eager")


def test_server_serves_a_sharded_model(tmp_path: Path, server_factory: Callable[..., ServerHandle]) -> None:
    from embserve.client import Client
    from tests.support import write_model_config

    config = make_config(TABLES)
    path = write_model_config(config, tmp_path / "sharded.yaml")
    plain = server_factory(build_serving_model(config))
    sharded = server_factory(model=str(path), shard_devices=2, sharding="table_wise")  # built from the config
    features = {"hashtags": [[1, 2], []], "user": [[3], [4, 999]], "topics": [[299], [5]]}
    weights = {"hashtags": [[0.5, 2.0], []]}
    with Client(plain.address) as a, Client(sharded.address) as b:
        np.testing.assert_array_equal(
            a.lookup(features, weights=weights).embeddings, b.lookup(features, weights=weights).embeddings
        )
