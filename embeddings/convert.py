"""Trained weights in, servable checkpoints out: read a state dict or a `torch.distributed.checkpoint` directory,
find the embedding tables in it, and write an embserve checkpoint plus the model YAML.

Inputs, none of which runs code from the file:
- a torch file (`torch.load(..., weights_only=True)`) or a `.safetensors` file holding a state dict, possibly nested
  (`{"model": {...}}`), with any key prefix: a torchrec `EmbeddingBagCollection`'s `embedding_bags.<table>.weight`,
  the seed module's `ebc.embedding_bags.<table>.weight`, or a whole model's
  `model.large_embeddings.ebc.embedding_bags.<table>.weight`;
- a DCP directory written from a sharded model (any layout of shards; tested table-wise and row-wise). Its `.metadata` is a
  pickle, read by an unpickler that admits only DCP's own metadata classes; shards are read by DCP's
  `FileSystemReader`, which loads tensors with `weights_only=True`.

Tables are inferred from the weights (name, rows, dim, data type; `weighted` where the key is in a `weighted_ebc`),
or checked against a given `ModelConfig`.

Errors: `ConvertError` (a `ValueError`), whose message names the file, key or table at fault.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import DataType, ModelConfig, model_config_from_dict
from .large_embeddings import LargeEmbeddings
from .weights import save_checkpoint, table_weights

__all__ = [
    "ConvertError",
    "TableSource",
    "convert",
    "find_tables",
    "read_dcp_metadata",
    "read_tables",
    "write_model_yaml",
]

# `<prefix><collection.>embedding_bags.<table>.weight`; `weighted_ebc` marks the seed's weighted collection.
_TABLE_KEY = re.compile(r"^(?P<collection>(?:.*\.)?)embedding_bags\.(?P<table>[^.]+)\.weight$")
_DTYPES: dict[torch.dtype, DataType] = {torch.float32: DataType.FP32, torch.float16: DataType.FP16}
# bfloat16 widens to float32 exactly; other dtypes are refused rather than silently rounded.
_WIDENED = {torch.bfloat16: torch.float32}
_OTHER_KEYS_SHOWN = 5


class ConvertError(ValueError):
    """Weights that cannot be converted; the message names the file, key or table and the problem."""


@dataclasses.dataclass(frozen=True)
class TableSource:
    """Where one table's weights are in the input: its key, shape and dtype, and whether it is weighted."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    weighted: bool


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def find_tables(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype] | None], *, source: str, ignore_other_keys: bool = False
) -> dict[str, TableSource]:
    """The tables among the keys of a state dict, by table name, in key order.

    Args:
        specs: every key with its tensor's shape and dtype (None: not a tensor).
        source: the file or directory, for messages.
        ignore_other_keys: skip keys that are not table weights (a whole model's dense layers, step counters)
            instead of failing on them.
    """
    tables: dict[str, TableSource] = {}
    others: list[str] = []
    for key, spec in specs.items():
        match = _TABLE_KEY.match(key)
        if match is None or spec is None:
            others.append(key)
            continue
        name = match["table"]
        if name in tables:
            raise ConvertError(f"{source}: table {name!r} appears twice, at {tables[name].key!r} and {key!r}")
        shape, dtype = spec
        collection = match["collection"].rstrip(".").rsplit(".", 1)[-1]
        tables[name] = TableSource(name, key, tuple(shape), dtype, weighted=collection == "weighted_ebc")
    if not tables:
        shown = ", ".join(repr(k) for k in list(specs)[:_OTHER_KEYS_SHOWN]) or "none"
        raise ConvertError(
            f"{source}: no embedding tables found: expected keys ending in 'embedding_bags.<table>.weight', "
            f"found {len(specs)} keys ({shown}{', ...' if len(specs) > _OTHER_KEYS_SHOWN else ''})"
        )
    if others and not ignore_other_keys:
        shown = ", ".join(repr(k) for k in others[:_OTHER_KEYS_SHOWN])
        raise ConvertError(
            f"{source}: {len(others)} keys are not embedding-table weights ({shown}"
            f"{', ...' if len(others) > _OTHER_KEYS_SHOWN else ''}); pass --ignore-other-keys to skip them"
        )
    for t in tables.values():
        if len(t.shape) != 2 or min(t.shape) <= 0:
            raise ConvertError(f"{source}: table {t.name!r} ({t.key!r}) has shape {list(t.shape)}, not [rows, dim]")
        if t.dtype not in _DTYPES and t.dtype not in _WIDENED:
            raise ConvertError(
                f"{source}: table {t.name!r} ({t.key!r}) has dtype {t.dtype}; expected float32, float16 or bfloat16"
            )
    return tables


