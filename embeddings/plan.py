"""Sharding plans: which shard server holds which tables, or which rows of a table, of a model too large for one host.

A plan is a YAML file (`embserve plan` writes one): its format version, the model's name and the digest of the
model's served layout, and per shard its index, its whole tables and its row ranges `[start, end)` of tables split
row-wise. A row-wise table is cut into contiguous ranges rather than by id modulo: each shard's rows are a slice
of the table's row file, so a shard's files are slices too; ids that come from hashing are uniform, so contiguous
ranges take an even share of the lookups anyway.

The plan's digest is the SHA-256 of its canonical content (everything but the digest itself); shard servers report
it and the router refuses a shard that reports another. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from .config import ModelConfig
from .errors import PlanError
from .row_files import row_bytes

__all__ = [
    "PLAN_FORMAT",
    "PlanError",
    "RowRange",
    "ShardPlan",
    "ShardingPlan",
    "dump_plan",
    "load_plan",
    "make_plan",
    "model_digest",
    "plan_digest",
    "shard_model_config",
    "shard_row_ranges",
    "table_bytes",
    "validate_plan",
]

PLAN_FORMAT = 1
MAX_SHARDS = 4096


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class RowRange(_Strict):
    """Rows `[start, end)` of a table split row-wise."""

    table: str
    start: int = pydantic.Field(ge=0)
    end: int = pydantic.Field(gt=0)


class ShardPlan(_Strict):
    """One shard: its whole tables and its row ranges."""

    index: int = pydantic.Field(ge=0)
    tables: list[str] = []
    row_ranges: list[RowRange] = []


class ShardingPlan(_Strict):
    """A model's tables over shard servers; see the module docstring."""

    format: int = PLAN_FORMAT
    model: str
    model_digest: str
    shards: list[ShardPlan] = pydantic.Field(min_length=1)
    digest: str | None = None  # the stored digest of the rest; checked on load

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def shard(self, index: int) -> ShardPlan:
        for s in self.shards:
            if s.index == index:
                return s
        raise PlanError(f"shard {index} is not in the plan (shards 0 to {len(self.shards) - 1})")


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def model_digest(config: ModelConfig) -> str:
    """SHA-256 of the model's served layout: its name and, per table in order, what decides its rows and answers
    (name, rows, dim, data type, serving dtype, weighted, id policy); storage and training fields are left out."""
    layout = {
        "name": config.name,
        "tables": [
            [
                t.name,
                t.num_embeddings,
                t.embedding_dim,
                t.data_type.value,
                t.effective_serving_dtype.value,
                t.weighted,
                t.id_policy.value,
            ]
            for t in config.tables
        ],
    }
    return "sha256:" + hashlib.sha256(_canonical(layout)).hexdigest()


def plan_digest(plan: ShardingPlan) -> str:
    """SHA-256 of the plan's canonical content (every field but `digest`)."""
    return "sha256:" + hashlib.sha256(_canonical(plan.model_dump(mode="json", exclude={"digest"}))).hexdigest()


def table_bytes(config: ModelConfig) -> dict[str, int]:
    """Each table's bytes in its serving dtype, as the fused engine lays its rows out."""
    return {t.name: t.num_embeddings * row_bytes(t.embedding_dim, t.effective_serving_dtype) for t in config.tables}


def _even_ranges(table: str, rows: int, parts: int) -> list[RowRange]:
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [RowRange(table=table, start=bounds[i], end=bounds[i + 1]) for i in range(parts)]


def _assign(
    config: ModelConfig, shards: int, split: set[str], nbytes: Mapping[str, int]
) -> tuple[list[list[str]], list[int]]:
    """Whole tables over `shards`, largest first, each to the shard with the least load, where a shard's load is
    its share of the model's bytes plus its share of the lookup cost (the embedding dims it pools)."""
    total_bytes = max(1, sum(nbytes.values()))
    total_cost = max(1, sum(t.embedding_dim for t in config.tables))
    loads = [0.0] * shards
    held = [0] * shards
    for t in config.tables:
        if t.name in split:
            for i in range(shards):
                loads[i] += (nbytes[t.name] / shards) / total_bytes + (t.embedding_dim / shards) / total_cost
                held[i] += nbytes[t.name] // shards
    tables: list[list[str]] = [[] for _ in range(shards)]
    whole = sorted((t for t in config.tables if t.name not in split), key=lambda t: (-nbytes[t.name], t.name))
    for t in whole:
        i = min(range(shards), key=lambda s: (loads[s], s))
        tables[i].append(t.name)
        loads[i] += nbytes[t.name] / total_bytes + t.embedding_dim / total_cost
        held[i] += nbytes[t.name]
    return tables, held


