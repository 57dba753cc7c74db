"""Splitting and joining without a network: parts carry local ids and recomputed lengths, the join of the
reference's per-shard sums is the reference's whole sum; the router refuses a bad start in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embserve.embeddings import ModelConfig
from embserve.embeddings.plan import dump_plan, make_plan
from embserve.server.config import ServerConfig
from embserve.server.router import layout_of, shard_version
from embserve.server.router_app import check_router
from embserve.server.startup import StartupError
from tests.reference import pool, random_features
from tests.support import float_tables, write_model_config


def test_split_then_join_equals_the_whole_sum(small_config: ModelConfig) -> None:
    layout = layout_of(small_config, make_plan(small_config, shards=2))  # user row-wise over both shards
    tables = float_tables(small_config)
    rows = {t.name: t.num_embeddings for t in small_config.tables}
    rng = np.random.default_rng(3)
    keys, lengths, values, weights = random_features(rng, rows, 17, max_len=9, keys=["user", "hashtags"], weighted=True)
    index = np.array([layout.index_of(k) for k in keys])
    parts = layout.split(index, lengths, values, weights)
    answers = {}
    for s, part in parts.items():
        assert part.lengths.shape == (len(part.keys), 17) and part.lengths.sum() == part.values.size
        local = {}
        for name in layout.shard_keys[s]:
            t = layout.tables[layout.index_of(name) or 0]
            piece = next(p for p in t.pieces if p.shard == s)
            local[name] = tables[name][piece.start : piece.end]
        answers[s] = pool(local, part.keys, part.lengths, part.values, part.weights, layout.shard_keys[s], {"hashtags"})
    joined = layout.join(17, {s: a.astype(np.float32) for s, a in answers.items()})
    want = pool(tables, keys, lengths, values, weights, layout.keys, {"hashtags"})
    np.testing.assert_allclose(joined, want, rtol=1e-5, atol=1e-6)


def test_versions_join_only_when_shards_differ() -> None:
    assert shard_version({0: "v1", 1: "v1"}) == "v1"
    assert shard_version({1: "v2", 0: "v1"}) == "0=v1,1=v2"


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"shards": ["0=127.0.0.1:1"]}, "shard 1 has no address"),
        ({"shards": ["0=127.0.0.1:1", "1=127.0.0.1:2", "2=127.0.0.1:3"]}, "the plan has shards 0 to 1"),
    ],
)
def test_router_refuses_a_bad_start_in_one_line(
    tmp_path: Path, small_config: ModelConfig, router: dict[str, list[str]], message: str
) -> None:
    model = write_model_config(small_config, tmp_path / "small.yaml")
    dump_plan(make_plan(small_config, shards=2), tmp_path / "plan.yaml")
    config = ServerConfig.model_validate({"model": str(model), "plan": str(tmp_path / "plan.yaml"), "router": router})
    with pytest.raises(StartupError) as info:
        check_router(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_shard_address_is_refused() -> None:
    with pytest.raises(ValueError, match="must be K=HOST:PORT"):
        ServerConfig.model_validate({"router": {"shards": ["localhost:1"]}})