# --- torch.distributed.checkpoint -------------------------------------------------------------------------------

_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch dtypes and layouts, and nothing else: a `.metadata` file that names
    any other callable is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _dcp_reader(path: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):  # type: ignore[misc]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata_file = path / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(metadata_file.read_bytes())).load()
            except Exception as err:
                raise ConvertError(f"{path}: cannot read DCP metadata: {type(err).__name__}: {err}") from None
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            if not isinstance(metadata, Metadata):
                raise ConvertError(f"{path}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
            storage_meta = metadata.storage_meta or StorageMeta()
            storage_meta.load_id = self.load_id
            metadata.storage_meta = storage_meta
            return metadata

    return SafeReader(str(path))


def read_dcp_metadata(path: str | Path) -> Any:
    """A DCP directory's `Metadata` (keys, sizes, dtypes and shard layout), read without running code."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ConvertError(f"{path}: a directory without a .metadata file is not a torch.distributed.checkpoint")
    return _dcp_reader(path).read_metadata()


def _check_chunks(path: Path, key: str, size: tuple[int, ...], chunks: list[Any]) -> None:
    """The shards of one tensor must tile it exactly: inside its bounds, not overlapping, covering every element."""
    boxes = [(tuple(int(x) for x in c.offsets), tuple(int(x) for x in c.sizes)) for c in chunks]
    for off, sz in boxes:
        if len(off) != len(size) or any(o < 0 or o + s > n for o, s, n in zip(off, sz, size)):
            raise ConvertError(f"{path}: {key!r}: shard at offsets {list(off)} sizes {list(sz)} is outside {list(size)}")
    for i, (a_off, a_sz) in enumerate(boxes):
        for b_off, b_sz in boxes[i + 1 :]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_sz, b_off, b_sz)):
                raise ConvertError(f"{path}: {key!r}: shards at offsets {list(a_off)} and {list(b_off)} overlap")
    covered = sum(int(torch.Size(sz).numel()) for _, sz in boxes)
    if covered != int(torch.Size(size).numel()):
        raise ConvertError(f"{path}: {key!r}: shards cover {covered} of {torch.Size(size).numel()} elements")


def _read_dcp(path: Path, ignore_other_keys: bool) -> tuple[dict[str, TableSource], dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(path)
    entries = metadata.state_dict_metadata
    # The saving ranks' key order is not meaningful: tables are listed in key order (a --model config sets the order).
    specs = {
        k: (tuple(int(x) for x in v.size), v.properties.dtype) if isinstance(v, TensorStorageMetadata) else None
        for k, v in sorted(entries.items())
    }
    tables = find_tables(specs, source=str(path), ignore_other_keys=ignore_other_keys)
    for t in tables.values():
        _check_chunks(path, t.key, t.shape, entries[t.key].chunks)
    state = {t.key: torch.empty(t.shape, dtype=t.dtype) for t in tables.values()}
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(state, storage_reader=_dcp_reader(path), no_dist=True)
    except ConvertError:
        raise
    except Exception as err:
        raise ConvertError(f"{path}: cannot read the DCP shards: {type(err).__name__}: {err}") from None
    return tables, {t.name: state[t.key] for t in tables.values()}


# --- state-dict files ------------------------------------------------------------------------------------------


def _read_file(path: Path, ignore_other_keys: bool) -> tuple[dict[str, TableSource], dict[str, torch.Tensor]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # an untrusted file's parse failure is reported, never propagated raw
        raise ConvertError(f"{path}: cannot read weights: {type(err).__name__}: {err}") from None
    if not isinstance(state, Mapping):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, not a state dict")
    flat = _flatten(state)
    specs = {
        k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) and v.layout == torch.strided else None
        for k, v in flat.items()
    }
    tables = find_tables(specs, source=str(path), ignore_other_keys=ignore_other_keys)
    return tables, {t.name: flat[t.key] for t in tables.values()}


def read_tables(source: str | Path, *, ignore_other_keys: bool = False) -> tuple[dict[str, TableSource], dict[str, torch.Tensor]]:
    """Reads the full tables from a state-dict file or a DCP directory: `(sources, weights)` by table name.

    Raises:
        ConvertError: unreadable input, no tables, unknown keys (unless `ignore_other_keys`), a bad shape or dtype,
            shards that do not tile a table, non-finite weights.
    """
    path = Path(source)
    if path.is_dir():
        tables, weights = _read_dcp(path, ignore_other_keys)
    elif path.is_file():
        tables, weights = _read_file(path, ignore_other_keys)
    else:
        raise ConvertError(f"{path}: no such file or directory")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype in _WIDENED:
            tensor = tensor.to(_WIDENED[tensor.dtype])
        if not bool(torch.isfinite(tensor).all()):
            raise ConvertError(f"{path}: table {name!r} ({tables[name].key!r}) has non-finite weights")
        out[name] = tensor.contiguous()
    return tables, out


def _infer_config(tables: Mapping[str, TableSource], weights: Mapping[str, torch.Tensor], name: str) -> ModelConfig:
    return model_config_from_dict(
        {
            "name": name,
            "tables": [
                {
                    "name": t.name,
                    "num_embeddings": t.shape[0],
                    "embedding_dim": t.shape[1],
                    "data_type": _DTYPES[weights[t.name].dtype].value,
                    "weighted": t.weighted,
                }
                for t in tables.values()
            ],
        },
        source="inferred tables",
    )


def _check_config(config: ModelConfig, tables: Mapping[str, TableSource], source: str) -> None:
    missing = [t.name for t in config.tables if t.name not in tables]
    extra = [n for n in tables if n not in set(config.table_names)]
    if missing or extra:
        raise ConvertError(
            f"{source}: tables do not match the model config: "
            + "; ".join(
                part
                for part in (
                    f"missing from the weights: {missing}" if missing else "",
                    f"not in the model config: {extra}" if extra else "",
                )
                if part
            )
        )
    for t in config.tables:
        shape = tables[t.name].shape
        if shape != (t.num_embeddings, t.embedding_dim):
            raise ConvertError(
                f"{source}: table {t.name!r}: weights are {shape[0]} x {shape[1]}, "
                f"the model config says {t.num_embeddings} x {t.embedding_dim}"
            )


def write_model_yaml(config: ModelConfig, path: str | Path) -> None:
    """Writes a model config as YAML that `load_model_config` reads back unchanged."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))


@torch.no_grad()
def convert(
    source: str | Path,
    output: str | Path,
    *,
    model: ModelConfig | None = None,
    name: str | None = None,
    model_yaml: str | Path | None = None,
    ignore_other_keys: bool = False,
) -> ModelConfig:
    """Converts trained weights into an embserve checkpoint (seed keys) and, optionally, its model YAML.

    Args:
        source: a state-dict file (torch or safetensors) or a DCP directory.
        output: the checkpoint to write (`.safetensors`, or a torch file for any other suffix).
        model: a model config to check the weights against (names and shapes) and to write; None: inferred.
        name: the model name when inferred (default: the output file's stem).
        model_yaml: where to write the model config; None: not written.
        ignore_other_keys: skip keys that are not table weights instead of failing.

    Returns:
        The model config the checkpoint serves with.
    """
    tables, weights = read_tables(source, ignore_other_keys=ignore_other_keys)
    if model is None:
        model = _infer_config(tables, weights, name or Path(output).stem)
    else:
        _check_config(model, tables, str(source))
    module = LargeEmbeddings(model, device="cpu")
    for table, param in table_weights(module).items():
        param.copy_(weights[table])
    save_checkpoint(module, output)
    if model_yaml is not None:
        write_model_yaml(model, model_yaml)
    return model

