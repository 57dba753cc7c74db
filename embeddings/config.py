"""Typed model configuration: the seed's `LargeEmbeddingsConfig` plus the fields serving needs.

The field names, types and `extra="forbid"` strictness follow the-algorithm-ml's
`common/modules/embedding/config.py`, so a seed config loads unchanged. Serving adds, per table, `weighted`,
`serving_dtype` and `id_policy`, and, at the top level, the model's `name`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pydantic
import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "DataType",
    "EmbeddingBagConfig",
    "EmbeddingSnapshot",
    "Engine",
    "IdPolicy",
    "LargeEmbeddingsConfig",
    "ModelConfig",
    "ServingDType",
    "ShardingType",
    "Storage",
    "builtin_model_names",
    "canonical_keys",
    "load_model_config",
    "model_config_from_dict",
]

_CONFIG_DIR = Path(__file__).parent / "configs"


@enum.unique
class DataType(str, enum.Enum):
    """The table's training data type (the seed's `DataType`)."""

    FP32 = "fp32"
    FP16 = "fp16"


@enum.unique
class ServingDType(str, enum.Enum):
    """The weight type a table is stored in for serving."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


@enum.unique
class Storage(str, enum.Enum):
    """Where a table's rows are served from.

    MEMORY: in memory (read whole at start-up). MMAP: its row file, memory-mapped read-only and read in place: only
    the pages of rows that lookups touch become resident, and the page cache is shared by every process serving it
    (CPU). MANAGED: fbgemm's managed caching on CUDA: rows in host memory, a cache of the hot ones on the device.
    """

    MEMORY = "memory"
    MMAP = "mmap"
    MANAGED = "managed"


@enum.unique
class Engine(str, enum.Enum):
    """How the forward runs: torchrec's fused quantized inference collection, or the plain module."""

    FUSED = "fused"
    EAGER = "eager"


@enum.unique
class ShardingType(str, enum.Enum):
    """How tables are split over several devices: each table whole on one device, or each table's rows split."""

    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"


@enum.unique
class IdPolicy(str, enum.Enum):
    """What happens to an id outside `[0, num_embeddings)`: rejected, or hashed into range (`id mod rows`)."""

    REJECT = "reject"
    HASH = "hash"


class _StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class EmbeddingSnapshot(_StrictModel):
    """Reference to a pretrained snapshot of one table (the seed's field; recorded, not fetched, by the server)."""

    emb_name: str | None = None
    embedding_snapshot_uri: str | None = None


class EmbeddingBagConfig(_StrictModel):
    """One embedding table; the seed makes one torchrec feature per table, named after it."""

    name: str
    num_embeddings: int = pydantic.Field(gt=0)
    embedding_dim: int = pydantic.Field(gt=0)
    data_type: DataType = DataType.FP32
    pretrained: EmbeddingSnapshot | None = None
    vocab: str | None = None
    optimizer: dict[str, Any] | None = None  # the seed's training optimizer: accepted, unused for serving
    weighted: bool = False
    serving_dtype: ServingDType | None = None  # None: the table's data_type
    id_policy: IdPolicy = IdPolicy.REJECT
    storage: Storage | None = None  # None: the server's default (`--storage`, memory unless set)

    @pydantic.field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not value or not value.replace("_", "a").replace("-", "a").isalnum() or not value.isascii():
            raise ValueError(f"table name {value!r} must be non-empty ASCII letters, digits, '_' or '-'")
        return value

    @property
    def effective_serving_dtype(self) -> ServingDType:
        if self.serving_dtype is not None:
            return self.serving_dtype
        return ServingDType.FP16 if self.data_type is DataType.FP16 else ServingDType.FP32


class LargeEmbeddingsConfig(_StrictModel):
    """The seed's embedding config: the tables, and which of them to log."""

    tables: list[EmbeddingBagConfig] = pydantic.Field(min_length=1)
    tables_to_log: list[str] | None = None

    @pydantic.model_validator(mode="after")
    def _check_names(self) -> LargeEmbeddingsConfig:
        seen: set[str] = set()
        for table in self.tables:
            if table.name in seen:
                raise ValueError(f"duplicate table name {table.name!r}")
            seen.add(table.name)
        for name in self.tables_to_log or []:
            if name not in seen:
                raise ValueError(f"tables_to_log names unknown table {name!r}; tables are {sorted(seen)}")
        return self


class ModelConfig(LargeEmbeddingsConfig):
    """A served model: the seed's config plus the name clients see."""

    name: str = "model"

    @property
    def table_names(self) -> list[str]:
        return [t.name for t in self.tables]

    @property
    def output_dim(self) -> int:
        return sum(t.embedding_dim for t in self.tables)


def canonical_keys(config: LargeEmbeddingsConfig) -> list[str]:
    """The key order `LargeEmbeddings.forward` expects and returns: unweighted tables, then weighted tables,
    each in config order (the plain config order when no table is weighted)."""
    return [t.name for t in config.tables if not t.weighted] + [t.name for t in config.tables if t.weighted]


def builtin_model_names() -> list[str]:
    """Names of the model configs shipped with embserve (`default`, `twhin_local`, ...)."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.yaml"))


def _format_errors(err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else str(e["msg"]))
    return "; ".join(parts)


def model_config_from_dict(data: Any, *, source: str = "<dict>") -> ModelConfig:
    """Validates a parsed mapping as a `ModelConfig`; raises `ConfigError` naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a model config must be a mapping, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Loads a model config from a YAML file, or a built-in one by name (see `builtin_model_names`)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in builtin_model_names():
        path = _CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"model config {str(name_or_path)!r} is neither a file nor a built-in model "
            f"({', '.join(builtin_model_names())})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and "name" not in data:
        data = {**data, "name": path.stem}
    return model_config_from_dict(data, source=str(path))
