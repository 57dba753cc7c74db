"""The pipeline's own types: a validated request, and the model facts requests are validated against.

`SparseRequest` is what the batcher queues, the assembler merges and the executor answers; `ModelSchema` is the
model as validation sees it; `ModelView` the model as the front ends describe it (a serving model, or a router's
view of a sharded one). All are plain numpy and config: no gRPC, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from embserve.embeddings.config import EmbeddingBagConfig, ModelConfig, ServingDType, Storage
from embserve.v1.wire import OutputDType

__all__ = ["ModelSchema", "ModelView", "SparseRequest"]


class ModelView(Protocol):
    """The served model as the front ends describe it: tables, key order, output layout, version."""

    @property
    def config(self) -> ModelConfig: ...
    @property
    def version(self) -> str: ...
    @property
    def keys(self) -> tuple[str, ...]: ...
    @property
    def dims(self) -> tuple[int, ...]: ...
    @property
    def offsets(self) -> tuple[int, ...]: ...
    @property
    def output_dim(self) -> int: ...
    @property
    def weight_bytes(self) -> Mapping[str, int]: ...
    @property
    def engine_name(self) -> str: ...
    @property
    def device_name(self) -> str: ...

    def table(self, key: str) -> EmbeddingBagConfig: ...
    def serving_dtype(self, key: str) -> ServingDType: ...
    def hashes_ids(self, key: str) -> bool: ...
    def table_storage(self, key: str) -> Storage: ...
    def disk_bytes(self, key: str) -> int: ...
    def resident_bytes(self, key: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class ModelSchema:
    """The canonical keys with their row counts and policies, and the per-request limits."""

    keys: tuple[str, ...]
    num_embeddings: np.ndarray  # int64 [T], canonical key order
    hashed: np.ndarray  # bool [T]: ids are taken mod num_embeddings instead of rejected
    weighted: np.ndarray  # bool [T]
    max_request_examples: int
    max_request_ids: int
    output_dim: int = 0
    max_response_bytes: int | None = None  # batch_size x output_dim x dtype size; None: no bound
    _index: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {k: i for i, k in enumerate(self.keys)})

    def index_of(self, key: str) -> int | None:
        return self._index.get(key)

    @classmethod
    def of(
        cls,
        model: ModelView,
        *,
        max_request_examples: int,
        max_request_ids: int,
        max_response_bytes: int | None = None,
    ) -> ModelSchema:
        """The schema of a serving model, in its canonical key order."""
        return cls(
            keys=model.keys,
            num_embeddings=np.array([model.table(k).num_embeddings for k in model.keys], dtype=np.int64),
            hashed=np.array([model.hashes_ids(k) for k in model.keys], dtype=bool),
            weighted=np.array([model.table(k).weighted for k in model.keys], dtype=bool),
            max_request_examples=max_request_examples,
            max_request_ids=max_request_ids,
            output_dim=model.output_dim,
            max_response_bytes=max_response_bytes,
        )


class Framing(Protocol):
    """Frames one request's rows (`output_dtype` bytes, `[batch_size, output_dim]`) as the serialized answer of the
    protocol it came in, with the rows last; called where the rows are made, so that they are copied once."""

    def __call__(
        self, rows: memoryview, *, batch_size: int, output_dim: int, model_name: str, model_version: str
    ) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class SparseRequest:
    """One validated request: its keys as canonical indices, lengths `[K, B]`, ids already in range; `frame`: how
    its answer is serialized (None: a LookupResponse)."""

    batch_size: int
    key_index: np.ndarray  # int64 [K]
    lengths: np.ndarray  # int32 [K, B]
    values: np.ndarray  # int64 [N]
    weights: np.ndarray | None  # float32 [N]
    ids_per_key: np.ndarray  # int64 [K]
    output_dtype: OutputDType = OutputDType.FLOAT32
    request_id: str = ""
    frame: Framing | None = None
