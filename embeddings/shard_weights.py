"""A shard's model: the sub-model a sharding plan gives shard K, with its weights sliced from the whole model's.

From a checkpoint file of the whole model only the shard's tables, and of row-wise tables only its rows, are read
(a safetensors file by slices of its tensors; a torch file memory-mapped). Without a checkpoint, each table is
initialised as the whole model's would be (the init depends on the table's full row count) and sliced, so a shard
answers exactly what a single server of the whole model answers for its rows. A row directory is served as the
shard's own (`embserve export --plan` writes one per shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .large_embeddings import LargeEmbeddings
from .plan import ShardingPlan, shard_model_config, shard_row_ranges
from .row_directory import is_row_directory
from .serving import ServingModel, build_serving_model
from .state_keys import match_tables, safetensors_header
from .weights import checkpoint_digest, checkpoint_version, init_weights, table_weights

__all__ = ["build_shard_model", "shard_weights"]


def _checkpoint_slices(config: ModelConfig, ranges: dict[str, tuple[int, int]], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        keys = match_tables(config, safetensors_header(path), path)
        with safe_open(str(path), framework="pt") as f:
            for name, (start, end) in ranges.items():
                out[name] = f.get_slice(keys[name])[start:end]
    else:
        try:
            state: Any = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # any parse failure of an untrusted file is reported, never propagated raw
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
        keys = match_tables(config, {k: tuple(v.shape) for k, v in state.items()}, path)
        out = {name: state[keys[name]][start:end].clone() for name, (start, end) in ranges.items()}
    for name, tensor in out.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"table {name!r}: checkpoint dtype {tensor.dtype} is not a float type")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"table {name!r}: checkpoint has non-finite weights")
    return out


def shard_weights(
    config: ModelConfig, plan: ShardingPlan, index: int, *, checkpoint: str | Path | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Shard `index`'s float weights, by table: its rows of the whole model's checkpoint, or of its seeded init."""
    ranges = shard_row_ranges(config, plan, index)
    if checkpoint is not None:
        return _checkpoint_slices(config, ranges, Path(checkpoint))
    tables = config.model_copy(update={"tables": [t for t in config.tables if t.name in ranges]})
    model = LargeEmbeddings(tables)
    init_weights(model, seed)
    return {name: w.detach()[ranges[name][0] : ranges[name][1]].clone() for name, w in table_weights(model).items()}


def build_shard_model(
    config: ModelConfig,
    plan: ShardingPlan,
    index: int,
    *,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    version: str | None = None,
    **build: Any,
) -> ServingModel:
    """Shard `index`'s serving model (`build_serving_model`'s other arguments in `build`).

    The version is the whole checkpoint's (`<file stem>-<digest>`, as a single server reports it), `init-<seed>`,
    or the shard's row directory's.
    """
    sub = shard_model_config(config, plan, index)
    if checkpoint is not None and is_row_directory(checkpoint):
        return build_serving_model(sub, checkpoint=checkpoint, version=version, **build)
    weights = shard_weights(config, plan, index, checkpoint=checkpoint, seed=seed)
    if version is None:
        version = checkpoint_version(checkpoint, checkpoint_digest(checkpoint)) if checkpoint else f"init-{seed}"
    return build_serving_model(sub, weights=weights, version=version, **build)
