"""The compute ceiling: the server's own executor (assembly, forward, split, framing), in process, on the batches the
server would form."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from embserve.embeddings import ServingModel
from embserve.server.executor import BatchExecutor
from embserve.server.request import SparseRequest

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


def compute_ceiling(
    model: ServingModel, requests: Sequence[Request], batch_examples: float, seconds: float = 2.0
) -> float:
    """Examples/s of the executor's whole batch step over batches of about `batch_examples` examples built from
    `requests`."""
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

    executor = BatchExecutor(model, pipelined=False)

    def run(batch: list[SparseRequest]) -> int:
        return sum(out.batch_size for out in executor.run_blocking(batch))

    try:
        for b in batches[:4]:
            run(b)
        examples, start, k = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            examples += run(batches[k % len(batches)])
            k += 1
        return examples / (time.perf_counter() - start)
    finally:
        executor.shutdown()
