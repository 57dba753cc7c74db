"""The Open Inference Protocol (KServe v2 gRPC) as embserve speaks it: messages, names, datatypes, tensor names.

Hand-written and torch-free. The message classes come from the descriptor set `make protos` writes next to the
vendored `.proto`, loaded into a descriptor pool of their own: tritonclient and the kserve package register the
same `inference.*` names in protobuf's default pool, and protobuf refuses a second definition in one process, so
the generated `grpc_predict_v2_pb2` (imported here for its types only) could not share a process with them.

Tensor mapping, per feature key of the model: `<key>__lengths` INT32 `[batch_size]`, `<key>__values` INT64 `[n]`
and, for weighted tables, `<key>__weights` FP32 `[n]`; the output `embeddings` `[batch_size, output_dim]`.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from embserve.v1.wire import OutputDType

__all__ = [
    "DATATYPES",
    "DATATYPE_OF",
    "INPUT_SUFFIXES",
    "METHODS",
    "MODEL_INFER_METHOD",
    "OUTPUT_DATATYPE_PARAMETER",
    "OUTPUT_DATATYPES",
    "OUTPUT_NAME",
    "POOL",
    "SERVICE_NAME",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "input_name",
    "method_path",
    "split_input_name",
]

PROTO_FILE = "embserve/oip/grpc_predict_v2.proto"


def _load_pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files(__package__).joinpath("grpc_predict_v2.binpb").read_bytes()
    )
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _load_pool()
"""The protocol's descriptors, apart from protobuf's default pool (also what server reflection serves)."""


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


if TYPE_CHECKING:
    from .grpc_predict_v2_pb2 import (
        InferParameter,
        InferTensorContents,
        ModelInferRequest,
        ModelInferResponse,
        ModelMetadataRequest,
        ModelMetadataResponse,
        ModelReadyRequest,
        ModelReadyResponse,
        ServerLiveRequest,
        ServerLiveResponse,
        ServerMetadataRequest,
        ServerMetadataResponse,
        ServerReadyRequest,
        ServerReadyResponse,
    )
else:
    InferParameter = _message("InferParameter")
    InferTensorContents = _message("InferTensorContents")
    ModelInferRequest = _message("ModelInferRequest")
    ModelInferResponse = _message("ModelInferResponse")
    ModelMetadataRequest = _message("ModelMetadataRequest")
    ModelMetadataResponse = _message("ModelMetadataResponse")
    ModelReadyRequest = _message("ModelReadyRequest")
    ModelReadyResponse = _message("ModelReadyResponse")
    ServerLiveRequest = _message("ServerLiveRequest")
    ServerLiveResponse = _message("ServerLiveResponse")
    ServerMetadataRequest = _message("ServerMetadataRequest")
    ServerMetadataResponse = _message("ServerMetadataResponse")
    ServerReadyRequest = _message("ServerReadyRequest")
    ServerReadyResponse = _message("ServerReadyResponse")

_SERVICE = POOL.FindServiceByName("inference.GRPCInferenceService")
SERVICE_NAME: str = _SERVICE.full_name
METHODS: tuple[str, ...] = tuple(m.name for m in _SERVICE.methods)


def method_path(method: str) -> str:
    """The HTTP/2 path of a GRPCInferenceService method, e.g. `/inference.GRPCInferenceService/ModelInfer`."""
    return f"/{SERVICE_NAME}/{method}"


MODEL_INFER_METHOD = method_path("ModelInfer")

# The protocol's datatype names of the tensors embserve reads and writes, with their little-endian numpy types
# (BF16: raw bfloat16 bit patterns, as the protocol sends them).
DATATYPES: dict[str, np.dtype[Any]] = {
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
# Input tensor kinds by name suffix: `<key>__lengths` and so on, with the datatype each must have.
INPUT_SUFFIXES: dict[str, str] = {"lengths": "INT32", "values": "INT64", "weights": "FP32"}
OUTPUT_NAME = "embeddings"
# The output datatypes a caller may ask for (request parameter `output_datatype`, or the parameter `datatype` of
# the requested output), by the embserve output dtype each stands for.
OUTPUT_DATATYPE_PARAMETER = "output_datatype"
OUTPUT_DATATYPES: dict[str, OutputDType] = {
    "FP32": OutputDType.FLOAT32,
    "FP16": OutputDType.FLOAT16,
    "BF16": OutputDType.BFLOAT16,
}
DATATYPE_OF: dict[OutputDType, str] = {v: k for k, v in OUTPUT_DATATYPES.items()}


def input_name(key: str, kind: str) -> str:
    """The input tensor of feature `key` holding `kind` (lengths, values or weights), e.g. `user__values`."""
    return f"{key}__{kind}"


def split_input_name(name: str) -> tuple[str, str] | None:
    """(key, kind) of an input tensor name, or None when it does not end in a known `__<kind>`."""
    key, sep, kind = name.rpartition("__")
    return (key, kind) if sep and key and kind in INPUT_SUFFIXES else None
