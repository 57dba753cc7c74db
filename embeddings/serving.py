"""Serving surgery: `LargeEmbeddings` converted to torchrec's inference modules, plus what serving needs to know.

The fused engine swaps each `EmbeddingBagCollection` for torchrec's quantized inference collection
(`torchrec.inference.modules.quantize_inference_model`), which runs all of a collection's tables in one fbgemm
table-batched-embedding call, each table stored in its `serving_dtype`. The eager engine keeps the plain module,
as a reference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torchrec.inference.modules import quantize_inference_model
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .config import (
    ConfigError,
    EmbeddingBagConfig,
    Engine,
    IdPolicy,
    ModelConfig,
    ServingDType,
    ShardingType,
    Storage,
)
from .errors import SelfCheckFailed
from .large_embeddings import LargeEmbeddings, canonical_keys
from .memory import release_free_memory
from .row_directory import check_row_directory, is_row_directory, row_directory_version, row_file_path
from .table_batched import DEFAULT_CACHE_LOAD_FACTOR, RowSource, TableBatchedEmbeddings, TableStore
from .weights import checkpoint_version, init_weights, load_checkpoint, table_weights

__all__ = [
    "Engine",
    "SelfCheckFailed",
    "ServingModel",
    "build_serving_model",
    "resolve_storage",
    "serving_model_from_rows",
]

logger = logging.getLogger(__name__)

_WEIGHT_DTYPES: dict[ServingDType, torch.dtype] = {
    ServingDType.FP32: torch.float32,
    ServingDType.FP16: torch.float16,
    ServingDType.INT8: torch.qint8,
    ServingDType.INT4: torch.quint4x2,
}


@dataclasses.dataclass(frozen=True)
class ServingModel:
    """A model ready to serve: the module after surgery and the layout of its input and output.

    `keys` is the canonical key order of the input KJT and of the output columns; key `keys[i]` occupies output
    columns `offsets[i]:offsets[i + 1]`.
    """

    config: ModelConfig
    module: nn.Module
    engine: Engine
    device: torch.device
    version: str
    keys: tuple[str, ...]
    dims: tuple[int, ...]
    offsets: tuple[int, ...]
    weight_bytes: dict[str, int]
    storage: dict[str, Storage] = dataclasses.field(default_factory=dict)  # each table's; memory when absent

    @property
    def output_dim(self) -> int:
        return self.offsets[-1]

    @property
    def engine_name(self) -> str:
        return self.engine.value

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def has_weighted_tables(self) -> bool:
        """Whether the input KJT must carry weights (1.0 for the ids of unweighted tables)."""
        return any(t.weighted for t in self.config.tables)

    def table(self, key: str) -> EmbeddingBagConfig:
        """The config of the table that feature `key` looks up (one feature per table)."""
        for t in self.config.tables:
            if t.name == key:
                return t
        raise KeyError(f"no table {key!r}; the model's keys are {list(self.keys)}")

    def serving_dtype(self, key: str) -> ServingDType:
        """The type table `key`'s weights are stored in while serving: its `serving_dtype` on the fused engine,
        its training `data_type` on the eager one."""
        t = self.table(key)
        return t.effective_serving_dtype if self.engine is Engine.FUSED else ServingDType(t.data_type.value)

    def table_storage(self, key: str) -> Storage:
        """Where table `key`'s rows are served from."""
        return self.storage.get(key, Storage.MEMORY)

    def resident_bytes(self, key: str) -> int:
        """Bytes of table `key` in memory now: all of it, except for an `mmap` table, the pages in the page cache."""
        store = self._store(key)
        return store.resident_bytes() if store is not None else self.weight_bytes.get(key, 0)

    def disk_bytes(self, key: str) -> int:
        """Bytes table `key`'s row file takes on disk (0 when it is not served from one)."""
        store = self._store(key)
        return store.disk_bytes() if store is not None else 0

    def check_storage(self) -> None:
        """`StorageFailed` naming the table when a row file served in place was truncated or rewritten since it was
        mapped; run before each batch."""
        if isinstance(self.module, TableBatchedEmbeddings):
            self.module.check_files()

    def _store(self, key: str) -> TableStore | None:
        return self.module.stores.get(key) if isinstance(self.module, TableBatchedEmbeddings) else None

    def hashes_ids(self, key: str) -> bool:
        """Whether ids of `key` past the table's rows are hashed into range (`id_policy: hash`) rather than rejected."""
        return self.table(key).id_policy is IdPolicy.HASH

    @torch.inference_mode()
    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings `[batch, output_dim]` (float32, on `device`) of a KJT holding every key in `keys`."""
        pooled = self.module(features)
        if pooled.keys() != list(self.keys):  # sharded collections answer in their shards' order
            values: torch.Tensor = torch.cat([pooled[k] for k in self.keys], dim=1)
        else:
            values = pooled.values()
        return values if values.dtype == torch.float32 else values.float()

    def self_check(self) -> None:
        """One small forward touching every table (its first and last rows; weighted tables with weights) on the
        model's engine and device, so that a model which cannot compute is refused before it serves.

        Raises:
            SelfCheckFailed: naming the table whose forward fails, and the error.
        """
        try:
            self._check_forward(set(self.keys))
            return
        except Exception as err:
            whole = err
        table = self._failing_table()
        where = f"table {table!r}" if table else f"tables {', '.join(self.keys)}"
        raise SelfCheckFailed(f"self-check failed for {where}: {_one_line(whole)}") from whole

    def _failing_table(self) -> str | None:
        """The table whose submodule the failing forward was in (the eager engine has one per table), else the one
        table whose ids alone make the forward fail (the fused engine runs a collection's tables in one call)."""
        active: list[str] = []

        def enter(table: str) -> Callable[..., None]:
            return lambda *_: active.append(table)

        def leave(*_: object) -> None:
            active.pop()

        hooks = []
        for name, sub in self.module.named_modules():
            table = name.rsplit(".", 1)[-1]
            if table in self.keys:
                hooks.append(sub.register_forward_pre_hook(enter(table)))
                hooks.append(sub.register_forward_hook(leave))
        try:
            self._check_forward(set(self.keys))
        except Exception:
            if active:
                return active[-1]
        finally:
            for hook in hooks:
                hook.remove()
        failing = []
        for key in self.keys:
            try:
                self._check_forward({key})
            except Exception:
                failing.append(key)
        return failing[0] if len(failing) == 1 else None

    def _check_forward(self, touched: set[str]) -> None:
        rows = {t.name: t.num_embeddings for t in self.config.tables}
        ids = [[0, rows[k] - 1] if k in touched else [] for k in self.keys]
        values = torch.tensor([i for bag in ids for i in bag], dtype=torch.int64, device=self.device)
        lengths = torch.tensor([len(bag) for bag in ids], dtype=torch.int32, device=self.device)
        weights = torch.full_like(values, 0.5, dtype=torch.float32) if self.has_weighted_tables else None
        out = self.forward(KeyedJaggedTensor(keys=list(self.keys), values=values, lengths=lengths, weights=weights))
        if tuple(out.shape) != (1, self.output_dim):
            raise RuntimeError(f"output shape {tuple(out.shape)}, expected (1, {self.output_dim})")


def _one_line(err: Exception) -> str:
    """The error's type and the first line of its message (torch's messages run on with C++ context)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _weight_bytes(module: nn.Module, tables: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for key, tensor in module.state_dict().items():
        for name in tables:
            if key.endswith(f"embedding_bags.{name}.weight") or key.endswith(
                f"embedding_bags.{name}.weight_qscaleshift"
            ):
                sizes[name] = sizes.get(name, 0) + tensor.numel() * tensor.element_size()
    return sizes


def _release_quantization_copies(module: nn.Module) -> None:
    """Drops the per-table copies torchrec's quantized collection keeps from its conversion.

    `quantize_inference_model` leaves each table's quantized weights in `_table_name_to_quantized_weights`, next
    to the fused TBE buffer that serving reads: a second copy of every table. They are only read when a
    collection is converted again (e.g. re-sharded), which a serving model never is.
    """
    for sub in module.modules():
        if getattr(sub, "_table_name_to_quantized_weights", None) is not None:
            setattr(sub, "_table_name_to_quantized_weights", None)


def build_serving_model(
    config: ModelConfig,
    *,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    engine: Engine | str = Engine.FUSED,
    version: str | None = None,
    shard_devices: int = 1,
    sharding: ShardingType | str = ShardingType.TABLE_WISE,
    default_storage: Storage | str = Storage.MEMORY,
    cache_load_factor: float = DEFAULT_CACHE_LOAD_FACTOR,
    weights: Mapping[str, torch.Tensor] | None = None,
    copy_on_write: bool = False,
) -> ServingModel:
    """Materialises `LargeEmbeddings` on `device`, loads or initialises its weights, and applies serving surgery.

    Args:
        config: the tables.
        checkpoint: a state-dict file (`.safetensors` or a torch file); None initialises deterministically from `seed`.
        seed: the init seed when there is no checkpoint.
        device: `cpu`, `cuda` or `cuda:N`.
        engine: `fused` (torchrec quantized inference collection) or `eager` (the plain module).
        version: the version clients see; by default the checkpoint's content digest, or `init-<seed>`.
        shard_devices: more than 1 splits the tables over that many devices with torchrec's sharding (fused
            engine, int8/int4 tables): GPUs when `device` is CUDA, else shards on the CPU.
        sharding: `table_wise` or `row_wise`.
        default_storage: the storage of tables whose config names none. Tables not in `memory` are served from a
            row directory (`checkpoint` a directory of row files).
        cache_load_factor: for `managed` tables on CUDA, the share of their rows the device cache holds.
        copy_on_write: row files read in place are mapped private and writable, so that rows can be updated.
        weights: every table's float weights (`[rows, dim]`, by name), instead of a checkpoint or the init: a
            shard's slices of a model's weights (`shard_weights`); give `version` with them.
    """
    engine = Engine(engine)
    device = torch.device(device)
    storage = resolve_storage(config, default_storage)
    if checkpoint is not None and is_row_directory(checkpoint):
        return _from_row_directory(
            config,
            Path(checkpoint),
            engine=engine,
            device=device,
            version=version,
            storage=storage,
            shard_devices=shard_devices,
            cache_load_factor=cache_load_factor,
            copy_on_write=copy_on_write,
        )
    not_in_memory = [name for name, kind in storage.items() if kind is not Storage.MEMORY]
    if not_in_memory:
        raise ConfigError(
            f"table {not_in_memory[0]!r} has storage {storage[not_in_memory[0]].value}: its rows are served from a "
            "row directory; write one with `embserve export --storage mmap` or `embserve convert --storage mmap` "
            "and pass it as the checkpoint"
        )
    model = LargeEmbeddings(config, device=device)
    if weights is not None:
        with torch.no_grad():
            for name, param in table_weights(model).items():
                param.copy_(weights[name])
        version = version or "weights"
    elif checkpoint is not None:
        digest = load_checkpoint(model, checkpoint)
        version = version or checkpoint_version(checkpoint, digest)
    else:
        init_weights(model, seed)
        version = version or f"init-{seed}"
    model.eval()
    module: nn.Module = model
    if engine is Engine.FUSED:
        per_table = {t.name: _WEIGHT_DTYPES[t.effective_serving_dtype] for t in config.tables}
        module = quantize_inference_model(model, per_table_weight_dtype=per_table, output_dtype=torch.float32)
        weight_bytes = _weight_bytes(module, [t.name for t in config.tables])
        if shard_devices > 1:
            from .sharding import shard_fused_module

            module = shard_fused_module(
                module, config, devices=shard_devices, sharding=sharding, device_type=device.type
            )
        _release_quantization_copies(module)
    else:
        if shard_devices > 1:
            raise ConfigError("sharding needs the fused engine")
        if any(t.effective_serving_dtype in (ServingDType.INT8, ServingDType.INT4) for t in config.tables):
            logger.warning("eager engine serves every table in its data_type; int8/int4 serving_dtype ignored")
        weight_bytes = _weight_bytes(module, [t.name for t in config.tables])
    release_free_memory()  # the float tables and conversion temporaries
    return _serving_model(config, module, engine, device, version, weight_bytes, storage)


def _serving_model(
    config: ModelConfig,
    module: nn.Module,
    engine: Engine,
    device: torch.device,
    version: str,
    weight_bytes: dict[str, int],
    storage: dict[str, Storage],
) -> ServingModel:
    keys = canonical_keys(config)
    by_name = {t.name: t for t in config.tables}
    dims = [by_name[k].embedding_dim for k in keys]
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    return ServingModel(
        config=config,
        module=module.eval(),
        engine=engine,
        device=device,
        version=version,
        keys=tuple(keys),
        dims=tuple(dims),
        offsets=tuple(offsets),
        weight_bytes=weight_bytes,
        storage=storage,
    )


def resolve_storage(config: ModelConfig, default: Storage | str = Storage.MEMORY) -> dict[str, Storage]:
    """Each table's storage: its own, or `default`."""
    default = Storage(default)
    return {t.name: t.storage or default for t in config.tables}


