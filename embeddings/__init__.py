"""The model side of embserve: the seed's `LargeEmbeddings`, its config, weights and serving surgery.

Importable without gRPC; nothing here imports from `embserve.server` or `embserve.client`. Names are loaded from
their modules when first used, so that the torch-free parts (`config`, `memory`) never import torch: the server's
command line, its settings and its start-up errors run without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvertError",
    "DataType",
    "EmbeddingBagConfig",
    "EmbeddingSnapshot",
    "EmbeddingsError",
    "Engine",
    "IdPolicy",
    "LargeEmbeddings",
    "LargeEmbeddingsConfig",
    "ModelConfig",
    "ServingDType",
    "SelfCheckFailed",
    "ServingModel",
    "ShardingType",
    "Storage",
    "StorageFailed",
    "build_serving_model",
    "builtin_model_names",
    "canonical_keys",
    "check_checkpoint",
    "init_weights",
    "load_checkpoint",
    "load_model_config",
    "model_config_from_dict",
    "save_checkpoint",
    "table_weights",
]

# Searched in this order for a name: the torch-free modules first.
_MODULES = ("errors", "config", "state_keys", "large_embeddings", "serving", "weights")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(f".{module}", __name__), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .config import (
        DataType,
        EmbeddingBagConfig,
        EmbeddingSnapshot,
        Engine,
        IdPolicy,
        LargeEmbeddingsConfig,
        ModelConfig,
        ServingDType,
        ShardingType,
        Storage,
        builtin_model_names,
        load_model_config,
        model_config_from_dict,
    )
    from .errors import CheckpointError, ConfigError, ConvertError, EmbeddingsError, SelfCheckFailed, StorageFailed
    from .large_embeddings import LargeEmbeddings, canonical_keys
    from .serving import ServingModel, build_serving_model
    from .state_keys import check_checkpoint
    from .weights import init_weights, load_checkpoint, save_checkpoint, table_weights
