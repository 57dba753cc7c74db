"""Row updates: checking an update against its table, encoding its rows as the table stores them, and writing them
into the weights a serving model reads.

An update replaces whole rows of one table. Its rows arrive as float32 values (converted as the checkpoint loader
converts: fp16 by rounding, int8/int4 quantized row-wise with fbgemm's own operator, as `encode_rows` does for row
files) or as the table's stored bytes. Everything is checked before anything is written; `RowWriter.write` then
copies the encoded rows into the weights in one indexed copy per update, which the server runs between two batches,
so a forward sees each row entirely before or entirely after an update.

Writable weights: the fused engine's host buffers (a `memory` table's own copy), the private copy-on-write mappings
of row files and shared memory files (`mmap` tables, `--workers`; see `host_region`), device memory on CUDA, and
the eager engine's parameters. Not writable: fbgemm's managed caching (the device cache would keep stale rows),
tables sharded over several devices, and row files mapped read-only (a server started without updates).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .config import EmbeddingBagConfig, Engine, ServingDType, Storage
from .delta_log import RowFormat
from .errors import UpdateRefused
from .row_files import SCALE_BIAS_BYTES, encode_rows
from .serving import ServingModel
from .table_batched import TableBatchedEmbeddings

__all__ = ["EncodedRows", "RowFormat", "RowWriter", "check_rows", "wire_row_bytes"]

_FLOAT_TYPES: dict[ServingDType, np.dtype[Any]] = {
    ServingDType.FP32: np.dtype("<f4"),
    ServingDType.FP16: np.dtype("<f2"),
}
_BITS = {ServingDType.INT8: 8, ServingDType.INT4: 4}


def wire_row_bytes(table: EmbeddingBagConfig, dtype: ServingDType, row_format: RowFormat) -> int:
    """Bytes of one row of `table` in an update: float32 values, or the stored row without its alignment padding
    (fp32/fp16 values; int8/int4: fp16 scale and bias, then the codes)."""
    dim = table.embedding_dim
    if row_format is RowFormat.FLOAT32:
        return 4 * dim
    if dtype in _FLOAT_TYPES:
        return int(_FLOAT_TYPES[dtype].itemsize) * dim
    return SCALE_BIAS_BYTES + (dim * _BITS[dtype] + 7) // 8


def check_rows(
    table: EmbeddingBagConfig,
    dtype: ServingDType,
    ids: bytes | np.ndarray,
    rows: bytes | np.ndarray,
    row_format: RowFormat,
    *,
    max_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The update's ids (`int64 [n]`) and rows (`uint8 [n, row bytes]`) after every check.

    Raises:
        UpdateRefused: naming the table and the problem: no ids, too many, an id out of range or repeated, rows of
            the wrong size, non-finite values.
    """
    name = table.name
    id_array = np.frombuffer(ids, dtype="<i8") if isinstance(ids, (bytes, bytearray, memoryview)) else ids
    if isinstance(ids, (bytes, bytearray, memoryview)) and len(ids) % 8:
        raise UpdateRefused(f"table {name!r}: ids must be int64 (8 bytes each), got {len(ids)} bytes")
    n = len(id_array)
    if n == 0:
        raise UpdateRefused(f"table {name!r}: an update needs at least one id")
    if n > max_rows:
        raise UpdateRefused(f"table {name!r}: {n} rows in one update, over the server's limit of {max_rows}; split it")
    low, high = int(id_array.min()), int(id_array.max())
    if low < 0 or high >= table.num_embeddings:
        bad = low if low < 0 else high
        raise UpdateRefused(f"table {name!r}: id {bad} is outside its rows [0, {table.num_embeddings})")
    unique = np.unique(id_array)
    if len(unique) != n:
        sorted_ids = np.sort(id_array)
        twice = int(sorted_ids[np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])[0]])
        raise UpdateRefused(f"table {name!r}: id {twice} appears more than once in one update")
    width = wire_row_bytes(table, dtype, row_format)
    raw = np.frombuffer(rows, dtype=np.uint8) if not isinstance(rows, np.ndarray) else rows.reshape(-1).view(np.uint8)
    if raw.size != n * width:
        what = "float32 values" if row_format is RowFormat.FLOAT32 else f"{dtype.value} rows"
        raise UpdateRefused(
            f"table {name!r}: {n} ids need {n * width} bytes of {what} ({width} per row, dim "
            f"{table.embedding_dim}), got {raw.size}"
        )
    matrix = raw.reshape(n, width)
    _check_finite(name, dtype, row_format, matrix)
    return id_array.astype(np.int64, copy=False), matrix


def _check_finite(name: str, dtype: ServingDType, row_format: RowFormat, matrix: np.ndarray) -> None:
    if row_format is RowFormat.FLOAT32:
        values = matrix.view("<f4")
    elif dtype in _FLOAT_TYPES:
        values = matrix.view(_FLOAT_TYPES[dtype])
    else:
        values = np.ascontiguousarray(matrix[:, :SCALE_BIAS_BYTES]).view("<f2")
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        what = (
            "scale or bias" if values.shape[1] == 2 and dtype in _BITS and row_format is RowFormat.SERVING else "values"
        )
        raise UpdateRefused(f"table {name!r}: row {row} of the update has non-finite {what} (NaN or infinity)")


