"""The router: a second `Backend` behind the front door, answering the whole model from its shard servers.

A validated request (ids of hashed tables already in range) is split by shard (`embserve.v1.sharding`), each part
sent at once to its shard over long-lived channels (`shard_channels`) with what is left of the caller's deadline,
and the float32 answers joined in the model's key order and rounded once to the requested output type. Every
answer is built from one plan; a shard that is down, too slow or on another plan fails the call naming the shard,
never a zero block. An answer's version is its shards' version when they agree, else `K=version` per shard joined
by commas. Torch-free.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from prometheus_client import Counter, Histogram

from embserve.embeddings.config import EmbeddingBagConfig, ModelConfig, ServingDType, Storage, canonical_keys
from embserve.embeddings.plan import ShardingPlan
from embserve.embeddings.row_files import row_bytes
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.sharding import PlanPlacement, ShardLayout, shard_version, to_output_bytes
from embserve.v1.wire import OutputDType, varint

from .backend import BatchOutput
from .bounds import request_bytes
from .errors import EmbserveError, Overloaded, ShardMismatch
from .metrics import ServerMetrics
from .request import SparseRequest
from .shard_channels import ShardChannels

__all__ = ["RouterBackend", "RouterModel", "layout_of", "shard_version"]

_SHARD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def layout_of(config: ModelConfig, plan: ShardingPlan) -> ShardLayout:
    """The model's tables over the plan's shards, in the model's output key order (as a fanning-out client builds
    it from the shards' metadata: `PlanPlacement.layout`)."""
    by_name = {t.name: t for t in config.tables}
    return PlanPlacement.of(plan.model_dump(mode="json")).layout(
        [
            (
                k,
                by_name[k].embedding_dim,
                by_name[k].num_embeddings,
                by_name[k].weighted,
                by_name[k].id_policy.value == "hash",
            )
            for k in canonical_keys(config)
        ]
    )


class RouterModel:
    """The whole model as the front ends describe it (`ModelView`), served by shards."""

    def __init__(self, config: ModelConfig, layout: ShardLayout, version: str = "") -> None:
        self.config = config
        self.layout = layout
        self.version = version
        self.keys = layout.keys
        self.dims = tuple(t.dim for t in layout.tables)
        self.offsets = layout.offsets
        self.output_dim = layout.output_dim
        self._tables = {t.name: t for t in config.tables}
        self.weight_bytes = {
            t.name: t.num_embeddings * row_bytes(t.embedding_dim, t.effective_serving_dtype) for t in config.tables
        }
        self.engine_name = "router"
        self.device_name = f"{layout.shard_count} shards"

    def table(self, key: str) -> EmbeddingBagConfig:
        return self._tables[key]

    def serving_dtype(self, key: str) -> ServingDType:
        return self._tables[key].effective_serving_dtype

    def hashes_ids(self, key: str) -> bool:
        return self._tables[key].id_policy.value == "hash"

    def table_storage(self, key: str) -> Storage:
        return self._tables[key].storage or Storage.MEMORY

    def disk_bytes(self, key: str) -> int:
        return 0

    def resident_bytes(self, key: str) -> int:
        return 0


