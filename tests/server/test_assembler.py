"""Assembly of many requests into one canonical KJT layout, against a per-example Python reference."""

from __future__ import annotations

import numpy as np
import pytest

from embserve.server.assembler import assemble
from embserve.server.request import SparseRequest


def _request(rng: np.random.Generator, num_keys: int, weighted: bool) -> SparseRequest:
    present = rng.permutation(num_keys)[: rng.integers(0, num_keys + 1)]
    batch = int(rng.integers(1, 6))
    lengths = rng.integers(0, 4, size=(len(present), batch)).astype(np.int32)
    values = rng.integers(0, 1000, size=int(lengths.sum())).astype(np.int64)
    weights = rng.random(values.size).astype(np.float32) if weighted and rng.random() < 0.7 else None
    return SparseRequest(
        batch_size=batch,
        key_index=present.astype(np.int64),
        lengths=lengths,
        values=values,
        weights=weights,
        ids_per_key=lengths.sum(axis=1, dtype=np.int64),
    )


def _reference(requests: list[SparseRequest], num_keys: int) -> tuple[list[int], list[int], list[float]]:
    """Per key, per request, per example: the obvious nested loops."""
    lengths: list[int] = []
    values: list[int] = []
    weights: list[float] = []
    for key in range(num_keys):
        for req in requests:
            pos = list(req.key_index).index(key) if key in req.key_index else None
            start = int(req.ids_per_key[:pos].sum()) if pos is not None else 0
            for b in range(req.batch_size):
                n = int(req.lengths[pos, b]) if pos is not None else 0
                lengths.append(n)
                values.extend(req.values[start : start + n].tolist())
                w = req.weights[start : start + n] if req.weights is not None else np.ones(n)
                weights.extend(w.tolist())
                start += n
    return lengths, values, weights


@pytest.mark.parametrize("seed", range(8))
def test_assemble_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_keys = 5
    requests = [_request(rng, num_keys, weighted=True) for _ in range(int(rng.integers(1, 12)))]
    batch = assemble(requests, num_keys, with_weights=True)
    lengths, values, weights = _reference(requests, num_keys)
    np.testing.assert_array_equal(batch.lengths, lengths)
    np.testing.assert_array_equal(batch.values, values)
    assert batch.weights is not None
    np.testing.assert_allclose(batch.weights, weights)
    sizes = [r.batch_size for r in requests]
    np.testing.assert_array_equal(batch.example_offsets, np.concatenate([[0], np.cumsum(sizes)]))
    assert batch.batch_size == sum(sizes)
    per_key = [sum(lengths[k * batch.batch_size : (k + 1) * batch.batch_size]) for k in range(num_keys)]
    assert batch.length_per_key == per_key  # what the KJT is given instead of computing it
    assert batch.offset_per_key == [sum(per_key[:k]) for k in range(num_keys + 1)]


def test_unweighted_batches_carry_no_weights() -> None:
    rng = np.random.default_rng(0)
    batch = assemble([_request(rng, 3, weighted=False) for _ in range(3)], 3, with_weights=False)
    assert batch.weights is None
