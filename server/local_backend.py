"""The backend that computes in this process: the dynamic batcher in front of the batch executor.

Requests are queued (`batcher`), merged into batches, assembled into one KJT and run through the model off the
event loop (`executor`); each answer is framed there. Once the queue empties after a batch with a large request,
the heap's free pages go back to the OS, so a burst of large requests does not leave the process at its peak.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from embserve.embeddings import ServingModel, StorageFailed
from embserve.embeddings.memory import release_free_memory

from .backend import BatchOutput
from .batcher import DynamicBatcher
from .bounds import Bounds, request_bytes
from .config import BatchingConfig
from .executor import BatchExecutor
from .metrics import ServerMetrics
from .request import SparseRequest

__all__ = ["LocalBackend"]


class LocalBackend:
    """Batches requests and runs them through a `ServingModel` in this process.

    Args:
        model: the model to serve; `swap_model` replaces it between batches.
        batching: the batching settings.
        bounds: the queue and batch byte bounds.
        metrics: batches, queue depth, drops and forward times are reported there.
        trim_after_bytes: a batch with a request of at least this many bytes of ids makes the backend trim the
            heap once the queue is empty.
        on_storage_failure: told when a batch fails because a table's row file changed under the server.
    """

    def __init__(
        self,
        model: ServingModel,
        *,
        batching: BatchingConfig,
        bounds: Bounds,
        metrics: ServerMetrics,
        trim_after_bytes: int,
        on_storage_failure: Callable[[StorageFailed], None] | None = None,
    ) -> None:
        b = batching
        inflight = b.max_inflight_batches or (2 if model.device.type == "cuda" else 1)
        self.executor = BatchExecutor(model, pipelined=inflight > 1, on_forward=metrics.forward_seconds.observe)
        output_dim = model.output_dim
        self.batcher: DynamicBatcher[SparseRequest, BatchOutput] = DynamicBatcher(
            self._run_batch,
            size_of=lambda r: r.batch_size,
            bytes_of=lambda r: request_bytes(r, output_dim),
            max_queue_bytes=bounds.max_queue_bytes,
            max_batch_bytes=bounds.max_batch_bytes,
            max_batch_size=b.max_batch_size if b.enabled else 1,
            max_queue_delay_s=b.max_queue_delay_us / 1e6,
            latency_budget_s=b.latency_budget_ms / 1e3,
            max_queue_size=b.max_queue_size,
            policy=b.policy,
            max_inflight_batches=inflight,
            max_queue_wait_s=b.max_queue_wait_ms / 1e3,
            observer=metrics,
        )
        self._trim_after_bytes = trim_after_bytes
        self._large_since_trim = False
        self._on_storage_failure = on_storage_failure

    @property
    def model(self) -> ServingModel:
        return self.executor.model

    @property
    def max_batch_size(self) -> int:
        return self.batcher.max_batch_size

    @property
    def max_queue_bytes(self) -> int:
        return self.batcher.max_queue_bytes or 0

    @property
    def queued_bytes(self) -> int:
        return self.batcher.queued_bytes

    @property
    def queued_examples(self) -> int:
        return self.batcher.queued_examples

    def enqueue(self, request: SparseRequest, *, timeout: float | None) -> asyncio.Future[BatchOutput]:
        return self.batcher.enqueue(request, timeout=timeout)

    def swap_model(self, model: ServingModel) -> None:
        """Serves `model` from the next batch on (same tables and device)."""
        self.executor.swap_model(model)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        """Runs what is queued, then stops the executor's threads."""
        await self.batcher.close()
        self.executor.shutdown()

    async def _run_batch(self, batch: list[SparseRequest]) -> Sequence[BatchOutput]:
        try:
            outputs = await self.executor.run(batch)
        except StorageFailed as err:
            if self._on_storage_failure is not None:
                self._on_storage_failure(err)
            raise
        if any(r.values.nbytes >= self._trim_after_bytes for r in batch):
            self._large_since_trim = True
        if self._large_since_trim and self.batcher.queued_bytes == 0:
            self._large_since_trim = False
            await asyncio.get_running_loop().run_in_executor(None, release_free_memory)
        return outputs
