"""The model side's exceptions. Each message names the file, field, key or table at fault. Torch-free.

EmbeddingsError
├── ConfigError       (ValueError)    a model config is invalid
├── CheckpointError   (ValueError)    a weights file cannot be read, or does not fit the model
├── ConvertError      (ValueError)    trained weights cannot be converted
└── SelfCheckFailed   (RuntimeError)  a built model cannot compute
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "ConvertError", "EmbeddingsError", "SelfCheckFailed", "StorageFailed"]


class EmbeddingsError(Exception):
    """Base of every error of the model side."""


class ConfigError(EmbeddingsError, ValueError):
    """A model configuration is invalid; the message names the offending field or table."""


class CheckpointError(EmbeddingsError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the table or file."""


class ConvertError(EmbeddingsError, ValueError):
    """Weights that cannot be converted; the message names the file, key or table and the problem."""


class SelfCheckFailed(EmbeddingsError, RuntimeError):
    """A built model cannot compute; the message names the table and the error."""


class StorageFailed(EmbeddingsError, RuntimeError):
    """A table's row file was truncated or rewritten in place while it was served; the message names the table."""
