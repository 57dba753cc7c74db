"""Batch -> device -> result: assembly, host-to-device copy, forward and split, off the event loop.

Two single-thread stages let batch N+1 be assembled and copied while batch N computes. On CUDA the assembled
arrays go through pinned host memory and non-blocking copies on a side stream; the forward's stream waits for the
copy, and the output comes back to the host once per batch. The same code runs on CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import ServingModel

from .assembler import AssembledBatch, assemble
from .codec import SparseRequest

__all__ = ["BatchExecutor", "BatchOutput"]


@dataclasses.dataclass(frozen=True)
class BatchOutput:
    """One request's share of a batch: its rows serialized as `dtype` bytes, and the model version that made them."""

    payload: bytes
    batch_size: int
    dtype: str
    model: ServingModel


@dataclasses.dataclass
class _Prepared:
    batch: AssembledBatch
    features: KeyedJaggedTensor
    model: ServingModel
    copied: torch.cuda.Event | None


class BatchExecutor:
    """Runs batches of validated requests through a `ServingModel`.

    Args:
        model: the model to serve; `swap_model` replaces it between batches.
        on_forward: called with the seconds each forward (copy in, compute, copy out) took.
    """

    def __init__(self, model: ServingModel, *, on_forward: Callable[[float], None] | None = None) -> None:
        self._model = model
        self._on_forward = on_forward
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embserve-assemble")
        self._compute_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embserve-forward")
        self._copy_stream = (
            torch.cuda.Stream(model.device) if model.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )

    @property
    def model(self) -> ServingModel:
        return self._model

    def swap_model(self, model: ServingModel) -> None:
        """Serves `model` from the next batch on; a batch already assembled finishes on the model it started with."""
        if model.keys != self._model.keys or model.device != self._model.device:
            raise ValueError("a swapped-in model must have the same keys and device")
        self._model = model

    async def run(self, requests: list[SparseRequest]) -> Sequence[BatchOutput]:
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_pool, self._prepare, requests)
        return await loop.run_in_executor(self._compute_pool, self._compute, prepared, requests)

    def shutdown(self) -> None:
        self._prepare_pool.shutdown(wait=True)
        self._compute_pool.shutdown(wait=True)

    def _prepare(self, requests: list[SparseRequest]) -> _Prepared:
        model = self._model
        weighted = any(t.weighted for t in model.config.tables)
        batch = assemble(requests, len(model.keys), with_weights=weighted)
        lengths = torch.from_numpy(batch.lengths)
        values = torch.from_numpy(batch.values)
        weights = torch.from_numpy(batch.weights) if batch.weights is not None else None
        copied = None
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                lengths = lengths.pin_memory().to(model.device, non_blocking=True)
                values = values.pin_memory().to(model.device, non_blocking=True)
                if weights is not None:
                    weights = weights.pin_memory().to(model.device, non_blocking=True)
                copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
                copied.record(self._copy_stream)
        features = KeyedJaggedTensor(keys=list(model.keys), values=values, lengths=lengths, weights=weights)
        return _Prepared(batch, features, model, copied)

    def _compute(self, prepared: _Prepared, requests: list[SparseRequest]) -> list[BatchOutput]:
        start = time.perf_counter()
        model = prepared.model
        if prepared.copied is not None:
            torch.cuda.current_stream(model.device).wait_event(prepared.copied)
        output = model.forward(prepared.features).cpu()
        if self._on_forward is not None:
            self._on_forward(time.perf_counter() - start)
        offsets = prepared.batch.example_offsets
        results = []
        for r, req in enumerate(requests):  # one step per request: slice, cast, serialize
            rows = output[int(offsets[r]) : int(offsets[r + 1])]
            results.append(BatchOutput(_serialize(rows, req.output_dtype), req.batch_size, req.output_dtype, model))
        return results


def _serialize(rows: torch.Tensor, dtype: str) -> bytes:
    if dtype == "float16":
        rows = rows.to(torch.float16)
    elif dtype == "bfloat16":
        rows = rows.to(torch.bfloat16).view(torch.int16)
    return rows.contiguous().numpy().tobytes()
