"""Typed results: a `LookupResult` over the response bytes, and the model's metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType

__all__ = ["LookupResult", "ModelInfo", "TableInfo"]


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass(frozen=True)
class LookupResult:
    """Pooled embeddings `[batch_size, sum(dims)]`, columns grouped by key.

    `embeddings` is a read-only view of the response bytes (no copy) for float32 and float16; bfloat16, which numpy
    lacks, is widened to float32 (`raw` keeps the bits). `result["user"]` is key `user`'s `[batch_size, dim]` view.
    `request_id` is the server's echo of the id the call sent.
    """

    embeddings: np.ndarray
    keys: tuple[str, ...]
    dims: tuple[int, ...]
    offsets: tuple[int, ...]
    dtype: OutputDType
    model_name: str
    model_version: str
    raw: np.ndarray | None = None
    request_id: str = ""

    @classmethod
    def from_proto(cls, response: pb.LookupResponse) -> LookupResult:
        dtype = OutputDType.of_wire(response.dtype)
        if response.dtype == pb.DTYPE_UNSPECIFIED or dtype is None or len(response.shape) != 2:
            raise ValueError(f"unexpected response dtype {response.dtype} / shape {list(response.shape)}")
        rows, cols = (int(x) for x in response.shape)
        raw = np.frombuffer(response.embeddings, dtype=dtype.numpy).reshape(rows, cols)
        embeddings = _bf16_to_f32(raw) if response.dtype == pb.DTYPE_BFLOAT16 else raw
        return cls(
            embeddings=embeddings,
            keys=tuple(response.keys),
            dims=tuple(response.dims),
            offsets=tuple(response.offsets),
            dtype=dtype,
            model_name=response.model_name,
            model_version=response.model_version,
            raw=raw if response.dtype == pb.DTYPE_BFLOAT16 else None,
            request_id=response.request_id,
        )

    @classmethod
    def concat(cls, parts: Sequence[LookupResult]) -> LookupResult:
        """Joins the results of consecutive chunks of one request, in order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for p in parts[1:]:
            if p.keys != first.keys or p.model_version != first.model_version:
                raise ValueError("chunks were served by different model layouts or versions; retry the call")
        raw = np.concatenate([p.raw for p in parts if p.raw is not None]) if first.raw is not None else None
        return dataclasses.replace(first, embeddings=np.concatenate([p.embeddings for p in parts]), raw=raw)

    @property
    def batch_size(self) -> int:
        return int(self.embeddings.shape[0])

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            i = self.keys.index(key)
        except ValueError:
            raise KeyError(f"{key!r} is not in the result's keys {list(self.keys)}") from None
        return self.embeddings[:, self.offsets[i] : self.offsets[i + 1]]

    def to_dict(self) -> dict[str, np.ndarray]:
        return {k: self[k] for k in self.keys}

    def to_torch(self) -> Any:
        """A torchrec `KeyedTensor` over the embeddings (needs torch and torchrec)."""
        import torch
        from torchrec.sparse.jagged_tensor import KeyedTensor

        values = torch.from_numpy(np.array(self.embeddings))  # writable copy; torch warns on read-only memory
        return KeyedTensor(keys=list(self.keys), length_per_key=list(self.dims), values=values)


@dataclasses.dataclass(frozen=True)
class TableInfo:
    name: str
    num_embeddings: int
    embedding_dim: int
    data_type: str
    serving_dtype: str
    weight_bytes: int
    weighted: bool
    id_policy: str
    storage: str = "memory"  # memory | mmap | managed
    disk_bytes: int = 0  # the row file's bytes on disk (0: not served from one)
    resident_bytes: int = 0  # bytes in memory now (mmap: pages in the page cache)
    # A shard server's rows of a table split row-wise: the first (the table's row row_start + i is the shard's id
    # i) and the table's rows in the whole model; both 0 for a whole table.
    row_start: int = 0
    table_rows: int = 0


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The served model: tables, output key order and the server's request limits."""

    name: str
    version: str
    keys: tuple[str, ...]
    output_dim: int
    tables: tuple[TableInfo, ...]
    device: str
    engine: str
    max_batch_size: int
    max_request_examples: int
    max_request_ids: int
    max_message_bytes: int
    max_stream_outstanding: int = 0  # 0: the server did not say
    max_stream_batch: int = 0  # lookups one LookupStream message may carry; 0: one
    # Byte bounds (0: the server did not say): a response over max_response_bytes is refused INVALID_ARGUMENT;
    # the queue, the responses waiting to be sent and the requests being received are refused RESOURCE_EXHAUSTED
    # beyond theirs.
    max_response_bytes: int = 0
    max_queue_bytes: int = 0
    max_pending_response_bytes: int = 0
    max_pending_response_bytes_per_connection: int = 0
    max_receive_bytes: int = 0
    # Sharded serving: the plan's digest (a shard server or a router; "" otherwise); on a shard server its index,
    # the plan's number of shards and the whole model's key order (shard_count 0: not a shard server).
    plan_digest: str = ""
    shard_index: int = 0
    shard_count: int = 0
    model_keys: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, m: pb.ModelMetadata) -> ModelInfo:
        return cls(
            name=m.name,
            version=m.version,
            keys=tuple(m.keys),
            output_dim=m.output_dim,
            tables=tuple(
                TableInfo(
                    t.name,
                    t.num_embeddings,
                    t.embedding_dim,
                    t.data_type,
                    t.serving_dtype,
                    t.weight_bytes,
                    t.weighted,
                    t.id_policy,
                    t.storage or "memory",
                    t.disk_bytes,
                    t.resident_bytes,
                    t.row_start,
                    t.table_rows,
                )
                for t in m.tables
            ),
            device=m.device,
            engine=m.engine,
            max_batch_size=m.max_batch_size,
            max_request_examples=m.max_request_examples,
            max_request_ids=m.max_request_ids,
            max_message_bytes=m.max_message_bytes,
            max_stream_outstanding=m.max_stream_outstanding,
            max_stream_batch=m.max_stream_batch,
            max_response_bytes=m.max_response_bytes,
            max_queue_bytes=m.max_queue_bytes,
            max_pending_response_bytes=m.max_pending_response_bytes,
            max_pending_response_bytes_per_connection=m.max_pending_response_bytes_per_connection,
            max_receive_bytes=m.max_receive_bytes,
            plan_digest=m.plan_digest,
            shard_index=m.shard_index,
            shard_count=m.shard_count,
            model_keys=tuple(m.model_keys),
        )
