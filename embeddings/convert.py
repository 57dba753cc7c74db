"""Trained weights in, servable checkpoints out: read a state dict or a `torch.distributed.checkpoint` directory,
find the embedding tables in it, and write an embserve checkpoint plus the model YAML.

Inputs, none of which runs code from the file:
- a torch file (`torch.load(..., weights_only=True)`) or a `.safetensors` file holding a state dict, possibly nested
  (`{"model": {...}}`), with any key prefix: a torchrec `EmbeddingBagCollection`'s `embedding_bags.<table>.weight`,
  the seed module's `ebc.embedding_bags.<table>.weight`, or a whole model's
  `model.large_embeddings.ebc.embedding_bags.<table>.weight`;
- a DCP directory written from a sharded model (any layout of shards; tested table-wise, row-wise and column-wise).
  Its `.metadata` is a pickle, read by an unpickler that admits only DCP's own metadata classes; shards are read by
  DCP's `FileSystemReader`, which loads tensors with `weights_only=True`.

Tables are inferred from the weights (name, rows, dim, data type; `weighted` where the key is in a `weighted_ebc`),
or checked against a given `ModelConfig`.

The table order is the order of the served columns, so it is never guessed: it is the training config's (`model`),
an explicit `order`, or the source's own key order where that is known to be the training order (a torch file's
state dict; a DCP directory's recorded state-dict order). A source whose order cannot be known (a safetensors file,
which keeps none; keys in sorted order, which is what torchrec's `DistributedModelParallel.state_dict()` gives
whatever the model's order) is refused without `model` or `order`. Likewise a table is stored in a data type other
than its weights' only when `cast` asks for it.

Errors: `ConvertError` (a `ValueError`), whose message names the file, key or table at fault; nothing else escapes
`convert`, including DCP's `CheckpointException` (a `BaseException`).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import DataType, ModelConfig, Storage, load_model_config, model_config_from_dict
from .errors import ConfigError, ConvertError
from .large_embeddings import LargeEmbeddings
from .row_directory import MODEL_FILE, write_row_directory
from .weights import CheckpointError, checkpoint_digest, checkpoint_version, save_checkpoint, table_weights

__all__ = [
    "Conversion",
    "ConvertError",
    "SourceTables",
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
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16}
_OTHER_KEYS_SHOWN = 5
_SORTED_ORDER = (
    "its table keys are in sorted order, which is what torchrec's DistributedModelParallel.state_dict() gives "
    "whatever the model's order"
)


@dataclasses.dataclass(frozen=True)
class TableSource:
    """Where one table's weights are in the input: its key, shape and dtype, and whether it is weighted."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    weighted: bool


