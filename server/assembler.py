"""Requests -> one KeyedJaggedTensor layout, in the model's canonical key order.

Requests may send their keys in any order and any subset of the model's keys (a missing key is empty bags). The
batch is always built with every key, in canonical order, feature-major across requests: for each key, the bags
of request 0, then of request 1, ... The work is a handful of vectorised numpy operations per batch: one scatter
of each request's lengths, and one gather that moves every id segment (request, key) to its place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .request import SparseRequest

__all__ = ["AssembledBatch", "assemble"]


@dataclasses.dataclass(frozen=True)
class AssembledBatch:
    """The arrays of a KJT with every canonical key: `lengths` int32 `[T * B]`, `values` int64, `weights`
    float32 or None; `example_offsets[r]` is where request r's rows start in the batch output; `length_per_key`
    and `offset_per_key` the ids of each key and where they start in `values` (given to the KJT, so that torchrec
    does not compute them with tensor operations per batch)."""

    batch_size: int
    lengths: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None
    example_offsets: np.ndarray
    length_per_key: list[int]
    offset_per_key: list[int]


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def assemble(requests: Sequence[SparseRequest], num_keys: int, *, with_weights: bool) -> AssembledBatch:
    """Merges validated requests into one batch.

    Args:
        requests: validated requests, in the order their rows appear in the output.
        num_keys: the model's number of canonical keys.
        with_weights: emit a weights array (1.0 where a request sent none), for models with weighted tables.
    """
    sizes = np.fromiter((r.batch_size for r in requests), dtype=np.int64, count=len(requests))
    example_offsets = _exclusive_cumsum(sizes)
    total_examples = int(example_offsets[-1])

    lengths = np.zeros((num_keys, total_examples), dtype=np.int32)
    for r, req in enumerate(requests):
        lengths[req.key_index, example_offsets[r] : example_offsets[r + 1]] = req.lengths

    all_values = np.concatenate([req.values for req in requests])
    all_weights: np.ndarray | None = None
    if with_weights:
        all_weights = np.concatenate(
            [req.weights if req.weights is not None else np.ones(req.values.size, np.float32) for req in requests]
        )

    # One segment per (request, key present in it): where its ids start in all_values, how many, which key.
    seg_key = np.concatenate([req.key_index for req in requests])
    seg_req = np.repeat(np.arange(len(requests)), [len(req.key_index) for req in requests])
    seg_count = np.concatenate([req.ids_per_key for req in requests])
    seg_src = _exclusive_cumsum(seg_count)[:-1]  # requests' values are contiguous in all_values
    order = np.lexsort((seg_req, seg_key))  # destination order: by canonical key, then by request
    if np.array_equal(order, np.arange(len(order))):
        values, weights = all_values, all_weights
    else:
        count = seg_count[order]
        dst = _exclusive_cumsum(count)[:-1]
        gather = np.repeat(seg_src[order] - dst, count) + np.arange(int(count.sum()), dtype=np.int64)
        values = all_values[gather]
        weights = all_weights[gather] if all_weights is not None else None
    per_key = np.bincount(seg_key, weights=seg_count, minlength=num_keys).astype(np.int64)
    return AssembledBatch(
        batch_size=total_examples,
        lengths=lengths.reshape(-1),
        values=values,
        weights=weights,
        example_offsets=example_offsets,
        length_per_key=per_key.tolist(),
        offset_per_key=_exclusive_cumsum(per_key).tolist(),
    )
