"""The model side's exceptions. Each message names the file, field, key or table at fault. Torch-free.

EmbeddingsError
├── ConfigError       (ValueError)    a model config is invalid
│   └── PlanError                     a sharding plan is invalid, or does not fit the model
├── CheckpointError   (ValueError)    a weights file cannot be read, or does not fit the model
├── ConvertError      (ValueError)    trained weights cannot be converted
├── SelfCheckFailed   (RuntimeError)  a built model cannot compute
├── StorageFailed     (RuntimeError)  a row file changed under the server
└── UpdateRefused     (ValueError)    a row update does not fit the table (nothing of it applied)
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvertError",
    "EmbeddingsError",
    "PlanError",
    "SelfCheckFailed",
    "StorageFailed",
    "UpdateRefused",
]


class EmbeddingsError(Exception):
    """Base of every error of the model side."""


class ConfigError(EmbeddingsError, ValueError):
    """A model configuration is invalid; the message names the offending field or table."""


class PlanError(ConfigError):
    """A sharding plan is invalid or does not fit the model; the message names the table or shard."""


class CheckpointError(EmbeddingsError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the table or file."""


class ConvertError(EmbeddingsError, ValueError):
    """Weights that cannot be converted; the message names the file, key or table and the problem."""


class SelfCheckFailed(EmbeddingsError, RuntimeError):
    """A built model cannot compute; the message names the table and the error."""


class StorageFailed(EmbeddingsError, RuntimeError):
    """A table's row file was truncated or rewritten in place while it was served; the message names the table."""


class UpdateRefused(EmbeddingsError, ValueError):
    """A row update that cannot be applied (unknown table, id out of range, wrong row width, non-finite values, a
    table that cannot be written); the message names the table and the problem, and nothing of it was applied."""
