"""Shard servers: `--plan P --shard K` serves exactly shard K's tables and rows, states the plan in its metadata,
and answers what a single server of the whole model answers for those rows."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embserve.embeddings import ModelConfig
from embserve.embeddings.plan import dump_plan, make_plan, shard_row_ranges
from embserve.embeddings.weights_cli import add_export_args, run_export
from embserve.server.config import ServerConfig
from embserve.server.startup import StartupError, check_startup
from embserve.v1 import embserve_pb2 as pb
from tests.server.helpers import embeddings_of, lookup_request, stub
from tests.support import ServerHandle, write_model_config


@pytest.fixture
def sharded(tmp_path: Path, small_config: ModelConfig) -> tuple[Path, Path]:
    model = write_model_config(small_config, tmp_path / "small.yaml")
    plan = tmp_path / "plan.yaml"
    dump_plan(make_plan(small_config, shards=2), plan)  # user is split row-wise: [0, 500) and [500, 1000)
    return model, plan


def _lookup(address: str, keys: list[str], lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    channel, s = stub(address)
    with channel:
        return embeddings_of(s.Lookup(lookup_request(keys, lengths, values)))


def _columns(keys: list[str], dims: list[int], name: str) -> tuple[int, int]:
    i = keys.index(name)
    return sum(dims[:i]), sum(dims[: i + 1])


def test_shard_serves_its_rows_and_states_the_plan(
    sharded: tuple[Path, Path], small_config: ModelConfig, server_factory: Callable[..., ServerHandle]
) -> None:
    model, plan_path = sharded
    from embserve.embeddings.plan import load_plan

    plan = load_plan(plan_path, small_config)
    whole = server_factory(model=str(model))
    whole_keys = ["user", "author", "topics", "hashtags"]
    whole_dims = [16, 8, 4, 12]
    for k in range(2):
        shard = server_factory(model=str(model), plan=str(plan_path), shard=k)
        channel, s = stub(shard.address)
        with channel:
            meta = s.GetModelMetadata(pb.GetModelMetadataRequest())
        assert (meta.plan_digest, meta.shard_index, meta.shard_count) == (plan.digest, k, 2)
        assert list(meta.model_keys) == ["user", "author", "topics", "hashtags"]
        ranges = shard_row_ranges(small_config, plan, k)
        dim_of = {t.name: t.embedding_dim for t in meta.tables}
        assert {t.name: t.num_embeddings for t in meta.tables} == {n: e - b for n, (b, e) in ranges.items()}
        user = {t.name: (t.row_start, t.table_rows) for t in meta.tables}["user"]
        assert user == (500 * k, 1000)
        # Every key of the shard, local ids: the same bits as the whole model's server for the global rows.
        rng = np.random.default_rng(k)
        for name, (start, end) in ranges.items():
            lengths = rng.integers(0, 6, size=(1, 32)).astype(np.int32)
            local = rng.integers(0, end - start, size=int(lengths.sum())).astype(np.int64)
            got = _lookup(shard.address, [name], lengths, local)
            want = _lookup(whole.address, [name], lengths, local + start)
            lo, hi = _columns(list(meta.keys), [dim_of[n] for n in meta.keys], name)
            wlo, whi = _columns(whole_keys, whole_dims, name)
            np.testing.assert_array_equal(got[:, lo:hi], want[:, wlo:whi])


def test_exported_shard_directories_serve_the_same_rows(
    tmp_path: Path,
    sharded: tuple[Path, Path],
    small_config: ModelConfig,
    server_factory: Callable[..., ServerHandle],
) -> None:
    model, plan_path = sharded
    parser = argparse.ArgumentParser()
    add_export_args(parser)
    out = tmp_path / "shards"
    args = parser.parse_args(["--model", str(model), "--plan", str(plan_path), "--storage", "mmap", "-o", str(out)])
    assert run_export(args) == 0
    lengths = np.array([[3, 0, 2]], dtype=np.int32)
    values = np.array([0, 499, 7, 100, 250], dtype=np.int64)
    for k in range(2):
        from_file = server_factory(model=str(model), plan=str(plan_path), shard=k)
        from_dir = server_factory(model=str(model), plan=str(plan_path), shard=k, checkpoint=str(out / f"shard-{k}"))
        np.testing.assert_array_equal(
            _lookup(from_dir.address, ["user"], lengths, values), _lookup(from_file.address, ["user"], lengths, values)
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shard": 2}, "--shard 2: plan"),
        ({"plan": "nope.yaml"}, "--plan: plan 'nope.yaml': no such file"),
    ],
)
def test_bad_shard_settings_fail_start_in_one_line(
    sharded: tuple[Path, Path], overrides: dict[str, Any], message: str
) -> None:
    model, plan = sharded
    config = ServerConfig.model_validate({"model": str(model), "plan": str(plan), "shard": 0, "port": 0, **overrides})
    with pytest.raises(StartupError) as info:
        check_startup(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plan_without_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="plan and shard go together"):
        ServerConfig.model_validate({"plan": "p.yaml"})