@dataclasses.dataclass(frozen=True)
class EncodedRows:
    """An update's rows as its table stores them, ready to be written: `ids` on the weights' device and `rows` in
    the weights' element type and row width."""

    table: str
    ids: torch.Tensor
    rows: torch.Tensor


class RowWriter:
    """Writes updated rows into a serving model's weights.

    Args:
        model: the model whose weights are written (its module's buffers and parameters, in place).

    Raises:
        UpdateRefused: (from `encode`) for a table whose weights cannot be written, saying why.
    """

    def __init__(self, model: ServingModel) -> None:
        self.model = model
        self._targets: dict[str, torch.Tensor] = {}
        self._refusals: dict[str, str] = {}
        if model.engine is Engine.EAGER:
            for key, param in model.module.named_parameters():
                for t in model.config.tables:
                    if key.endswith(f"embedding_bags.{t.name}.weight"):
                        self._targets[t.name] = param
        else:
            self._fused_targets(model)
        for t in model.config.tables:
            if t.name not in self._targets and t.name not in self._refusals:
                self._refusals[t.name] = "its weights are not found in the served module"

    def _fused_targets(self, model: ServingModel) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        seen: dict[str, int] = {}
        for sub in model.module.modules():
            if not isinstance(sub, IntNBitTableBatchedEmbeddingBagsCodegen):
                continue
            splits = sub.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
            for spec, (weights, _, _) in zip(sub.embedding_specs, splits):
                name = spec[0]
                seen[name] = seen.get(name, 0) + 1
                self._targets[name] = weights
        for name, count in seen.items():
            if count > 1:
                self._targets.pop(name, None)
                self._refusals[name] = "it is sharded over several devices (serve it unsharded to update it)"
        stores = model.module.stores if isinstance(model.module, TableBatchedEmbeddings) else {}
        for name, store in stores.items():
            if store.storage is Storage.MANAGED:
                self._refusals[name] = "managed storage keeps a device cache of its rows (use memory storage)"
            elif store.mapped and not store.writable:
                self._refusals[name] = "its rows are mapped read-only (start the server with updates enabled)"
        for name in self._refusals:
            self._targets.pop(name, None)

    def writable(self, table: str) -> str | None:
        """None when `table` can be written, else why not."""
        return self._refusals.get(table)

    def encode(self, table: str, ids: np.ndarray, rows: np.ndarray, row_format: RowFormat) -> EncodedRows:
        """Checked rows (`check_rows`) encoded as the table stores them, on its device (done before the write, off
        the batches' thread)."""
        reason = self._refusals.get(table)
        if reason is not None:
            raise UpdateRefused(f"table {table!r} cannot be updated: {reason}")
        target = self._targets[table]
        dtype = self.model.serving_dtype(table)
        # Float conversions in numpy (round to nearest even, as torch's): a torch op here would take the intra-op
        # thread pool from the forward running beside it.
        if self.model.engine is Engine.EAGER:
            kind = "<f4" if row_format is RowFormat.FLOAT32 else _FLOAT_TYPES[dtype]
            want = np.float16 if target.dtype == torch.float16 else np.float32
            encoded = torch.from_numpy(np.array(rows).view(kind).astype(want))
        else:
            width = target.shape[1]
            if row_format is RowFormat.FLOAT32 and dtype is ServingDType.FP16:
                stored = np.array(rows).view("<f4").astype("<f2").view(np.uint8)
            elif row_format is RowFormat.FLOAT32 and dtype is not ServingDType.FP32:
                stored = encode_rows(torch.from_numpy(np.array(rows).view("<f4")), dtype)
            else:  # fp32 values, or stored rows: written as they are
                stored = rows
            if stored.shape[1] == width:
                out = np.array(stored, dtype=np.uint8)  # one copy, writable (and off the batches' thread)
            else:
                out = np.zeros((len(ids), width), dtype=np.uint8)
                used = min(width, stored.shape[1])
                out[:, :used] = stored[:, :used]
            encoded = torch.from_numpy(out)
        device = target.device
        return EncodedRows(table, torch.from_numpy(np.array(ids)).to(device), encoded.to(device))

    @torch.no_grad()
    def write(self, rows: EncodedRows) -> None:
        """Copies the rows into the weights: one indexed copy (run between batches; the ids are distinct). Byte rows
        are copied as 8-byte words (rows are 16-byte aligned): far fewer elements than bytes (DESIGN.md)."""
        target, values = self._targets[rows.table], rows.rows
        if target.dtype == torch.uint8 and target.shape[1] % 8 == 0 and target.storage_offset() % 8 == 0:
            target, values = target.view(torch.int64), values.view(torch.int64)
        target.index_put_((rows.ids,), values)