@dataclasses.dataclass(frozen=True)
class SourceTables:
    """The full tables of a source, by name in the source's key order, and whether that order is the training order.

    `order_unknown` says why the key order cannot be taken for the training order; None: it can.
    """

    sources: dict[str, TableSource]
    weights: dict[str, torch.Tensor]
    order_unknown: str | None = None


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert` wrote: the model config it serves with, the version clients will see, where the table order
    came from, and the tables stored in another type than their weights' (table -> the weights' type)."""

    config: ModelConfig
    version: str
    order_from: str
    casts: dict[str, str]


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
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _dcp_reader(path: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata_file = path / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(metadata_file.read_bytes())).load()
            except Exception as err:
                raise ConvertError(f"{metadata_file}: cannot read DCP metadata: {_one_line(err)}") from None
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
            raise ConvertError(
                f"{path}: {key!r}: shard at offsets {list(off)} sizes {list(sz)} is outside {list(size)}"
            )
    for i, (a_off, a_sz) in enumerate(boxes):
        for b_off, b_sz in boxes[i + 1 :]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_sz, b_off, b_sz)):
                raise ConvertError(f"{path}: {key!r}: shards at offsets {list(a_off)} and {list(b_off)} overlap")
    covered = sum(int(torch.Size(sz).numel()) for _, sz in boxes)
    if covered != int(torch.Size(size).numel()):
        raise ConvertError(f"{path}: {key!r}: shards cover {covered} of {torch.Size(size).numel()} elements")


def _check_shard_files(path: Path, metadata: Any, keys: set[str]) -> None:
    """Every shard file the tables need is there and long enough, so that a missing or truncated file is named
    before DCP reads anything."""
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if getattr(index, "fqn", None) not in keys or not hasattr(info, "relative_path"):
            continue
        file = path / info.relative_path
        if not file.is_file():
            raise ConvertError(f"{file}: shard file missing (it holds a shard of {index.fqn!r})")
        size, end = file.stat().st_size, int(info.offset) + int(info.length)
        if size < end:
            raise ConvertError(
                f"{file}: shard file truncated: {size} bytes, but a shard of {index.fqn!r} ends at byte {end}"
            )


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _checkpoint_failure(err: BaseException) -> BaseException:
    """The error behind DCP's `CheckpointException`, which wraps each rank's error with its traceback."""
    for inner, _ in getattr(err, "failures", {}).values():
        return _checkpoint_failure(inner)
    return err


def _read_dcp(path: Path, ignore_other_keys: bool) -> SourceTables:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    metadata = read_dcp_metadata(path)
    entries = metadata.state_dict_metadata
    # `state_dict_metadata` lists keys rank by rank as the ranks wrote them; the saved state dict's own key order is
    # in `planner_data` (the default planner's flattening map, whose insertion order is the state dict's).
    planner_data = getattr(metadata, "planner_data", None)
    recorded = planner_data if isinstance(planner_data, Mapping) else {}
    keys = [k for k in recorded if k in entries] + [k for k in entries if k not in recorded]
    specs = {
        k: (tuple(int(x) for x in entries[k].size), entries[k].properties.dtype)
        if isinstance(entries[k], TensorStorageMetadata)
        else None
        for k in keys
    }
    tables = find_tables(specs, source=str(path), ignore_other_keys=ignore_other_keys)
    unrecorded = [t.name for t in tables.values() if t.key not in recorded]
    order_unknown = (
        f"its metadata records no state-dict order for {unrecorded} (saved without DCP's default planner)"
        if unrecorded
        else None
    )
    for t in tables.values():
        _check_chunks(path, t.key, t.shape, entries[t.key].chunks)
    _check_shard_files(path, metadata, {t.key for t in tables.values()})
    state = {t.key: torch.empty(t.shape, dtype=t.dtype) for t in tables.values()}
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(state, storage_reader=_dcp_reader(path), no_dist=True)
    except ConvertError:
        raise
    except (Exception, CheckpointException) as err:
        cause = _checkpoint_failure(err)
        if isinstance(cause, ConvertError):
            raise cause from None
        if not isinstance(cause, Exception):  # KeyboardInterrupt and the like, wrapped by DCP
            raise cause from None
        raise ConvertError(f"{path}: cannot read the DCP shards: {_one_line(cause)}") from None
    return SourceTables(tables, {t.name: state[t.key] for t in tables.values()}, order_unknown)


# --- state-dict files ------------------------------------------------------------------------------------------


def _read_file(path: Path, ignore_other_keys: bool) -> SourceTables:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # an untrusted file's parse failure is reported, never propagated raw
        raise ConvertError(f"{path}: cannot read weights: {_one_line(err)}") from None
    if not isinstance(state, Mapping):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, not a state dict")
    flat = _flatten(state)
    specs = {
        k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) and v.layout == torch.strided else None
        for k, v in flat.items()
    }
    tables = find_tables(specs, source=str(path), ignore_other_keys=ignore_other_keys)
    # safetensors writes its header in an order of its own (by dtype, then name), not the state dict's.
    order_unknown = "a safetensors file keeps no key order" if path.suffix == ".safetensors" else None
    return SourceTables(tables, {t.name: flat[t.key] for t in tables.values()}, order_unknown)


def read_tables(source: str | Path, *, ignore_other_keys: bool = False) -> SourceTables:
    """Reads the full tables from a state-dict file or a DCP directory, in the source's key order, with why that
    order cannot be taken for the training order where it cannot (see the module docstring).

    Raises:
        ConvertError: unreadable input (a missing, truncated or unreadable file, metadata or shard), no tables,
            unknown keys (unless `ignore_other_keys`), a bad shape or dtype, shards that do not tile a table,
            non-finite weights.
    """
    path = Path(source)
    if path.is_dir():
        read = _read_dcp(path, ignore_other_keys)
    elif path.is_file():
        read = _read_file(path, ignore_other_keys)
    else:
        raise ConvertError(f"{path}: no such file or directory")
    tables = read.sources
    out: dict[str, torch.Tensor] = {}
    for name, tensor in read.weights.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype in _WIDENED:
            tensor = tensor.to(_WIDENED[tensor.dtype])
        if not bool(torch.isfinite(tensor).all()):
            raise ConvertError(f"{path}: table {name!r} ({tables[name].key!r}) has non-finite weights")
        out[name] = tensor.contiguous()
    order_unknown = read.order_unknown
    keys = [t.key for t in tables.values()]
    if order_unknown is None and len(keys) > 1 and keys == sorted(keys):
        order_unknown = _SORTED_ORDER
    return SourceTables(tables, out, order_unknown)


def _infer_config(
    tables: Mapping[str, TableSource], dtypes: Mapping[str, DataType], name: str, source: str
) -> ModelConfig:
    try:
        return model_config_from_dict(
            {
                "name": name,
                "tables": [
                    {
                        "name": t.name,
                        "num_embeddings": t.shape[0],
                        "embedding_dim": t.shape[1],
                        "data_type": dtypes[t.name].value,
                        "weighted": t.weighted,
                    }
                    for t in tables.values()
                ],
            },
            source=f"{source}: inferred tables",
        )
    except ConfigError as err:
        raise ConvertError(str(err)) from None


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


def _check_casts(
    model: ModelConfig, weights: Mapping[str, DataType], casts: Mapping[str, DataType], source: str
) -> None:
    """A model config may store a table in another type than its weights' only where `casts` asks for that type."""
    for t in model.tables:
        asked = casts.get(t.name)
        if asked is not None and asked is not t.data_type:
            raise ConvertError(
                f"{source}: table {t.name!r}: --cast asks for {asked.value}, the model config says {t.data_type.value}"
            )
        if asked is None and t.data_type is not weights[t.name]:
            how = "narrows every weight" if t.data_type is DataType.FP16 else "widens every weight"
            raise ConvertError(
                f"{source}: table {t.name!r}: the weights are {weights[t.name].value} but the model config says "
                f"{t.data_type.value}; pass --cast {t.name}={t.data_type.value} to convert them (it {how}), "
                f"or make the config say {weights[t.name].value}"
            )


def _ordered(tables: Mapping[str, TableSource], order: Sequence[str], source: str) -> dict[str, TableSource]:
    missing = [n for n in tables if n not in order]
    unknown = [n for n in order if n not in tables]
    repeated = sorted({n for n in order if list(order).count(n) > 1})
    if missing or unknown or repeated:
        raise ConvertError(
            f"{source}: the table order must name every table once: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"not in the weights {unknown}" if unknown else "",
                    f"named twice {repeated}" if repeated else "",
                )
                if part
            )
        )
    return {n: tables[n] for n in order}


def _data_types(
    casts: Mapping[str, DataType | str] | None, tables: Mapping[str, TableSource], source: str
) -> dict[str, DataType]:
    out: dict[str, DataType] = {}
    for table, dtype in (casts or {}).items():
        if table not in tables:
            raise ConvertError(
                f"{source}: --cast names table {table!r}, which is not in the weights ({', '.join(tables)})"
            )
        try:
            out[table] = DataType(dtype)
        except ValueError:
            choices = ", ".join(d.value for d in DataType)
            raise ConvertError(f"{source}: --cast {table}={dtype}: not a data type ({choices})") from None
    return out


def _check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ConvertError(f"{path}: cannot write: folder {str(folder)!r} does not exist")


def write_model_yaml(config: ModelConfig, path: str | Path) -> None:
    """Writes a model config as YAML that `load_model_config` reads back unchanged."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))


@torch.no_grad()
def convert(
    source: str | Path,
    output: str | Path,
    *,
    model: ModelConfig | None = None,
    order: Sequence[str] | None = None,
    cast: Mapping[str, DataType | str] | None = None,
    name: str | None = None,
    model_yaml: str | Path | None = None,
    ignore_other_keys: bool = False,
    storage: Storage | str | None = None,
) -> Conversion:
    """Converts trained weights into an embserve checkpoint (seed keys) and, optionally, its model YAML.

    Args:
        source: a state-dict file (torch or safetensors) or a DCP directory.
        output: the checkpoint to write (`.safetensors`, or a torch file for any other suffix).
        model: the training config: the weights are checked against it (names, shapes and data types) and it is
            written, in its table order; None: inferred.
        order: the table order of an inferred config (every table once); None: the source's key order, where that
            is known to be the training order (see the module docstring).
        cast: table -> data type (`fp32`, `fp16`) to store the table in, where that is not its weights' type.
        name: the model name when inferred (default: the output file's stem).
        model_yaml: where to write the model config; None: not written (with `storage`: always written, in the
            row directory, unless given).
        ignore_other_keys: skip keys that are not table weights instead of failing.
        storage: write a row directory at `output` instead of a checkpoint file, each table's rows in its serving
            dtype, and record this storage for every table in the model config it writes there.

    Returns:
        What was written: the model config, the version clients will see, where the table order came from, and
        the tables stored in another type than their weights'.

    Raises:
        ConvertError: the message names the file, key or table; nothing is written on any error found before the
            checkpoint is.
    """
    src, output = str(source), Path(output)
    _check_writable(output)
    if model_yaml is not None:
        _check_writable(Path(model_yaml))
    if model is not None and order is not None:
        raise ConvertError(f"{src}: the table order comes from the model config or from --order, not both")
    read = read_tables(source, ignore_other_keys=ignore_other_keys)
    tables, weights = read.sources, read.weights
    casts = _data_types(cast, tables, src)
    weight_types = {n: _DTYPES[w.dtype] for n, w in weights.items()}
    if model is not None:
        _check_config(model, tables, src)
        _check_casts(model, weight_types, casts, src)
        order_from = "the model config"
    else:
        if order is not None:
            tables = _ordered(tables, order, src)
            order_from = "--order"
        elif len(tables) == 1:
            order_from = "a single table"
        elif read.order_unknown is not None:
            raise ConvertError(
                f"{src}: cannot tell the training order of its {len(tables)} tables: {read.order_unknown}; the "
                f"table order is the response's column order, so give it: --model <the training config> or "
                f"--order <table,...> (tables found: {', '.join(sorted(tables))})"
            )
        else:
            order_from = "the checkpoint's key order"
        model = _infer_config(tables, {n: casts.get(n, weight_types[n]) for n in tables}, name or output.stem, src)
    if storage is not None:
        return _convert_to_rows(model, weights, output, Storage(storage), model_yaml, order_from, tables, src)
    module = LargeEmbeddings(model, device="cpu")
    for table, param in table_weights(module).items():
        param.copy_(weights[table])
    try:
        save_checkpoint(module, output)
        if model_yaml is not None:
            write_model_yaml(model, model_yaml)
        version = checkpoint_version(output, checkpoint_digest(output))
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    except OSError as err:
        raise ConvertError(f"{err.filename or output}: cannot write: {err.strerror or err}") from None
    stored = {t.name: t.data_type.value for t in model.tables}
    origin = {n: _DTYPE_NAMES[t.dtype] for n, t in tables.items()}
    return Conversion(
        config=model,
        version=version,
        order_from=order_from,
        casts={n: origin[n] for n in model.table_names if origin[n] != stored[n]},
    )


def _convert_to_rows(
    model: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    output: Path,
    storage: Storage,
    model_yaml: str | Path | None,
    order_from: str,
    tables: Mapping[str, TableSource],
    source: str,
) -> Conversion:
    """A row directory at `output`: each table in its serving dtype, from its weights in the model's data type."""
    stored = {t.name: t.data_type for t in model.tables}
    typed = {name: weights[name].to(_TORCH_DTYPES[stored[name]]) for name in model.table_names}
    try:
        version = write_row_directory(model, typed, output, source=f"converted from {source}", storage=storage)
        if model_yaml is not None:
            write_model_yaml(load_model_config(output / MODEL_FILE), model_yaml)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    except OSError as err:
        raise ConvertError(f"{err.filename or output}: cannot write: {err.strerror or err}") from None
    origin = {n: _DTYPE_NAMES[t.dtype] for n, t in tables.items()}
    return Conversion(
        config=load_model_config(output / MODEL_FILE),
        version=version,
        order_from=order_from,
        casts={n: origin[n] for n in model.table_names if origin[n] != stored[n].value},
    )
