"""From a training job to a served model: train the seed's `LargeEmbeddings` for a few steps with torchrec's
`DistributedModelParallel` on 2 CPU processes (gloo), save with `torch.distributed.checkpoint`, convert with
`embserve convert`, serve with `embserve serve`, and check the served embeddings against the trained module.

    python examples/train_convert_serve.py
    python examples/train_convert_serve.py --steps 10 --workdir /tmp/ranker

The tables are sharded row-wise, table-wise and column-wise (a plan written out with torchrec's
`construct_module_sharding_plan`: its planner offers no row-wise sharding on CPU), and one of them is fp16. The plan
names torchrec's `fused` kernel for every table, so the sharder's fused optimizer (exact SGD) updates the tables in
the backward pass; without it the plan would give them the `dense` kernel, whose tables that optimizer never
updates. The training config's table order is not alphabetical, and `DistributedModelParallel.state_dict()` sorts its
keys, so the conversion takes the order from the training config (`--model`).

Prints what `embserve convert` printed, the served lookup as a JSON line (`"example": "served"`), and the checks
(`"example": "checks"`); exits non-zero when the served model differs from the trained module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

WORLD_SIZE = 2
BATCH_SIZE = 16
MODEL: dict[str, Any] = {
    "name": "ranker",
    "tables": [
        {"name": "user", "num_embeddings": 1000, "embedding_dim": 8},
        {"name": "author", "num_embeddings": 400, "embedding_dim": 8},
        {"name": "hashtags", "num_embeddings": 300, "embedding_dim": 16},
        {"name": "tweet", "num_embeddings": 2000, "embedding_dim": 8, "data_type": "fp16"},
    ],
}
SHARDING = {"user": "row_wise", "author": "table_wise", "hashtags": "column_wise", "tweet": "table_wise"}


def _batch(seed: int, batch_size: int = BATCH_SIZE) -> dict[str, list[list[int]]]:
    """One batch of id lists per table (0 to 3 ids an example), the same in every process for the same seed."""
    rng = np.random.default_rng(seed)
    return {
        t["name"]: [rng.integers(0, t["num_embeddings"], rng.integers(0, 4)).tolist() for _ in range(batch_size)]
        for t in MODEL["tables"]
    }


def _kjt(features: dict[str, list[list[int]]]) -> Any:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = list(features)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor([i for k in keys for ids in features[k] for i in ids], dtype=torch.int64),
        lengths=torch.tensor([len(ids) for k in keys for ids in features[k]], dtype=torch.int32),
    )


def _train(rank: int, workdir: str, steps: int) -> None:
    """One training process: shard, train, save the checkpoint, and (rank 0) write the module's answer to a probe."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    from embserve.embeddings import LargeEmbeddings, canonical_keys, model_config_from_dict

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's and torchrec's own deprecations
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        config = model_config_from_dict(MODEL)
        columns = canonical_keys(config)

        class Ranker(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.large_embeddings = LargeEmbeddings(config, device="meta")
                self.head = torch.nn.Linear(sum(t.embedding_dim for t in config.tables), 1)

            def forward(self, features: Any) -> tuple[torch.Tensor, torch.Tensor]:
                pooled = self.large_embeddings(features).to_dict()
                embeddings = torch.cat([pooled[k].float() for k in columns], dim=1)
                return embeddings, self.head(embeddings).squeeze(1)

        sharder = EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}
        )
        layouts = {
            "row_wise": row_wise(compute_kernel="fused"),
            "table_wise": table_wise(rank=1, compute_kernel="fused"),
            "column_wise": column_wise(ranks=[0, 1], compute_kernel="fused"),
        }
        model = Ranker()
        plan = construct_module_sharding_plan(
            model.large_embeddings.ebc,
            per_param_sharding={name: layouts[how] for name, how in SHARDING.items()},
            local_size=WORLD_SIZE,
            world_size=WORLD_SIZE,
            device_type="cpu",
            sharder=sharder,
        )
        dmp = DistributedModelParallel(
            model,
            device=torch.device("cpu"),
            plan=ShardingPlan({"large_embeddings.ebc": plan}),
            sharders=[sharder],
        )
        dense = torch.optim.SGD([p for n, p in dmp.named_parameters() if "embedding_bags" not in n], lr=0.1)
        for step in range(steps):
            features = _batch(1000 * step + rank)  # each process trains on its own examples
            labels = torch.from_numpy(np.random.default_rng(step).integers(0, 2, BATCH_SIZE)).float()
            _, logits = dmp(_kjt(features))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            dense.zero_grad()
            loss.backward()  # the fused kernels update their tables here
            dense.step()

        dcp.save(dmp.state_dict(), checkpoint_id=f"{workdir}/checkpoint")
        with torch.no_grad():
            embeddings, _ = dmp(_kjt(_batch(seed=7)))  # every process runs the probe; rank 0 keeps the answer
        if rank == 0:
            np.save(f"{workdir}/module_forward.npy", embeddings.numpy())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _embserve(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "embserve.client.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"embserve {args[0]} failed:\n{proc.stderr}")
    return proc.stdout


def _serve(model_yaml: Path, checkpoint: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`embserve serve` on a free port; returns the process and its `serving` log line (address, version)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embserve.server", "--model", str(model_yaml), "--checkpoint", str(checkpoint),
         "--port", "0", "--no-metrics"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "serving":
            return proc, entry
    proc.wait()
    raise SystemExit(f"embserve serve exited {proc.returncode} before serving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: 5)")
    parser.add_argument("--workdir", help="where the checkpoint and converted files go (default: a temporary folder)")
    args = parser.parse_args()

    import torch.multiprocessing as mp
    import yaml

    from embserve.client import Client

    from _print import print_lookup

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        mp.spawn(_train, args=(str(workdir), args.steps), nprocs=WORLD_SIZE, join=True)
        module = np.load(workdir / "module_forward.npy")

        train_yaml = workdir / "train.yaml"
        train_yaml.write_text(yaml.safe_dump(MODEL, sort_keys=False))
        out = workdir / "ranker.safetensors"
        report = _embserve("convert", str(workdir / "checkpoint"), "-o", str(out), "--model", str(train_yaml),
                           "--ignore-other-keys")
        print(report, end="")
        version = report.split("(version ", 1)[1].split(")", 1)[0]

        server, serving = _serve(workdir / "ranker.yaml", out)
        try:
            features = _batch(seed=7)
            with Client(str(serving["address"]), timeout=30) as client:
                result = client.lookup(features)
        finally:
            server.terminate()
            server.wait(60)
        print_lookup("served", features, None, result.keys, result.embeddings, result.model_version)

        # A table pooled whole on one process (table-wise, column-wise) answers bit for bit as the trained module;
        # a row-wise table's module output adds the processes' partial sums, in another order than one sum.
        columns = {k: module[:, o : o + d] for k, o, d in zip(result.keys, result.offsets, result.dims)}
        checks = {
            "columns_in_training_order": list(result.keys) == [t["name"] for t in MODEL["tables"]],
            "version_as_printed": result.model_version == version == serving["version"],
            "bit_for_bit": {
                k: bool(np.array_equal(result[k], columns[k])) for k in result.keys if SHARDING[k] != "row_wise"
            },
            "row_wise_within_rounding": {
                k: bool(np.allclose(result[k], columns[k], rtol=1e-6, atol=1e-7))
                for k in result.keys
                if SHARDING[k] == "row_wise"
            },
        }
        difference = float(np.abs(result.embeddings - module).max())
        print(json.dumps({"example": "checks", **checks, "max_abs_difference": difference}))
        passed = [v if isinstance(v, bool) else all(v.values()) for v in checks.values()]
        if not all(passed):
            raise SystemExit(f"the served model differs from the trained module: {checks}")


if __name__ == "__main__":
    main()
