"""The server's byte bounds, computed once: what a request costs in memory, the default rules, the worker split.

A queued request holds its arrays and will produce `batch_size x output_dim x dtype size` bytes of response
(`request_bytes`); the queue bound counts both. A bound left unset in the config defaults to a fraction of the
host's physical memory, kept within a floor and a cap (`memory_default`). `Bounds.of(config)` resolves them once;
the app passes the result down, and with `--workers N` each worker gets `Bounds.share(N)` of the totals. The
runtime budgets that count against these bounds are in `admission`. Torch-free.
"""

from __future__ import annotations

import dataclasses

from embserve.v1.wire import OutputDType

from .config import ServerConfig
from .memory_defaults import (
    BATCH_BYTES_DEFAULT,
    PENDING_BYTES_DEFAULT,
    PENDING_PER_CONNECTION_DEFAULT,
    QUEUE_BYTES_DEFAULT,
    RECEIVE_BYTES_DEFAULT,
    RESPONSE_BYTES_DEFAULT,
    DefaultRule,
    memory_default,
)
from .request import SparseRequest

__all__ = ["Bounds", "request_bytes", "response_bytes"]
# The smallest share a byte bound gets when split over workers.
MIN_SHARE = 1 << 16


def response_bytes(batch_size: int, output_dim: int, output_dtype: OutputDType) -> int:
    """The bytes of the embeddings a request of `batch_size` examples is answered with."""
    return batch_size * output_dim * output_dtype.itemsize


def request_bytes(request: SparseRequest, output_dim: int) -> int:
    """What a queued request holds and will produce: its arrays and its response."""
    held = request.lengths.nbytes + request.values.nbytes + request.key_index.nbytes
    if request.weights is not None:
        held += request.weights.nbytes
    return held + response_bytes(request.batch_size, output_dim, request.output_dtype)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The byte bounds one server process holds, with the host-memory defaults resolved.

    `max_queue_bytes` and `max_batch_bytes` bound queued and batched requests (their arrays and responses);
    `max_response_bytes` one request's response; `max_pending_response_bytes` (and `_per_connection`) answers
    computed and not yet taken by their clients; `max_receive_bytes` request messages read and not yet queued.
    """

    max_queue_bytes: int
    max_batch_bytes: int
    max_response_bytes: int
    max_pending_response_bytes: int
    max_pending_response_bytes_per_connection: int
    max_receive_bytes: int

    @classmethod
    def of(cls, config: ServerConfig, memory: int | None = None) -> Bounds:
        """The bounds `config` sets, each unset one from its default rule and the host's memory."""
        limits, batching = config.limits, config.batching

        def resolved(value: int | None, rule: DefaultRule) -> int:
            return value if value is not None else memory_default(rule, memory)

        return cls(
            max_queue_bytes=resolved(batching.max_queue_bytes, QUEUE_BYTES_DEFAULT),
            max_batch_bytes=resolved(batching.max_batch_bytes, BATCH_BYTES_DEFAULT),
            max_response_bytes=resolved(limits.max_response_bytes, RESPONSE_BYTES_DEFAULT),
            max_pending_response_bytes=resolved(limits.max_pending_response_bytes, PENDING_BYTES_DEFAULT),
            max_pending_response_bytes_per_connection=resolved(
                limits.max_pending_response_bytes_per_connection, PENDING_PER_CONNECTION_DEFAULT
            ),
            max_receive_bytes=resolved(limits.max_receive_bytes, RECEIVE_BYTES_DEFAULT),
        )

    def share(self, workers: int) -> Bounds:
        """One of `workers` processes' share (`--workers N`): the totals divided among them, so that the workers
        together hold what one process would. The bounds of one request or one batch stay whole, and a
        connection's bound is never above its worker's total."""
        if workers <= 1:
            return self
        pending = max(MIN_SHARE, self.max_pending_response_bytes // workers)
        return dataclasses.replace(
            self,
            max_queue_bytes=max(MIN_SHARE, self.max_queue_bytes // workers),
            max_pending_response_bytes=pending,
            max_pending_response_bytes_per_connection=min(self.max_pending_response_bytes_per_connection, pending),
            max_receive_bytes=max(MIN_SHARE, self.max_receive_bytes // workers),
        )
