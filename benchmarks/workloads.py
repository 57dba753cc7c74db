"""Benchmark workloads: a model config plus a deterministic request generator each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from embserve.embeddings.config import ModelConfig, model_config_from_dict
from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, pack_features

__all__ = ["Request", "WORKLOADS", "Workload", "encode_lookups", "encode_model_infer", "zipf_ids"]


@dataclasses.dataclass(frozen=True)
class Request:
    """One request's features in wire layout (canonical key order, every key present)."""

    keys: tuple[str, ...]
    lengths: np.ndarray  # int32 [K, B]
    values: np.ndarray  # int64

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[1])


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    config: ModelConfig
    make_request: Callable[[np.random.Generator], Request]

    def requests(self, count: int, seed: int = 0) -> list[Request]:
        rng = np.random.default_rng(seed)
        return [self.make_request(rng) for _ in range(count)]


def zipf_ids(rng: np.random.Generator, rows: int, size: int, a: float = 1.2) -> np.ndarray:
    """Zipf-like ids in [0, rows): a few hot ids, a long tail (hashed so hot ids spread over the table)."""
    ranks = rng.zipf(a, size=size).astype(np.int64)
    return (ranks * 2654435761) % rows


def _one_hot(config: ModelConfig, rng: np.random.Generator, batch: int) -> Request:
    keys = tuple(t.name for t in config.tables)
    lengths = np.ones((len(keys), batch), dtype=np.int32)
    values = np.concatenate([zipf_ids(rng, t.num_embeddings, batch) for t in config.tables])
    return Request(keys, lengths, values)


def _small(rows: int = 100_000) -> Workload:
    config = model_config_from_dict(
        {
            "name": "small",
            "tables": [{"name": f"f{i}", "num_embeddings": rows, "embedding_dim": 64} for i in range(26)],
        }
    )
    return Workload(
        "small",
        "26 tables x 100,000 rows x dim 64 fp32; one id per feature; 1 to 8 examples per request",
        config,
        lambda rng: _one_hot(config, rng, int(rng.integers(1, 9))),
    )


def _large(rows: int = 100_000) -> Workload:
    config = _small(rows).config.model_copy(update={"name": "large"})
    return Workload(
        "large",
        "the small model; 512 examples per request (one user x 512 candidates)",
        config,
        lambda rng: _one_hot(config, rng, 512),
    )


def _multihot(rows: int = 500_000) -> Workload:
    tables = [
        {"name": f"m{i}", "num_embeddings": rows, "embedding_dim": 128, "data_type": "fp16" if i % 2 else "fp32"}
        for i in range(8)
    ]
    config = model_config_from_dict({"name": "multihot", "tables": tables})

    def make(rng: np.random.Generator) -> Request:
        batch = 64
        keys = tuple(t.name for t in config.tables)
        lengths = rng.integers(1, 41, size=(len(keys), batch)).astype(np.int32)
        values = np.concatenate(
            [zipf_ids(rng, t.num_embeddings, int(lengths[i].sum())) for i, t in enumerate(config.tables)]
        )
        return Request(keys, lengths, values)

    return Workload(
        "multihot", "8 tables x 500,000 rows x dim 128 (half fp16); 1 to 40 ids per bag; 64 examples", config, make
    )


# Each takes the rows per table (default: the benchmark's): fewer rows give the same requests and answers, in
# shape and size, over a model that loads in a moment.
WORKLOADS: dict[str, Callable[..., Workload]] = {"small": _small, "large": _large, "multihot": _multihot}


def encode_lookups(requests: Sequence[Request], dtype: str = "float32") -> list[bytes]:
    """Serialized LookupRequests."""
    return [
        pb.LookupRequest(
            features=pack_features(r.keys, r.batch_size, r.lengths, r.values), output_dtype=OutputDType(dtype).wire
        ).SerializeToString()
        for r in requests
    ]


def encode_model_infer(requests: Sequence[Request], model_name: str) -> list[bytes]:
    """Serialized ModelInferRequests with raw contents: per key `<key>__lengths` and `<key>__values`."""
    payloads = []
    for r in requests:
        request = oip.ModelInferRequest(model_name=model_name)
        ids = np.concatenate([[0], np.cumsum(r.lengths.sum(axis=1))]).astype(np.int64)
        for k, key in enumerate(r.keys):
            lengths = r.lengths[k].astype("<i4")
            values = r.values[ids[k] : ids[k + 1]].astype("<i8")
            request.inputs.add(name=oip.input_name(key, "lengths"), datatype="INT32", shape=[lengths.size])
            request.inputs.add(name=oip.input_name(key, "values"), datatype="INT64", shape=[values.size])
            request.raw_input_contents.extend([lengths.tobytes(), values.tobytes()])
        payloads.append(request.SerializeToString())
    return payloads
