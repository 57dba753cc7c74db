"""Independent reference: pooled embeddings by numpy gather-and-sum, and random jagged features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def pool(
    tables: Mapping[str, np.ndarray],
    keys: Sequence[str],
    lengths: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray | None,
    out_keys: Sequence[str],
    weighted_keys: set[str] | None = None,
) -> np.ndarray:
    """`[B, sum(dims of out_keys)]` float64: for each key and example, the (weighted) sum of the rows of its ids.

    `lengths` is `[len(keys), B]` feature-major, `values`/`weights` in the same order. Keys of `out_keys` absent from
    `keys` are empty bags. Weights apply to `weighted_keys` only (None: every key).
    """
    batch = lengths.shape[1] if lengths.ndim == 2 else 0
    cols = []
    starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1))]).astype(np.int64)
    for key in out_keys:
        table = tables[key].astype(np.float64)
        out = np.zeros((batch, table.shape[1]))
        if key in keys:
            k = list(keys).index(key)
            for b in range(batch):
                s, e = starts[k * batch + b], starts[k * batch + b + 1]
                ids = values[s:e]
                use = weights is not None and (weighted_keys is None or key in weighted_keys)
                w = weights[s:e].astype(np.float64) if use else np.ones(len(ids))  # type: ignore[index]
                out[b] = (table[ids] * w[:, None]).sum(axis=0)
        cols.append(out)
    return np.concatenate(cols, axis=1)


def random_features(
    rng: np.random.Generator,
    rows: Mapping[str, int],
    batch: int,
    *,
    max_len: int = 50,
    keys: Sequence[str] | None = None,
    weighted: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """Random jagged features over `keys` (default: all of `rows`, shuffled): lengths 0..max_len, empty bags too."""
    keys = list(keys) if keys is not None else list(rng.permutation(list(rows)))
    lengths = rng.integers(0, max_len + 1, size=(len(keys), batch)).astype(np.int32)
    lengths[rng.random(lengths.shape) < 0.2] = 0
    values = np.concatenate(
        [rng.integers(0, rows[k], size=int(lengths[i].sum())) for i, k in enumerate(keys)]
        or [np.zeros(0, dtype=np.int64)]
    ).astype(np.int64)
    w = rng.uniform(0.1, 2.0, size=values.size).astype(np.float32) if weighted else None
    return keys, lengths, values, w


def assert_pooled_close(
    dims: Mapping[str, int], fp16_keys: set[str], keys: Sequence[str], out: np.ndarray, expected: np.ndarray
) -> None:
    """Exact to fp32 rounding for fp32 tables; fp16 tables may also sum in fp16 (eager), so fp16 rounding there."""
    atol = np.concatenate([np.full(dims[k], 2e-3 if k in fp16_keys else 1e-5) for k in keys])
    diff = np.abs(out.astype(np.float64) - expected)
    bad = diff > atol + 1e-5 * np.abs(expected)
    assert not bad.any(), f"max diff {diff.max()} at {np.argwhere(bad)[:5].tolist()}"
