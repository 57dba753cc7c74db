"""The compute ceiling: the server's own assembly and forward, in process, on the batches the server would form."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from embserve.embeddings import ServingModel
from embserve.server.assembler import assemble
from embserve.server.codec import SparseRequest

from .workloads import Request

__all__ = ["compute_ceiling", "to_sparse_requests"]


def to_sparse_requests(requests: Sequence[Request]) -> list[SparseRequest]:
    return [
        SparseRequest(
            batch_size=r.batch_size,
            key_index=np.arange(len(r.keys), dtype=np.int64),
            lengths=r.lengths,
            values=r.values,
            weights=None,
            ids_per_key=r.lengths.sum(axis=1, dtype=np.int64),
        )
        for r in requests
    ]


def compute_ceiling(model: ServingModel, requests: Sequence[Request], batch_examples: float, seconds: float = 2.0) -> float:
    """Examples/s of assemble + forward over batches of about `batch_examples` examples built from `requests`."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    sparse = to_sparse_requests(requests)
    batches: list[list[SparseRequest]] = []
    i = 0
    while len(batches) < 32:
        batch, n = [], 0
        while n < max(1.0, batch_examples):
            batch.append(sparse[i % len(sparse)])
            n += sparse[i % len(sparse)].batch_size
            i += 1
        batches.append(batch)

    def run(batch: list[SparseRequest]) -> int:
        a = assemble(batch, len(model.keys), with_weights=model.has_weighted_tables)
        kjt = KeyedJaggedTensor(
            keys=list(model.keys), values=torch.from_numpy(a.values), lengths=torch.from_numpy(a.lengths),
            weights=None if a.weights is None else torch.from_numpy(a.weights),
        )
        model.forward(kjt)
        return int(a.batch_size)

    for b in batches[:4]:
        run(b)
    examples, start, k = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        examples += run(batches[k % len(batches)])
        k += 1
    return examples / (time.perf_counter() - start)