class RouterBackend:
    """Routes validated requests to the shard servers.

    Args:
        config: the whole model.
        plan: the sharding plan the shards serve.
        channels: the channels to the shards.
        metrics: the server's metrics; per-shard latency and errors are added to its registry.
        max_routed_requests: requests waiting on shards at once; beyond it `Overloaded` at once.
        max_routed_bytes: their bytes (arrays and answers); beyond it `Overloaded` at once.
        default_deadline_s: the deadline of a request whose caller set none.
    """

    def __init__(
        self,
        config: ModelConfig,
        plan: ShardingPlan,
        channels: ShardChannels,
        *,
        metrics: ServerMetrics,
        max_routed_requests: int,
        max_routed_bytes: int,
        default_deadline_s: float,
    ) -> None:
        self.layout = layout_of(config, plan)
        self._model = RouterModel(config, self.layout)
        self.channels = channels
        self._max_requests = max_routed_requests
        self._max_bytes = max_routed_bytes
        self._default_deadline_s = default_deadline_s
        self._routed: set[asyncio.Task[BatchOutput]] = set()
        self._bytes = 0
        self._examples = 0
        self._prefix: dict[tuple[OutputDType, str], bytes] = {}
        registry = metrics.registry
        self._seconds = Histogram(
            "embserve_shard_seconds",
            "Time of a shard's part of a routed request",
            ["shard"],
            buckets=_SHARD_BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            "embserve_shard_errors", "Failed shard calls by shard and code", ["shard", "code"], registry=registry
        )

    @property
    def model(self) -> RouterModel:
        return self._model

    @property
    def max_batch_size(self) -> int:
        return 0

    @property
    def max_queue_bytes(self) -> int:
        return self._max_bytes

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def queued_examples(self) -> int:
        return self._examples

    def start(self) -> None:
        pass

    async def close(self) -> None:
        if self._routed:
            await asyncio.wait(self._routed)
        await self.channels.close()

    def enqueue(self, request: SparseRequest, *, timeout: float | None) -> asyncio.Future[BatchOutput]:
        size = request_bytes(request, self.layout.output_dim)
        if len(self._routed) >= self._max_requests:
            raise Overloaded(f"{len(self._routed)} requests are waiting on shards (max_routed_requests)")
        if self._bytes + size > self._max_bytes and self._routed:
            raise Overloaded(f"requests waiting on shards hold {self._bytes} bytes; this one needs {size} more")
        deadline = time.monotonic() + (timeout if timeout is not None else self._default_deadline_s)
        task = asyncio.get_running_loop().create_task(self._route(request, deadline))
        self._routed.add(task)
        self._bytes += size
        self._examples += request.batch_size

        def done(t: asyncio.Task[BatchOutput]) -> None:
            self._routed.discard(t)
            self._bytes -= size
            self._examples -= request.batch_size

        task.add_done_callback(done)
        return task

    async def _route(self, request: SparseRequest, deadline: float) -> BatchOutput:
        parts = self.layout.split(request.key_index, request.lengths, request.values, request.weights)
        calls = {
            s: asyncio.ensure_future(self._call(s, _lookup_request(p.keys, p.lengths, p.values, p.weights), deadline))
            for s, p in parts.items()
        }
        try:
            done, _ = await asyncio.wait(calls.values(), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            answers = {s: t.result() for s, t in calls.items()}
        finally:
            for task in calls.values():
                task.cancel()
        rows: dict[int, np.ndarray] = {}
        versions: dict[int, str] = {}
        for s, answer in answers.items():
            rows[s] = self._rows_of(s, answer, request.batch_size)
            versions[s] = answer.model_version
        self._model.version = shard_version(self.channels.versions())
        version = shard_version(versions) if versions else self._model.version
        joined = self.layout.join(request.batch_size, rows)
        payload = to_output_bytes(joined, request.output_dtype)
        if request.frame is not None:  # another protocol's answer (ModelInfer)
            response = request.frame(
                memoryview(payload),
                batch_size=request.batch_size,
                output_dim=self.layout.output_dim,
                model_name=self._model.config.name,
                model_version=version,
            )
        else:
            response = self._frame(payload, request, version)
        return BatchOutput(
            response=response,
            batch_size=request.batch_size,
            rows=memoryview(response)[len(response) - len(payload) :],
            model_version=version,
        )

    async def _call(self, shard: int, request: pb.LookupRequest, deadline: float) -> pb.LookupResponse:
        start = time.perf_counter()
        try:
            response = await self.channels.lookup(shard, request, deadline)
        except EmbserveError as err:
            self._errors.labels(str(shard), err.code.name).inc()
            raise
        self._seconds.labels(str(shard)).observe(time.perf_counter() - start)
        return response

    def _rows_of(self, shard: int, response: pb.LookupResponse, batch_size: int) -> np.ndarray:
        keys, dim = self.layout.shard_keys[shard], self.layout.shard_dim(shard)
        if (
            tuple(response.keys) != keys
            or tuple(response.shape) != (batch_size, dim)
            or response.dtype
            not in (
                pb.DTYPE_FLOAT32,
                pb.DTYPE_UNSPECIFIED,
            )
        ):
            raise ShardMismatch(
                f"shard {shard} answered keys {list(response.keys)} shape {list(response.shape)}; the plan gives it "
                f"keys {list(keys)} shape [{batch_size}, {dim}] float32"
            )
        return np.frombuffer(response.embeddings, dtype="<f4").reshape(batch_size, dim)

    def _frame(self, payload: bytes, request: SparseRequest, version: str) -> bytes:
        """A serialized LookupResponse with the rows last (so `rows` is a view of its tail)."""
        prefix = self._prefix.get((request.output_dtype, version))
        if prefix is None:
            m = self._model
            prefix = pb.LookupResponse(
                dtype=request.output_dtype.wire,
                keys=m.keys,
                dims=m.dims,
                offsets=m.offsets,
                model_name=m.config.name,
                model_version=version,
            ).SerializeToString()
            if len(self._prefix) > 64:
                self._prefix.clear()
            self._prefix[(request.output_dtype, version)] = prefix
        shape = varint(request.batch_size) + varint(self.layout.output_dim)
        parts = [prefix, _tag(2), varint(len(shape)), shape]
        if request.request_id:
            rid = request.request_id.encode()
            parts += [_tag(9), varint(len(rid)), rid]
        parts += [_tag(3), varint(len(payload)), payload]
        return b"".join(parts)


def _tag(number: int) -> bytes:
    return varint(number << 3 | 2)


def _lookup_request(
    keys: list[str], lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None
) -> pb.LookupRequest:
    return pb.LookupRequest(
        features=pb.SparseFeatures(
            keys=keys,
            batch_size=int(lengths.shape[1]),
            lengths=lengths.astype("<i4", copy=False).tobytes(),
            values=values.astype("<i8", copy=False).tobytes(),
            weights=b"" if weights is None else weights.astype("<f4", copy=False).tobytes(),
        ),
        output_dtype=pb.DTYPE_FLOAT32,
    )
