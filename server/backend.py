"""The seam between the front door and what computes: the `Backend` interface, the model facts the front ends
read (`ModelView`), and what a computed request comes back as (`BatchOutput`).

The front door validates a request once and hands it to a backend; the backend answers with the request's rows,
framed as a LookupResponse, or an `EmbserveError`. Today's backend batches and runs the model in this process
(`local_backend.LocalBackend`); a router that fans requests out to shard servers is another. Torch-free.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol

from .request import ModelView, SparseRequest

__all__ = ["Backend", "BatchOutput", "ModelView"]


@dataclasses.dataclass(frozen=True)
class BatchOutput:
    """One request's answer: its serialized answer (a LookupResponse, or what the request's `frame` made) and its
    number of examples; the rows as a view into `response` (no copy) and the version of the model that computed
    them."""

    response: bytes
    batch_size: int
    rows: memoryview
    model_version: str


class Backend(Protocol):
    """Computes validated requests.

    `enqueue` takes a request and returns the future of its answer at once, or raises `Overloaded` or
    `ShuttingDown` at once. The future fails with `DeadlineExpired` when `timeout` seconds pass before the answer
    is computed (the request is then dropped unrun where it has not started), with another `EmbserveError` when
    computing it fails; cancelling it abandons the request. The backend's model may change between requests
    (a reload); each answer names the version that computed it.
    """

    @property
    def model(self) -> ModelView: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_queue_bytes(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def queued_examples(self) -> int: ...

    def enqueue(self, request: SparseRequest, *, timeout: float | None) -> asyncio.Future[BatchOutput]: ...
    def start(self) -> None: ...
    async def close(self) -> None: ...
