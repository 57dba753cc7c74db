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
from typing import TypeVar

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import ServingModel

from .assembler import AssembledBatch, assemble
from .backend import BatchOutput
from .framing import ResponseEncoder, rows_as_bytes, rows_in
from .request import SparseRequest

__all__ = ["BatchExecutor"]

T = TypeVar("T")


@dataclasses.dataclass
class _Prepared:
    batch: AssembledBatch
    features: KeyedJaggedTensor
    model: ServingModel
    encoder: ResponseEncoder
    copied: torch.cuda.Event | None


class BatchExecutor:
    """Runs batches of validated requests through a `ServingModel`.

    Args:
        model: the model to serve; `swap_model` replaces it between batches.
        pipelined: assemble and copy in a thread of their own, so batch N+1 is prepared while batch N computes
            (worth it with concurrent batches, above all on GPU); otherwise one thread hop does a whole batch.
        on_forward: called with the seconds each forward (copy in, compute, copy out) took.
    """

    def __init__(
        self, model: ServingModel, *, pipelined: bool = True, on_forward: Callable[[float], None] | None = None
    ) -> None:
        self._current = (model, _encoder_for(model))  # swapped as one reference, read once per batch
        self._on_forward = on_forward
        self._pipelined = pipelined
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embserve-assemble")
        self._compute_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embserve-forward")
        self._copy_stream = (
            torch.cuda.Stream(model.device) if model.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )

    @property
    def model(self) -> ServingModel:
        return self._current[0]

    def swap_model(self, model: ServingModel) -> None:
        """Serves `model` from the next batch on; a batch already assembled finishes on the model it started with."""
        if model.config != self.model.config or model.device != self.model.device:
            raise ValueError("a swapped-in model must have the same tables and device as the one serving")
        self._current = (model, _encoder_for(model))

    async def between_batches(self, work: Callable[[], T]) -> T:
        """Runs `work` on the thread that runs the forwards, so that no forward runs while it does: a batch sees
        what `work` changes in the weights entirely or not at all."""
        return await asyncio.get_running_loop().run_in_executor(self._compute_pool, work)

    async def run(self, requests: list[SparseRequest]) -> Sequence[BatchOutput]:
        loop = asyncio.get_running_loop()
        if not self._pipelined:
            return await loop.run_in_executor(self._compute_pool, self.run_blocking, requests)
        prepared = await loop.run_in_executor(self._prepare_pool, self._prepare, requests)
        return await loop.run_in_executor(self._compute_pool, self._compute, prepared, requests)

    def run_blocking(self, requests: list[SparseRequest]) -> list[BatchOutput]:
        """One batch on the calling thread: assemble, copy, forward, split and frame (what `run` does off the
        event loop)."""
        return self._compute(self._prepare(requests), requests)

    def shutdown(self) -> None:
        self._prepare_pool.shutdown(wait=True)
        self._compute_pool.shutdown(wait=True)

    def _prepare(self, requests: list[SparseRequest]) -> _Prepared:
        model, encoder = self._current
        batch = assemble(requests, len(model.keys), with_weights=model.has_weighted_tables)
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
        features = KeyedJaggedTensor(
            keys=list(model.keys),
            values=values,
            lengths=lengths,
            weights=weights,
            stride=batch.batch_size,
            length_per_key=batch.length_per_key,
            offset_per_key=batch.offset_per_key,
        )
        return _Prepared(batch, features, model, encoder, copied)

    def _compute(self, prepared: _Prepared, requests: list[SparseRequest]) -> list[BatchOutput]:
        start = time.perf_counter()
        model, encoder = prepared.model, prepared.encoder
        current = self._current
        if current[0].module is model.module:  # a row update since it was prepared: name the version it computes
            model, encoder = current
        model.check_storage()  # a row file truncated under the server fails the batch here, not the process
        if prepared.copied is not None:
            torch.cuda.current_stream(model.device).wait_event(prepared.copied)
        output = model.forward(prepared.features).cpu()
        if self._on_forward is not None:
            self._on_forward(time.perf_counter() - start)
        offsets = prepared.batch.example_offsets
        results = []
        for r, req in enumerate(requests):  # one step per request: slice, cast, serialize
            payload = rows_as_bytes(output[int(offsets[r]) : int(offsets[r + 1])], req.output_dtype)
            if req.frame is not None:  # another protocol's answer (ModelInfer)
                response = req.frame(
                    payload,
                    batch_size=req.batch_size,
                    output_dim=encoder.output_dim,
                    model_name=model.config.name,
                    model_version=model.version,
                )
            else:
                response = encoder.encode(
                    payload, batch_size=req.batch_size, output_dtype=req.output_dtype, request_id=req.request_id
                )
            rows = rows_in(response, payload.nbytes)
            results.append(BatchOutput(response, req.batch_size, rows, model.version))
        return results


def _encoder_for(model: ServingModel) -> ResponseEncoder:
    return ResponseEncoder(
        keys=model.keys,
        dims=model.dims,
        offsets=model.offsets,
        model_name=model.config.name,
        model_version=model.version,
    )
