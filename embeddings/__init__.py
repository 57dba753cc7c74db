"""The model side of embserve: the seed's `LargeEmbeddings`, its config, weights and serving surgery.

Importable without gRPC; nothing here imports from `embserve.server` or `embserve.client`.
"""

from .config import (
    ConfigError,
    DataType,
    EmbeddingBagConfig,
    EmbeddingSnapshot,
    Engine,
    IdPolicy,
    LargeEmbeddingsConfig,
    ModelConfig,
    ServingDType,
    ShardingType,
    builtin_model_names,
    load_model_config,
    model_config_from_dict,
)
from .large_embeddings import LargeEmbeddings, canonical_keys
from .serving import SelfCheckFailed, ServingModel, build_serving_model
from .weights import CheckpointError, check_checkpoint, init_weights, load_checkpoint, save_checkpoint, table_weights

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataType",
    "EmbeddingBagConfig",
    "EmbeddingSnapshot",
    "Engine",
    "IdPolicy",
    "LargeEmbeddings",
    "LargeEmbeddingsConfig",
    "ModelConfig",
    "ServingDType",
    "SelfCheckFailed",
    "ServingModel",
    "ShardingType",
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
