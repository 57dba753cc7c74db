"""Row files: the fused engine's rows byte for byte, headers checked without reading rows, digests, sparse
writing, atomic renames, and the row directory's version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from embserve.embeddings import (
    CheckpointError,
    LargeEmbeddings,
    ServingDType,
    build_serving_model,
    init_weights,
    table_weights,
)
from embserve.embeddings.row_directory import (
    check_row_directory,
    row_directory_version,
    row_file_path,
    write_row_directory,
)
from embserve.embeddings.row_files import (
    DATA_OFFSET,
    RowFileWriter,
    encode_rows,
    read_header,
    row_bytes,
    verify_row_file,
)
from tests.support import make_config

TABLES = [
    {"name": "f32", "num_embeddings": 70, "embedding_dim": 12},
    {"name": "f16", "num_embeddings": 50, "embedding_dim": 8, "data_type": "fp16"},
    {"name": "q8", "num_embeddings": 40, "embedding_dim": 12, "serving_dtype": "int8"},
    {"name": "q4", "num_embeddings": 30, "embedding_dim": 8, "serving_dtype": "int4", "weighted": True},
]


def _weights(config: object) -> dict[str, torch.Tensor]:
    module = LargeEmbeddings(config)  # type: ignore[arg-type]
    init_weights(module, 5)
    return {k: v.detach() for k, v in table_weights(module).items()}


def test_rows_are_the_fused_engines_bytes() -> None:
    config = make_config(TABLES, name="rows")
    weights = _weights(config)
    fused = build_serving_model(config, seed=5)  # torchrec's quantized collection, converted in memory
    buffers = {}
    module: Any
    for module in fused.module.modules():
        if type(module).__name__ == "IntNBitTableBatchedEmbeddingBagsCodegen":
            for spec, (rows, _, _) in zip(module.embedding_specs, module.split_embedding_weights_with_scale_bias(0)):
                buffers[spec[0]] = rows.numpy()
    assert set(buffers) == {t["name"] for t in TABLES}
    for table in config.tables:
        encoded = encode_rows(weights[table.name], table.effective_serving_dtype)
        assert encoded.shape == (table.num_embeddings, row_bytes(table.embedding_dim, table.effective_serving_dtype))
        assert np.array_equal(encoded, buffers[table.name]), table.name


def test_header_is_read_without_the_rows_and_sizes_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with RowFileWriter(
        path, table="t", num_embeddings=100, embedding_dim=16, serving_dtype=ServingDType.FP16, source="test"
    ) as writer:
        writer.write(0, encode_rows(torch.arange(1600, dtype=torch.float32).view(100, 16), ServingDType.FP16))
        header = writer.finish()
    assert read_header(path) == header
    assert (header.table, header.num_embeddings, header.row_bytes, header.source) == ("t", 100, 32, "test")
    assert path.stat().st_size == DATA_OFFSET + 100 * 32
    with safe_open(str(path), framework="np") as f:  # any safetensors reader opens it
        assert f.get_tensor("rows").shape == (100, 32)
        assert f.metadata()["table"] == "t"
    with open(path, "r+b") as f:
        f.truncate(DATA_OFFSET + 99 * 32)
    with pytest.raises(CheckpointError, match="of table 't' is truncated"):
        read_header(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 5000)
    with pytest.raises(CheckpointError, match="not an embserve row file"):
        read_header(tmp_path / "junk.safetensors")


def test_the_digest_finds_a_changed_row(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with RowFileWriter(path, table="t", num_embeddings=10, embedding_dim=4, serving_dtype=ServingDType.FP32) as w:
        w.write(0, encode_rows(torch.ones(10, 4), ServingDType.FP32))
        w.finish()
    assert verify_row_file(path).table == "t"
    with open(path, "r+b") as f:
        f.seek(DATA_OFFSET + 17)
        f.write(b"\x01")
    read_header(path)  # the size is right: only the digest can tell
    with pytest.raises(CheckpointError, match="table 't': its rows do not match the digest"):
        verify_row_file(path)


def test_a_sparse_file_costs_no_disk_where_no_row_was_written(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    rows = (8 << 30) // 256  # 8 GiB of 64-dim fp32 rows
    with RowFileWriter(path, table="big", num_embeddings=rows, embedding_dim=64, serving_dtype=ServingDType.FP32) as w:
        w.write(rows - 2, encode_rows(torch.full((2, 64), 3.0), ServingDType.FP32))
        header = w.finish()
    assert path.stat().st_size == header.file_bytes > 8 << 30
    assert path.stat().st_blocks * 512 < 1 << 24  # a few pages of data, not 8 GiB
    assert verify_row_file(path).digest == header.digest  # the holes are not read


def test_a_file_appears_only_once_written(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    writer = RowFileWriter(path, table="t", num_embeddings=4, embedding_dim=4, serving_dtype=ServingDType.FP32)
    writer.write(0, encode_rows(torch.ones(4, 4), ServingDType.FP32))
    assert not path.exists()  # a reader never sees half a file
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="outside"):
        with RowFileWriter(path, table="t", num_embeddings=4, embedding_dim=4, serving_dtype=ServingDType.FP32) as w:
            w.write(3, encode_rows(torch.ones(2, 4), ServingDType.FP32))
    assert list(tmp_path.iterdir()) == []  # an error removes the temporary file


def test_row_directory_version_follows_the_rows(tmp_path: Path) -> None:
    config = make_config(TABLES, name="rows")
    weights = _weights(config)
    first = write_row_directory(config, weights, tmp_path / "a")
    again = write_row_directory(config, weights, tmp_path / "b")
    assert first.split("-", 1)[1] == again.split("-", 1)[1]  # same rows, same digest
    assert first == row_directory_version(config, tmp_path / "a")
    weights["f32"] = weights["f32"] + 1
    changed = write_row_directory(config, weights, tmp_path / "a")
    assert changed != first
    serving = {t.name: t.effective_serving_dtype for t in config.tables}
    assert set(check_row_directory(config, tmp_path / "a", serving)) == {t["name"] for t in TABLES}
    os.remove(row_file_path(tmp_path / "a", "q8"))
    with pytest.raises(CheckpointError, match="table 'q8': no row file"):
        check_row_directory(config, tmp_path / "a", serving)
    with pytest.raises(CheckpointError, match="table 'f32'.*holds 'f32' 70 x 12 fp32, the model says 70 x 12 fp16"):
        check_row_directory(config, tmp_path / "b", {**serving, "f32": ServingDType.FP16})