def make_plan(
    config: ModelConfig,
    *,
    shards: int | None = None,
    max_shard_bytes: int | None = None,
    row_wise: Iterable[str] = (),
) -> ShardingPlan:
    """A plan over `shards` shards, or over as few shards as hold at most `max_shard_bytes` each.

    Whole tables are balanced by bytes (serving dtype) and lookup cost (dim). Tables named in `row_wise`, and any
    table larger than the per-shard budget (`max_shard_bytes`, or with `shards` the even share of the model's
    bytes), are split row-wise into even contiguous ranges, one on every shard.

    Raises:
        PlanError: naming the table or the setting at fault.
    """
    if (shards is None) == (max_shard_bytes is None):
        raise PlanError("give the number of shards or the bytes a shard may hold, not both or neither")
    names = {t.name for t in config.tables}
    row_wise = list(row_wise)
    for name in row_wise:
        if name not in names:
            raise PlanError(f"row-wise table {name!r} is not in model {config.name!r} (tables: {sorted(names)})")
    nbytes = table_bytes(config)
    by_name = {t.name: t for t in config.tables}
    if shards is not None:
        if not 1 <= shards <= MAX_SHARDS:
            raise PlanError(f"shards must be 1 to {MAX_SHARDS}, got {shards}")
        budget = -(-sum(nbytes.values()) // shards)
        split = set(row_wise) | {n for n, b in nbytes.items() if b > budget and shards > 1}
        tables, _ = _assign(config, shards, split, nbytes)
    else:
        assert max_shard_bytes is not None
        if max_shard_bytes <= 0:
            raise PlanError(f"max shard bytes must be positive, got {max_shard_bytes}")
        widest = max(config.tables, key=lambda t: nbytes[t.name] // t.num_embeddings)
        if nbytes[widest.name] // widest.num_embeddings > max_shard_bytes:
            raise PlanError(f"table {widest.name!r}: one row is larger than the {max_shard_bytes} bytes a shard holds")
        shards = max(1, -(-sum(nbytes.values()) // max_shard_bytes))
        while True:
            split = set(row_wise) | {n for n, b in nbytes.items() if b > max_shard_bytes}
            tables, held = _assign(config, shards, split, nbytes)
            fits = all(h <= max_shard_bytes for h in held) and all(by_name[n].num_embeddings >= shards for n in split)
            if fits:
                break
            shards += 1
            if shards > MAX_SHARDS:
                raise PlanError(f"the model does not fit {MAX_SHARDS} shards of {max_shard_bytes} bytes")
    for name in split:
        if by_name[name].num_embeddings < shards:
            raise PlanError(f"table {name!r} has {by_name[name].num_embeddings} rows: too few to split over {shards}")
    ranges = {name: _even_ranges(name, by_name[name].num_embeddings, shards) for name in split}
    order = [t.name for t in config.tables]
    plan = ShardingPlan(
        model=config.name,
        model_digest=model_digest(config),
        shards=[
            ShardPlan(
                index=i,
                tables=sorted(tables[i], key=order.index),
                row_ranges=[ranges[n][i] for n in order if n in split],
            )
            for i in range(shards)
        ],
    )
    return plan.model_copy(update={"digest": plan_digest(plan)})


def validate_plan(plan: ShardingPlan, config: ModelConfig, *, source: str = "plan") -> None:
    """Checks that `plan` places every table of `config` exactly once.

    Raises:
        PlanError: one line naming the table or shard: a shard index out of range or twice, a table unknown,
            missing, or in two shards, row ranges that overlap or leave rows uncovered, or a plan made for
            another model.
    """
    if plan.format != PLAN_FORMAT:
        raise PlanError(f"{source}: format {plan.format} is not supported (this embserve reads format {PLAN_FORMAT})")
    if plan.digest is not None and plan.digest != plan_digest(plan):
        raise PlanError(f"{source}: its digest {plan.digest} does not match its content: write it again")
    want = model_digest(config)
    if plan.model_digest != want:
        raise PlanError(
            f"{source}: made for model {plan.model!r} with digest {plan.model_digest}, but model {config.name!r} "
            f"has digest {want}: make the plan again for this model"
        )
    count = len(plan.shards)
    seen_shards: set[int] = set()
    for s in plan.shards:
        if s.index >= count:
            raise PlanError(
                f"{source}: shard index {s.index} out of range: {count} shards are numbered 0 to {count - 1}"
            )
        if s.index in seen_shards:
            raise PlanError(f"{source}: shard index {s.index} appears twice")
        seen_shards.add(s.index)
    rows = {t.name: t.num_embeddings for t in config.tables}
    whole: dict[str, int] = {}
    pieces: dict[str, list[tuple[int, int, int]]] = {}
    for s in plan.shards:
        for name in s.tables:
            if name not in rows:
                raise PlanError(f"{source}: shard {s.index} names table {name!r}, which model {config.name!r} lacks")
            if name in whole or name in pieces:
                other = whole.get(name, pieces.get(name, [(0, 0, -1)])[0][2])
                raise PlanError(f"{source}: table {name!r} is in two shards ({other} and {s.index})")
            whole[name] = s.index
        for r in s.row_ranges:
            if r.table not in rows:
                raise PlanError(f"{source}: shard {s.index} names table {r.table!r}, which model {config.name!r} lacks")
            if r.table in whole:
                raise PlanError(f"{source}: table {r.table!r} is in two shards ({whole[r.table]} and {s.index})")
            if r.start >= r.end or r.end > rows[r.table]:
                raise PlanError(
                    f"{source}: shard {s.index}, table {r.table!r}: rows [{r.start}, {r.end}) are not a range of its "
                    f"{rows[r.table]} rows"
                )
            pieces.setdefault(r.table, []).append((r.start, r.end, s.index))
    for name, ranges in pieces.items():
        ranges.sort()
        covered = 0
        for start, end, shard in ranges:
            if start < covered:
                raise PlanError(
                    f"{source}: table {name!r}: rows [{start}, {end}) of shard {shard} overlap another range"
                )
            if start > covered:
                raise PlanError(f"{source}: table {name!r}: rows [{covered}, {start}) are in no shard")
            covered = end
        if covered < rows[name]:
            raise PlanError(f"{source}: table {name!r}: rows [{covered}, {rows[name]}) are in no shard")
    for name in rows:
        if name not in whole and name not in pieces:
            raise PlanError(f"{source}: table {name!r} is in no shard")


def dump_plan(plan: ShardingPlan, path: str | Path) -> str:
    """Writes the plan as YAML, with its digest; returns the digest."""
    digest = plan_digest(plan)
    data = plan.model_copy(update={"digest": digest}).model_dump(mode="json")
    for shard in data["shards"]:
        shard["row_ranges"] = [dict(r) for r in shard["row_ranges"]]
    header = (
        f"# embserve sharding plan for model {plan.model!r}: {len(plan.shards)} shards.\n"
        "# Each shard serves its whole tables and its rows [start, end) of row-wise tables.\n"
    )
    try:
        Path(path).write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    except OSError as err:
        raise PlanError(f"cannot write plan {str(path)!r}: {err.strerror or err}") from None
    return digest


def load_plan(path: str | Path, config: ModelConfig | None = None) -> ShardingPlan:
    """Reads a plan; with `config`, also checks it against the model (`validate_plan`).

    Raises:
        PlanError: one line naming the file and the field, table or shard at fault.
    """
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan {source!r}: no such file") from None
    except OSError as err:
        raise PlanError(f"plan {source!r}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise PlanError(f"plan {source!r}: not valid YAML: {' '.join(str(err).split())}") from None
    plan = plan_from_dict(data, source=source)
    if config is not None:
        validate_plan(plan, config, source=source)
    return plan


def plan_from_dict(data: Any, *, source: str = "plan") -> ShardingPlan:
    """Validates a parsed mapping as a plan's structure (not yet against a model)."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a mapping, got {type(data).__name__}")
    try:
        return ShardingPlan.model_validate(data)
    except pydantic.ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise PlanError(f"{source}: {loc}: {e['msg']}") from None


def shard_row_ranges(config: ModelConfig, plan: ShardingPlan, index: int) -> dict[str, tuple[int, int]]:
    """The rows `[start, end)` shard `index` holds of each of its tables, in the model's table order (a whole
    table: all its rows)."""
    shard = plan.shard(index)
    ranges = {name: (0, -1) for name in shard.tables} | {r.table: (r.start, r.end) for r in shard.row_ranges}
    out: dict[str, tuple[int, int]] = {}
    for t in config.tables:
        if t.name in ranges:
            start, end = ranges[t.name]
            out[t.name] = (start, t.num_embeddings if end < 0 else end)
    return out


def shard_model_config(config: ModelConfig, plan: ShardingPlan, index: int) -> ModelConfig:
    """Shard `index`'s sub-model: its tables in the model's order; a row-wise slice is the table with the same
    name and `num_embeddings = end - start` (shards answer in local ids, which the router translates)."""
    ranges = shard_row_ranges(config, plan, index)
    if not ranges:
        raise PlanError(f"shard {index} holds no table")
    tables = [
        t.model_copy(update={"num_embeddings": ranges[t.name][1] - ranges[t.name][0]})
        for t in config.tables
        if t.name in ranges
    ]
    return config.model_copy(update={"tables": tables, "tables_to_log": None})


def shard_indices(plan: ShardingPlan) -> Sequence[int]:
    return sorted(s.index for s in plan.shards)
