"""`embserve plan`: write a sharding plan for a model (see `plan` and docs/deployment.md). Torch-free.

Prints the plan's digest and a line per shard; a failure is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .config import ConfigError, load_model_config
from .plan import dump_plan, make_plan, table_bytes

__all__ = ["plan_command", "run_plan"]


def plan_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Write a sharding plan: the model's tables, or row ranges of them, over shard servers."""
    parser.add_argument("--model", required=True, help="model config: a YAML path or a built-in name")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--shards", type=int, metavar="N", help="number of shards")
    size.add_argument(
        "--max-shard-bytes", type=int, metavar="B", help="bytes a shard may hold: as few shards as fit (serving dtype)"
    )
    parser.add_argument(
        "--row-wise",
        nargs="+",
        default=[],
        metavar="TABLE",
        help="split these tables row-wise over every shard (tables larger than a shard's share are split anyway)",
    )
    parser.add_argument("--output", "-o", required=True, help="the plan YAML to write")
    return run_plan


def run_plan(args: argparse.Namespace) -> int:
    try:
        config = load_model_config(args.model)
        plan = make_plan(config, shards=args.shards, max_shard_bytes=args.max_shard_bytes, row_wise=args.row_wise)
        digest = dump_plan(plan, args.output)
    except ConfigError as err:  # PlanError too
        print(f"embserve plan: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    nbytes = table_bytes(config)
    rows = {t.name: t.num_embeddings for t in config.tables}
    print(f"wrote {args.output}: model {config.name!r}, {plan.shard_count} shards, digest {digest}")
    for shard in plan.shards:
        held = sum(nbytes[n] for n in shard.tables) + sum(
            nbytes[r.table] * (r.end - r.start) // rows[r.table] for r in shard.row_ranges
        )
        parts = shard.tables + [f"{r.table}[{r.start}:{r.end})" for r in shard.row_ranges]
        print(f"shard {shard.index}: {held} bytes: {', '.join(parts)}")
    return 0
