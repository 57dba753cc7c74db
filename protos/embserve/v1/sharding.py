"""Sharded lookups in one place: how a request splits over a plan's shard servers and how their answers join.

A router (`embserve route`) and a client that fans out to the shards itself use this same code, so both answer
alike. A table held whole by one shard goes to it as it is. A table split row-wise into ranges `[start, end)` has
each id sent to the shard holding its row, as the local id `id - start`, with each example's length recomputed per
shard; a hashed table's ids are first taken mod its rows, as a single server does. The shards answer float32; the
join copies whole tables' columns and adds row-wise tables' partial sums in float32, then rounds once to the
requested output type. Keys left out of a request are zero columns. Torch-free: numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .wire import OutputDType

__all__ = ["ShardLayout", "ShardPart", "ShardedTable", "TablePiece", "to_output_bytes"]


@dataclasses.dataclass(frozen=True)
class TablePiece:
    """Rows `[start, end)` of a table, held by `shard`."""

    shard: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class ShardedTable:
    """One table of the model, in its place in the output: its pieces in row order (one: held whole)."""

    name: str
    dim: int
    rows: int
    weighted: bool
    hashed: bool
    pieces: tuple[TablePiece, ...]

    @property
    def row_wise(self) -> bool:
        return len(self.pieces) > 1


@dataclasses.dataclass(frozen=True)
class ShardPart:
    """What one shard is asked: keys (its table names), lengths `[len(keys), B]`, local ids, weights."""

    keys: list[str]
    lengths: np.ndarray  # int32 [K, B]
    values: np.ndarray  # int64 [N]
    weights: np.ndarray | None  # float32 [N]


class ShardLayout:
    """The model's tables over its shards, in the model's output key order.

    Args:
        tables: every table, in the model's output (canonical) key order.
        shard_count: the plan's number of shards.
    """

    def __init__(self, tables: Sequence[ShardedTable], shard_count: int) -> None:
        self.tables = tuple(tables)
        self.shard_count = shard_count
        self.keys = tuple(t.name for t in self.tables)
        offsets = [0]
        for t in self.tables:
            offsets.append(offsets[-1] + t.dim)
        self.offsets = tuple(offsets)
        self.output_dim = offsets[-1]
        self._index = {k: i for i, k in enumerate(self.keys)}
        # Each shard answers its keys in the model's order (a shard's canonical order is the model's, restricted).
        self.shard_keys: dict[int, tuple[str, ...]] = {
            s: tuple(t.name for t in self.tables if any(p.shard == s for p in t.pieces)) for s in range(shard_count)
        }
        self._shard_columns: dict[int, list[tuple[int, int, int, bool]]] = {}
        for s, keys in self.shard_keys.items():
            cols, at = [], 0
            for k in keys:
                t = self.tables[self._index[k]]
                cols.append((at, self.offsets[self._index[k]], t.dim, t.row_wise))
                at += t.dim
            self._shard_columns[s] = cols
        for s, keys in self.shard_keys.items():
            if not keys:
                raise ValueError(f"shard {s} holds no table")

    def index_of(self, key: str) -> int | None:
        return self._index.get(key)

    def shard_dim(self, shard: int) -> int:
        return sum(self.tables[self._index[k]].dim for k in self.shard_keys[shard])

    def split(
        self, key_index: np.ndarray, lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None
    ) -> dict[int, ShardPart]:
        """A request (keys as indices into `keys`, lengths `[K, B]` key-major, ids and optional weights in the same
        order) as one part per shard it touches; ids of hashed tables are taken mod their rows first."""
        batch = lengths.shape[1] if lengths.ndim == 2 else 0
        per_key = lengths.reshape(len(key_index), batch).sum(axis=1, dtype=np.int64)
        ends = np.cumsum(per_key)
        keys: dict[int, list[str]] = {}
        lens: dict[int, list[np.ndarray]] = {}
        vals: dict[int, list[np.ndarray]] = {}
        wts: dict[int, list[np.ndarray]] = {}
        weighted: set[int] = set()

        def add(shard: int, name: str, ln: np.ndarray, v: np.ndarray, w: np.ndarray | None, is_weighted: bool) -> None:
            keys.setdefault(shard, []).append(name)
            lens.setdefault(shard, []).append(ln.astype(np.int32, copy=False))
            vals.setdefault(shard, []).append(v)
            if w is not None:
                wts.setdefault(shard, []).append(w)
            if is_weighted:
                weighted.add(shard)

        for i, k in enumerate(key_index.tolist()):
            table = self.tables[k]
            start = int(ends[i] - per_key[i])
            ids = values[start : int(ends[i])]
            w = weights[start : int(ends[i])] if weights is not None else None
            if table.hashed and ids.size and (int(ids.max()) >= table.rows):
                ids = ids % table.rows
            if not table.row_wise:
                add(table.pieces[0].shard, table.name, lengths[i], ids, w, table.weighted)
                continue
            starts = np.array([p.start for p in table.pieces], dtype=np.int64)
            piece_of = np.searchsorted(starts, ids, side="right") - 1
            example = np.repeat(np.arange(batch), lengths[i])
            for j, piece in enumerate(table.pieces):
                mine = piece_of == j
                if not mine.any():
                    continue
                ln = np.bincount(example[mine], minlength=batch)
                add(
                    piece.shard,
                    table.name,
                    ln,
                    ids[mine] - piece.start,
                    w[mine] if w is not None else None,
                    table.weighted,
                )
        out: dict[int, ShardPart] = {}
        for s, names in keys.items():
            v = np.concatenate(vals[s]).astype(np.int64, copy=False)
            w_all = np.concatenate(wts[s]).astype(np.float32, copy=False) if s in weighted and s in wts else None
            out[s] = ShardPart(names, np.stack(lens[s]).reshape(len(names), batch), v, w_all)
        return out

    def join(self, batch_size: int, answers: Mapping[int, np.ndarray]) -> np.ndarray:
        """`[B, output_dim]` float32 from each answering shard's float32 rows `[B, shard_dim]`: whole tables'
        columns copied, row-wise tables' partial sums added in float32. Shards not asked leave zero columns."""
        out = np.zeros((batch_size, self.output_dim), dtype=np.float32)
        for s, rows in answers.items():
            for at, to, dim, add in self._shard_columns[s]:
                if add:
                    out[:, to : to + dim] += rows[:, at : at + dim]
                else:
                    out[:, to : to + dim] = rows[:, at : at + dim]
        return out


def to_output_bytes(rows: np.ndarray, dtype: OutputDType) -> bytes:
    """float32 rows as `dtype`'s little-endian bytes, correctly rounded (round to nearest even), as the server
    converts its float32 outputs; bfloat16 as its raw 16-bit patterns."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if dtype is OutputDType.FLOAT16:
        return rows.astype("<f2").tobytes()
    if dtype is OutputDType.BFLOAT16:
        bits = rows.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = np.isnan(rows)
        out = rounded.astype("<u2")
        if nan.any():
            out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
        return out.tobytes()
    return rows.astype("<f4", copy=False).tobytes()
