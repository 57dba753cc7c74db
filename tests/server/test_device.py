"""Device placement: a clear error without CUDA; on a CUDA host, the GPU path answers as the CPU path does."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from embserve.embeddings import ModelConfig, build_serving_model
from embserve.server.app import load_model
from embserve.server.config import ServerConfig
from embserve.server.executor import BatchExecutor
from embserve.server.request import SparseRequest
from embserve.v1 import embserve_pb2 as pb


def _requests() -> list[SparseRequest]:
    rng = np.random.default_rng(0)
    out = []
    for batch in (3, 1, 5):
        lengths = rng.integers(0, 4, size=(2, batch)).astype(np.int32)
        out.append(
            SparseRequest(
                batch_size=batch,
                key_index=np.array([0, 1]),
                lengths=lengths,
                values=rng.integers(0, 100, int(lengths.sum())),
                weights=None,
                ids_per_key=lengths.sum(axis=1, dtype=np.int64),
            )
        )
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on hosts without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
        load_model(ServerConfig(model="twhin_local", device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device")
@pytest.mark.parametrize("pipelined", [False, True])
def test_cuda_executor_matches_cpu(small_config: ModelConfig, pipelined: bool) -> None:
    cpu = BatchExecutor(build_serving_model(small_config), pipelined=pipelined)
    gpu = BatchExecutor(build_serving_model(small_config, device="cuda"), pipelined=pipelined)
    requests = _requests()
    want = asyncio.run(cpu.run(requests))
    got = asyncio.run(gpu.run(requests))
    for a, b in zip(want, got):
        assert a.batch_size == b.batch_size
        rows_a = np.frombuffer(pb.LookupResponse.FromString(a.response).embeddings, "<f4")
        rows_b = np.frombuffer(pb.LookupResponse.FromString(b.response).embeddings, "<f4")
        np.testing.assert_allclose(rows_a, rows_b, atol=1e-5)


def _fbgemm_cuda() -> bool:
    if torch.cuda.device_count() == 0:
        return False
    try:
        import fbgemm_gpu  # noqa: F401

        return hasattr(torch.ops.fbgemm, "int_nbit_split_embedding_codegen_lookup_function")
    except Exception:  # the CPU build, or none
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _fbgemm_cuda(), reason="needs a CUDA device and fbgemm-gpu's CUDA build")
@pytest.mark.parametrize("storage", ["memory", "managed"])
def test_cuda_storage_matches_cpu(small_config: ModelConfig, storage: str, tmp_path: Any) -> None:
    """Row files on CUDA: in device memory, or in fbgemm's managed caching (rows in host memory, a cache on the
    device); the answers match the CPU's."""
    from embserve.embeddings import LargeEmbeddings, init_weights, table_weights
    from embserve.embeddings.row_directory import write_row_directory

    module = LargeEmbeddings(small_config)
    init_weights(module)
    write_row_directory(small_config, {k: v.detach() for k, v in table_weights(module).items()}, tmp_path / "rows")
    cpu = BatchExecutor(build_serving_model(small_config), pipelined=False)
    gpu_model = build_serving_model(
        small_config, checkpoint=tmp_path / "rows", device="cuda", default_storage=storage, cache_load_factor=0.5
    )
    assert gpu_model.table_storage("user").value == storage
    gpu = BatchExecutor(gpu_model, pipelined=True)
    requests = _requests()
    for a, b in zip(asyncio.run(cpu.run(requests)), asyncio.run(gpu.run(requests))):
        rows_a = np.frombuffer(pb.LookupResponse.FromString(a.response).embeddings, "<f4")
        rows_b = np.frombuffer(pb.LookupResponse.FromString(b.response).embeddings, "<f4")
        np.testing.assert_allclose(rows_a, rows_b, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _fbgemm_cuda(), reason="needs a CUDA device and fbgemm-gpu's CUDA build")
def test_cuda_row_updates_match_cpu(small_config: ModelConfig) -> None:
    """Rows written into device memory (the fused engine on CUDA) answer as the same rows written on the CPU."""
    from embserve.embeddings.delta_log import RowFormat
    from embserve.embeddings.row_updates import RowWriter, check_rows

    models = [build_serving_model(small_config), build_serving_model(small_config, device="cuda")]
    ids = np.array([1, 7, 42], np.int64)
    rows = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)
    for model in models:
        checked = check_rows(
            model.table("user"),
            model.serving_dtype("user"),
            ids.tobytes(),
            rows.tobytes(),
            RowFormat.FLOAT32,
            max_rows=16,
        )
        writer = RowWriter(model)
        writer.write(writer.encode("user", *checked, RowFormat.FLOAT32))
    cpu, gpu = (BatchExecutor(m, pipelined=m.device.type == "cuda") for m in models)
    requests = _requests()
    for a, b in zip(asyncio.run(cpu.run(requests)), asyncio.run(gpu.run(requests))):
        rows_a = np.frombuffer(pb.LookupResponse.FromString(a.response).embeddings, "<f4")
        rows_b = np.frombuffer(pb.LookupResponse.FromString(b.response).embeddings, "<f4")
        np.testing.assert_allclose(rows_a, rows_b, atol=1e-5)
