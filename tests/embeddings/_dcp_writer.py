"""A sharded training-side save, as a trainer would make it: the seed's `LargeEmbeddings` inside a larger model,
sharded over 2 CPU processes (gloo) by torchrec's `DistributedModelParallel` with table-wise and row-wise plans,
its shards filled from known full tables, then saved with `torch.distributed.checkpoint`.

Run by `torch.multiprocessing.spawn` from `test_convert.py`; `full_tables` is the reference both sides compute.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

# name, rows, dim, data type, weighted, sharding ("table_wise:<rank>" or "row_wise")
TABLES: list[tuple[str, int, int, str, bool, str]] = [
    ("user", 97, 8, "fp32", False, "table_wise:0"),
    ("author", 45, 4, "fp32", False, "table_wise:1"),
    ("topics", 101, 6, "fp32", False, "row_wise"),
    ("hashtags", 33, 4, "fp32", True, "row_wise"),
]
PREFIX = "model.large_embeddings."


def model_dict() -> dict[str, Any]:
    return {
        "name": "sharded",
        "tables": [
            {"name": n, "num_embeddings": r, "embedding_dim": d, "data_type": t, "weighted": w}
            for n, r, d, t, w, _ in TABLES
        ],
    }


def full_tables(seed: int) -> dict[str, np.ndarray]:
    """What the trainer's tables hold: distinct values per table, row and column."""
    out = {}
    for i, (name, rows, dim, _, _, _) in enumerate(TABLES):
        rng = np.random.default_rng(seed * 100 + i)
        out[name] = rng.standard_normal((rows, dim)).astype(np.float32)
    return out


class _Dense(torch.nn.Module):
    def __init__(self, large_embeddings: torch.nn.Module) -> None:
        super().__init__()
        self.large_embeddings = large_embeddings
        self.mlp = torch.nn.Linear(4, 2)


class _Trainer(torch.nn.Module):
    def __init__(self, large_embeddings: torch.nn.Module) -> None:
        super().__init__()
        self.model = _Dense(large_embeddings)


def save_sharded(rank: int, world_size: int, rendezvous: str, out_dir: str, seed: int) -> None:
    """One rank of the sharded save; writes `out_dir` with `torch.distributed.checkpoint.save`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    from embserve.embeddings import LargeEmbeddings, model_config_from_dict

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        config = model_config_from_dict(model_dict())
        trainer = _Trainer(LargeEmbeddings(config, device="meta"))
        sharder = EmbeddingBagCollectionSharder()

        def spec(how: str) -> Any:
            return row_wise() if how == "row_wise" else table_wise(rank=int(how.split(":")[1]))

        plan = {}
        for collection, weighted in (("ebc", False), ("weighted_ebc", True)):
            plan[f"{PREFIX}{collection}"] = construct_module_sharding_plan(
                getattr(trainer.model.large_embeddings, collection),
                per_param_sharding={n: spec(s) for n, _, _, _, w, s in TABLES if w == weighted},
                local_size=world_size,
                world_size=world_size,
                device_type="cpu",
                sharder=sharder,
            )
        dmp = DistributedModelParallel(
            trainer,
            device=torch.device("cpu"),
            plan=ShardingPlan(plan),
            sharders=[sharder],
        )
        tables = full_tables(seed)
        # Fill each rank's own shards from the full tables, through the module's live parameters.
        with torch.no_grad():
            for key, value in dmp.state_dict().items():
                if "embedding_bags." not in key:
                    continue
                table = tables[key.split("embedding_bags.")[1].split(".")[0]]
                for shard in value.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(torch.from_numpy(table[r0 : r0 + nr, c0 : c0 + nc]))
        dcp.save(dmp.state_dict(), checkpoint_id=out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()
