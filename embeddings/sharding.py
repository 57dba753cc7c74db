"""Tables split over several devices with torchrec's own inference sharding (`shard_quant_model`).

The fused collections are sharded table-wise (each table whole on one device) or row-wise (each table's rows
split across the devices), then every shard's weights are copied from the unsharded fused module: torchrec 1.8
builds the sharded kernels with fresh weights. torchrec 1.8 shards only quantized (int8, int4) tables: with fp32
or fp16 tables its sharded quantized state has no row-wise scales to read and fails.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.global_settings import set_propogate_device
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.inference.modules import shard_quant_model

from .config import ConfigError, ModelConfig, ServingDType, ShardingType

__all__ = ["ShardingType", "shard_fused_module"]

SHARDABLE = (ServingDType.INT8, ServingDType.INT4)


def _fused_tables(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every table's (row data, scale-shift) views in the unsharded fused kernels, by table name."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for sub in module.modules():
        for tbe in getattr(sub, "tbes", []):
            names = [spec[0] for spec in tbe.embedding_specs]
            for name, split in zip(names, tbe.split_embedding_weights(split_scale_shifts=True)):
                out[name] = (split[0], split[1])
    return out


@torch.no_grad()
def _copy_weights(sharded: nn.Module, source: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> int:
    copied = 0
    for sub in sharded.modules():
        for lookup in getattr(sub, "_lookups", []):
            for per_rank in getattr(lookup, "_embedding_lookups_per_rank", []):
                for emb in per_rank._emb_modules:
                    splits = emb._emb_module.split_embedding_weights(split_scale_shifts=True)
                    for table, (data, scale_shift) in zip(emb._config.embedding_tables, splits):
                        row = table.local_metadata.shard_offsets[0] if table.local_metadata else 0
                        src_data, src_scale_shift = source[table.name]
                        data.copy_(src_data[row : row + data.shape[0], : data.shape[1]])
                        if scale_shift is not None and scale_shift.numel():
                            assert src_scale_shift is not None
                            scale_shift.copy_(src_scale_shift[row : row + scale_shift.shape[0]])
                        copied += 1
    return copied


def shard_fused_module(
    module: nn.Module, config: ModelConfig, *, devices: int, sharding: ShardingType | str, device_type: str
) -> nn.Module:
    """Shards a fused (quantized) serving module over `devices` devices of `device_type` (`cuda`, or `cpu` to
    run the same sharded kernels on one host's CPU); returns the sharded module with the same weights."""
    sharding = ShardingType(sharding)
    wrong = [t.name for t in config.tables if t.effective_serving_dtype not in SHARDABLE]
    if wrong:
        raise ConfigError(
            f"sharding needs serving_dtype int8 or int4 for every table (torchrec 1.8 shards only quantized "
            f"tables); not so for {wrong}"
        )
    if device_type == "cuda" and torch.cuda.device_count() < devices:
        raise ConfigError(f"sharding over {devices} GPUs, but this host has {torch.cuda.device_count()}")
    source = _fused_tables(module)
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=[sharding.value], compute_kernels=[EmbeddingComputeKernel.QUANT.value]
        )
        for t in config.tables
    }
    # torchrec's sharded inference modules place their kernels and outputs on CUDA unless this process-wide flag
    # says to follow the given device; they read it again at every forward, so it stays set. It changes nothing
    # for unsharded modules.
    set_propogate_device(True)
    sharded, _plan = shard_quant_model(
        module, world_size=devices, compute_device=device_type, sharding_device=device_type, constraints=constraints
    )
    copied = _copy_weights(sharded, source)
    if copied < len(config.tables):
        raise RuntimeError(f"copied {copied} table shards for {len(config.tables)} tables; sharding layout unknown")
    result: nn.Module = sharded
    return result
