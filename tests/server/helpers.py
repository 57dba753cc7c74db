"""Raw-gRPC helpers for server tests: requests from numpy, a stub, slow and failing models."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import grpc
import numpy as np
import torch

from embserve.embeddings import ServingModel
from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc


def lookup_request(
    keys: list[str],
    lengths: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray | None = None,
    dtype: pb.DType = pb.DTYPE_UNSPECIFIED,
) -> pb.LookupRequest:
    return pb.LookupRequest(
        features=pb.SparseFeatures(
            keys=keys,
            batch_size=int(lengths.shape[1]),
            lengths=lengths.astype("<i4").tobytes(),
            values=values.astype("<i8").tobytes(),
            weights=b"" if weights is None else weights.astype("<f4").tobytes(),
        ),
        output_dtype=dtype,
    )


def embeddings_of(response: pb.LookupResponse) -> np.ndarray:
    assert response.dtype == pb.DTYPE_FLOAT32
    return np.frombuffer(response.embeddings, dtype="<f4").reshape(tuple(response.shape))


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.EmbeddingServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    return channel, pb_grpc.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]


class _Wrapped(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay_s: float, fail_when: Any) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.calls = 0

    def forward(self, features: Any) -> Any:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when(features):
            raise RuntimeError("injected fault")
        return self.inner(features)


def wrapped(model: ServingModel, *, delay_s: float = 0.0, fail_when: Any = None) -> ServingModel:
    """The same model with a slower forward, or one that raises for batches `fail_when(kjt)` picks."""
    return dataclasses.replace(model, module=_Wrapped(model.module, delay_s, fail_when))
