"""Sharded lookups in one place: how a request splits over a plan's shard servers and how their answers join.

A router (`embserve route`) and a client that fans out to the shards itself use this same code, so both answer
alike. A table held whole by one shard goes to it as it is. A table split row-wise into ranges `[start, end)` has
each id sent to the shard holding its row, as the local id `id - start`, with each example's length recomputed per
shard; a hashed table's ids are first taken mod its rows, as a single server does. The shards answer float32; the
join copies whole tables' columns and adds row-wise tables' partial sums in float32, then rounds once to the
requested output type. Keys left out of a request are zero columns. Torch-free: numpy only.

`PlanPlacement` reads a plan's placement from its parsed YAML mapping (no pydantic, no model config), for a client
that fans out: with the tables' facts that the shard servers state in their metadata it builds the same
`ShardLayout` the router builds from the model config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .wire import OutputDType

__all__ = [
    "PLAN_FORMAT",
    "PlanPlacement",
    "ShardLayout",
    "ShardPart",
    "ShardedTable",
    "TablePiece",
    "plan_content_digest",
    "shard_version",
    "to_output_bytes",
]

PLAN_FORMAT = 1


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


def shard_version(versions: Mapping[int, str]) -> str:
    """One version for an answer built by several shards: theirs when they agree, else `K=version,...`."""
    distinct = set(versions.values())
    if len(distinct) == 1:
        return distinct.pop()
    return ",".join(f"{s}={v}" for s, v in sorted(versions.items()))


def plan_content_digest(content: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of a plan's canonical content: every field but `digest`, as sorted compact JSON (what
    `embserve plan` records and shard servers report)."""
    body = {k: v for k, v in content.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PlanPlacement:
    """A plan's placement: per shard index its whole tables and its row ranges `(table, start, end)`."""

    model: str
    model_digest: str
    digest: str
    tables: Mapping[int, tuple[str, ...]]
    row_ranges: Mapping[int, tuple[tuple[str, int, int], ...]]

    @property
    def shard_count(self) -> int:
        return len(self.tables)

    @classmethod
    def of(cls, data: Any, *, source: str = "plan") -> PlanPlacement:
        """Reads a parsed plan (the mapping its YAML holds): its structure, shard indices `0..N-1` each once, and
        its stored digest against its content.

        Raises:
            ValueError: one line naming `source` and the field at fault.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a plan must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"format", "model", "model_digest", "shards", "digest"}
        if unknown:
            raise ValueError(f"{source}: unknown field {sorted(unknown)[0]!r}")
        fmt = data.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"{source}: format {fmt} is not supported (this embserve reads format {PLAN_FORMAT})")
        model, model_digest = data.get("model"), data.get("model_digest")
        if not isinstance(model, str) or not isinstance(model_digest, str):
            raise ValueError(f"{source}: model and model_digest must be strings")
        shards = data.get("shards")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{source}: shards must be a non-empty list")
        canonical: list[dict[str, Any]] = []
        tables: dict[int, tuple[str, ...]] = {}
        ranges: dict[int, tuple[tuple[str, int, int], ...]] = {}
        for i, shard in enumerate(shards):
            where = f"{source}: shards.{i}"
            if not isinstance(shard, Mapping) or set(shard) - {"index", "tables", "row_ranges"}:
                raise ValueError(f"{where}: a shard is a mapping of index, tables and row_ranges")
            index = shard.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(shards):
                raise ValueError(f"{where}.index: {index!r} is not a shard index 0 to {len(shards) - 1}")
            if index in tables:
                raise ValueError(f"{where}.index: shard index {index} appears twice")
            names = shard.get("tables", [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{where}.tables: a list of table names")
            pieces = []
            for j, r in enumerate(shard.get("row_ranges", [])):
                ok = isinstance(r, Mapping) and set(r) == {"table", "start", "end"} and isinstance(r["table"], str)
                if not ok or not all(isinstance(r[f], int) and not isinstance(r[f], bool) for f in ("start", "end")):
                    raise ValueError(f"{where}.row_ranges.{j}: a mapping of table, start and end")
                if not 0 <= r["start"] < r["end"]:
                    raise ValueError(f"{where}.row_ranges.{j}: rows [{r['start']}, {r['end']}) are not a range")
                pieces.append((r["table"], r["start"], r["end"]))
            tables[index] = tuple(names)
            ranges[index] = tuple(pieces)
            canonical.append(
                {
                    "index": index,
                    "tables": list(names),
                    "row_ranges": [{"table": t, "start": a, "end": b} for t, a, b in pieces],
                }
            )
        digest = plan_content_digest({"format": fmt, "model": model, "model_digest": model_digest, "shards": canonical})
        stored = data.get("digest")
        if stored is not None and stored != digest:
            raise ValueError(f"{source}: its digest {stored} does not match its content: write it again")
        return cls(model, model_digest, digest, tables, ranges)

    def layout(self, tables: Sequence[tuple[str, int, int, bool, bool]]) -> ShardLayout:
        """The layout of a model whose tables are `(name, dim, rows, weighted, hashed)` in its output key order.

        Raises:
            ValueError: naming a table the plan places nowhere, twice, or in ranges that do not cover its rows.
        """
        pieces: dict[str, list[TablePiece]] = {}
        rows = {name: n for name, _, n, _, _ in tables}
        for shard in range(self.shard_count):
            for name in self.tables[shard]:
                if name in pieces:
                    raise ValueError(f"table {name!r} is in two shards")
                pieces[name] = [TablePiece(shard, 0, rows.get(name, 0))]
            for name, start, end in self.row_ranges[shard]:
                pieces.setdefault(name, []).append(TablePiece(shard, start, end))
        out = []
        for name, dim, n, weighted, hashed in tables:
            placed = sorted(pieces.pop(name, []), key=lambda p: p.start)
            covered = 0
            for p in placed:
                if p.start != covered:
                    raise ValueError(f"table {name!r}: the plan's row ranges do not cover rows [0, {n}) once")
                covered = p.end
            if not placed or covered != n:
                raise ValueError(f"table {name!r} ({n} rows) is not placed whole by the plan")
            out.append(ShardedTable(name, dim, n, weighted, hashed, tuple(placed)))
        if pieces:
            raise ValueError(f"the plan places table {sorted(pieces)[0]!r}, which the model lacks")
        return ShardLayout(out, self.shard_count)