def _from_row_directory(
    config: ModelConfig,
    directory: Path,
    *,
    engine: Engine,
    device: torch.device,
    version: str | None,
    storage: dict[str, Storage],
    shard_devices: int,
    cache_load_factor: float,
    copy_on_write: bool,
) -> ServingModel:
    """The fused engine over a row directory: each table read in place or loaded from its row file."""
    if engine is not Engine.FUSED:
        raise ConfigError("a row directory is served by the fused engine: its rows are in the fused engine's layout")
    if shard_devices > 1:
        raise ConfigError("a row directory is served on one device: --shard-devices needs a checkpoint file")
    check_row_directory(config, directory, {t.name: t.effective_serving_dtype for t in config.tables})
    sources: dict[str, RowSource] = {t.name: row_file_path(directory, t.name) for t in config.tables}
    return serving_model_from_rows(
        config,
        sources,
        storage=storage,
        version=version or row_directory_version(config, directory),
        device=device,
        cache_load_factor=cache_load_factor,
        copy_on_write=copy_on_write,
    )


def serving_model_from_rows(
    config: ModelConfig,
    sources: Mapping[str, RowSource],
    *,
    storage: Mapping[str, Storage],
    version: str,
    device: torch.device | str = "cpu",
    cache_load_factor: float = DEFAULT_CACHE_LOAD_FACTOR,
    map_memory: bool = False,
    copy_on_write: bool = False,
) -> ServingModel:
    """The fused engine over each table's row file (a path or an open descriptor), each in its storage;
    `map_memory`: the sources of `memory` tables are memory already, and are mapped rather than copied;
    `copy_on_write`: mapped rows are private and writable (row updates), not read-only."""
    device = torch.device(device)
    serving_dtypes = {t.name: t.effective_serving_dtype for t in config.tables}
    module = TableBatchedEmbeddings(
        config,
        sources,
        serving_dtypes=serving_dtypes,
        storage=storage,
        device=device,
        cache_load_factor=cache_load_factor,
        map_memory=map_memory,
        copy_on_write=copy_on_write,
    )
    weight_bytes = {name: store.data_bytes for name, store in module.stores.items()}
    return _serving_model(config, module, Engine.FUSED, device, version, weight_bytes, dict(storage))
