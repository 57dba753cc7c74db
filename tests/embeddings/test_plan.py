"""Sharding plans: balancing, automatic row-wise splits, the YAML round trip, and one-line refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from embserve.embeddings.errors import ConfigError, PlanError
from embserve.embeddings.plan import (
    ShardingPlan,
    dump_plan,
    load_plan,
    make_plan,
    plan_digest,
    plan_from_dict,
    shard_model_config,
    shard_row_ranges,
    table_bytes,
    validate_plan,
)
from tests.support import make_config, write_model_config

BALANCED = [
    {"name": "a", "num_embeddings": 400, "embedding_dim": 8},
    {"name": "b", "num_embeddings": 300, "embedding_dim": 8, "weighted": True},
    {"name": "c", "num_embeddings": 200, "embedding_dim": 8, "id_policy": "hash"},
    {"name": "d", "num_embeddings": 100, "embedding_dim": 8},
]


def test_plan_error_is_a_config_error() -> None:
    assert issubclass(PlanError, ConfigError)


def test_table_wise_plan_places_every_table_once_balanced_by_bytes() -> None:
    config = make_config(BALANCED)
    plan = make_plan(config, shards=2)
    validate_plan(plan, config)
    held = [sorted(s.tables) for s in plan.shards]
    assert sorted(sum(held, [])) == ["a", "b", "c", "d"]
    assert all(not s.row_ranges for s in plan.shards)
    nbytes = table_bytes(config)
    loads = [sum(nbytes[n] for n in s.tables) for s in plan.shards]
    assert loads == [nbytes["a"] + nbytes["d"], nbytes["b"] + nbytes["c"]]
    assert plan.digest == plan_digest(plan)


def test_table_larger_than_a_shards_share_is_split_row_wise(small_config: Any) -> None:
    plan = make_plan(small_config, shards=2)
    validate_plan(plan, small_config)
    ranges = [(r.table, r.start, r.end) for s in plan.shards for r in s.row_ranges]
    assert ranges == [("user", 0, 500), ("user", 500, 1000)]
    assert "user" not in sum((s.tables for s in plan.shards), [])


def test_row_wise_tables_by_name_and_max_shard_bytes() -> None:
    config = make_config(BALANCED)
    plan = make_plan(config, shards=3, row_wise=["b"])
    validate_plan(plan, config)
    b = [(r.start, r.end) for s in plan.shards for r in s.row_ranges if r.table == "b"]
    assert b == [(0, 100), (100, 200), (200, 300)]
    nbytes = table_bytes(config)
    fitted = make_plan(config, max_shard_bytes=nbytes["a"])
    validate_plan(fitted, config)
    for s in fitted.shards:
        rows = {t.name: t.num_embeddings for t in config.tables}
        held = sum(nbytes[n] for n in s.tables) + sum(
            nbytes[r.table] * (r.end - r.start) // rows[r.table] for r in s.row_ranges
        )
        assert held <= nbytes["a"]


def test_shard_model_config_keeps_order_and_slices_rows(small_config: Any) -> None:
    plan = make_plan(small_config, shards=2)
    for k in range(2):
        sub = shard_model_config(small_config, plan, k)
        order = [t.name for t in small_config.tables]
        assert [t.name for t in sub.tables] == sorted((t.name for t in sub.tables), key=order.index)
        ranges = shard_row_ranges(small_config, plan, k)
        assert {t.name: t.num_embeddings for t in sub.tables} == {n: e - s for n, (s, e) in ranges.items()}
        assert sub.tables[0].name == "user" and sub.tables[0].num_embeddings == 500


def test_yaml_round_trip_and_digest(tmp_path: Path, small_config: Any) -> None:
    plan = make_plan(small_config, shards=2)
    digest = dump_plan(plan, tmp_path / "plan.yaml")
    assert digest == plan.digest
    text = (tmp_path / "plan.yaml").read_text()
    assert text.startswith("# embserve sharding plan") and "row_ranges" in text
    loaded = load_plan(tmp_path / "plan.yaml", small_config)
    assert loaded == plan


def _bad(plan: ShardingPlan, edit: Any) -> dict[str, Any]:
    data = plan.model_dump(mode="json", exclude={"digest"})
    edit(data)
    return data


def _rr(data: dict[str, Any], shard: int) -> list[dict[str, Any]]:
    ranges: list[dict[str, Any]] = data["shards"][shard]["row_ranges"]
    return ranges


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: _rr(d, 0).__setitem__(0, {"table": "user", "start": 0, "end": 600}), "overlap another range"),
        (lambda d: _rr(d, 0).__setitem__(0, {"table": "user", "start": 0, "end": 400}), "rows [400, 500) are in no"),
        (lambda d: _rr(d, 1).__setitem__(0, {"table": "user", "start": 500, "end": 900}), "rows [900, 1000)"),
        (lambda d: d["shards"][0]["tables"].remove(d["shards"][0]["tables"][0]), "is in no shard"),
        (lambda d: d["shards"][1]["tables"].append(d["shards"][0]["tables"][0]), "is in two shards"),
        (lambda d: d["shards"][1]["tables"].append("nope"), "table 'nope', which model"),
        (lambda d: d["shards"][1].__setitem__("index", 5), "shard index 5 out of range"),
        (lambda d: d["shards"][1].__setitem__("index", 0), "shard index 0 appears twice"),
        (lambda d: d.__setitem__("model_digest", "sha256:00"), "make the plan again"),
        (lambda d: d.__setitem__("digest", "sha256:00"), "does not match its content"),
        (lambda d: d.__setitem__("format", 9), "format 9 is not supported"),
        (lambda d: d.__setitem__("extra", 1), "extra: Extra inputs are not permitted"),
    ],
)
def test_bad_plans_are_refused_in_one_line(tmp_path: Path, small_config: Any, edit: Any, message: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_bad(make_plan(small_config, shards=2), edit)))
    with pytest.raises(PlanError) as info:
        load_plan(path, small_config)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_make_plan_refusals(small_config: Any) -> None:
    with pytest.raises(PlanError, match="row-wise table 'nope'"):
        make_plan(small_config, shards=2, row_wise=["nope"])
    with pytest.raises(PlanError, match="not both or neither"):
        make_plan(small_config)
    with pytest.raises(PlanError, match="one row is larger"):
        make_plan(small_config, max_shard_bytes=4)
    with pytest.raises(PlanError, match="shard 7 is not in the plan"):
        shard_model_config(small_config, make_plan(small_config, shards=2), 7)
    with pytest.raises(PlanError, match="a plan must be a mapping"):
        plan_from_dict([1])


def test_plan_command(tmp_path: Path, small_config: Any) -> None:
    model = write_model_config(small_config, tmp_path / "small.yaml")
    out = tmp_path / "plan.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "embserve.client.cli", "plan", "--model", str(model), "--shards", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    plan = load_plan(out, small_config)
    assert f"digest {plan.digest}" in run.stdout
    assert "shard 1:" in run.stdout and "user[500:1000)" in run.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "embserve.client.cli",
            "plan",
            "--model",
            str(model),
            "--shards",
            "2",
            "--row-wise",
            "nope",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "row-wise table 'nope'" in bad.stderr
