"""Where a server stands in a sharding plan: the plan's digest and, on a shard server, its index and its rows.

GetModelMetadata states it, so that a router (or a client fanning out to the shards) can check that every shard
serves the same plan, and learn each shard's row ranges. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from embserve.embeddings.config import ModelConfig, canonical_keys
from embserve.embeddings.plan import ShardingPlan, load_plan, shard_row_ranges

__all__ = ["Placement", "shard_placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A plan's digest and shard count; on a shard server its index, the whole model's key order, and per
    row-wise table its first row and the table's rows in the whole model."""

    plan_digest: str
    shard_count: int
    shard_index: int | None = None  # None: a router, not a shard
    model_keys: tuple[str, ...] = ()
    row_slices: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def shard_placement(model: ModelConfig, plan: ShardingPlan | str, index: int) -> Placement:
    """Shard `index`'s placement in `plan` (a plan or its path, checked against the whole model `model`)."""
    if isinstance(plan, str):
        plan = load_plan(plan, model)
    rows = {t.name: t.num_embeddings for t in model.tables}
    ranges = shard_row_ranges(model, plan, index)
    return Placement(
        plan_digest=plan.digest or "",
        shard_count=plan.shard_count,
        shard_index=index,
        model_keys=tuple(canonical_keys(model)),
        row_slices={n: (s, rows[n]) for n, (s, e) in ranges.items() if (s, e) != (0, rows[n])},
    )
