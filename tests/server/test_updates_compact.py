"""Compaction: a base and its delta log folded into a new base; moving a server to it keeps every answered update,
those answered after the compaction included (carried over once, however often the new base is opened)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from embserve.client import Client
from embserve.embeddings import LargeEmbeddings, ModelConfig, build_serving_model, load_checkpoint, table_weights
from embserve.embeddings.compact import compact
from embserve.embeddings.config import ServingDType
from embserve.embeddings.delta_log import default_log_dir
from embserve.embeddings.errors import CheckpointError
from embserve.embeddings.row_directory import write_row_directory
from embserve.embeddings.row_files import encode_rows
from tests.server.test_updates import FEATURES, TABLES, WEIGHTS, _checkpoint, _floats
from tests.support import ServerHandle, make_config, write_model_config

Factory = Callable[..., ServerHandle]
BIN = Path(sys.executable).parent / "embserve"


@pytest.fixture
def config() -> ModelConfig:
    return make_config(TABLES, name="fresh")


def _row(value: float, dim: int = 16) -> np.ndarray:
    return np.full((1, dim), value, np.float32)


def test_a_compacted_checkpoint_keeps_every_update_and_carries_later_ones_once(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    first = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    model_file = write_model_config(config, tmp_path / "m.yaml")
    settings = {"model": str(model_file), "checkpoint": str(first), "updates": {"enabled": True}}
    handle = server_factory(build_serving_model(config, checkpoint=first), **settings)
    with Client(handle.address) as client:
        for i in range(1, 4):
            client.update_rows("user", [i], _row(i))
        client.update_rows("author", [7], np.full((1, 8), 0.5, np.float32))
        result = compact(config, first, default_log_dir(first), tmp_path / "b.safetensors")
        assert (result.folded_through, result.rows) == (4, 4)
        for i in range(4, 6):  # answered on the old base after the compaction read its log
            client.update_rows("user", [i], _row(i))
        handle.call(handle.server.reload(str(result.output)))
        served = client.lookup({"user": [[i] for i in range(1, 7)], "author": [[7]] + [[]] * 5})
        assert served.model_version == f"{result.version}+2"  # the two later updates, carried over
    np.testing.assert_array_equal(served["user"][:5], np.arange(1, 6, dtype=np.float32)[:, None] * np.ones(16))
    np.testing.assert_array_equal(served["user"][5], _floats(config)["user"][6].numpy())
    np.testing.assert_array_equal(served["author"][0], np.full(8, 0.5, np.float32))
    # The compacted file itself holds the four folded updates, as the loader reads them.
    module = LargeEmbeddings(config)
    load_checkpoint(module, result.output)
    weights = table_weights(module)
    np.testing.assert_array_equal(weights["user"][1:4].detach().numpy(), np.arange(1, 4)[:, None] * np.ones((1, 16)))
    np.testing.assert_array_equal(weights["user"][4].detach().numpy(), _floats(config)["user"][4].numpy())
    # A restart on the compacted base carries nothing twice.
    again = server_factory(
        build_serving_model(config, checkpoint=result.output), **{**settings, "checkpoint": str(result.output)}
    )
    with Client(again.address) as client:
        assert client.metadata().version == f"{result.version}+2"
        np.testing.assert_array_equal(client.lookup({"user": [[5]]})["user"][0], _row(5)[0])


def test_a_compacted_row_directory_serves_what_the_updated_server_served(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    write_row_directory(config, _floats(config), tmp_path / "rows")
    model = build_serving_model(config, checkpoint=tmp_path / "rows", default_storage="mmap", copy_on_write=True)
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    int8 = encode_rows(torch.full((2, 8), 0.3), ServingDType.INT8)[:, :12]  # scale, bias, 8 codes
    with Client(handle.address) as client:
        client.update_rows("user", [0, 1999], np.ones((2, 16), np.float32) * 0.125)
        client.update_rows("topics", [3, 4], int8.tobytes(), serving=True)
        client.update_rows("hashtags", [5], np.full((1, 12), -2.0, np.float32))
        updated = client.lookup(FEATURES | {"topics": [[3, 4], [4], []]}, weights=WEIGHTS)
    result = compact(config, tmp_path / "rows", tmp_path / "log", tmp_path / "rows-2")
    assert result.folded_through == 3 and result.version.startswith("rows-2-")
    fresh = server_factory(build_serving_model(config, checkpoint=result.output, default_storage="mmap"))
    with Client(fresh.address) as client:
        compacted = client.lookup(FEATURES | {"topics": [[3, 4], [4], []]}, weights=WEIGHTS)
    np.testing.assert_array_equal(compacted.embeddings, updated.embeddings)


def test_compaction_refuses_what_it_cannot_do_in_one_line(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    first = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="no delta log of base"):
        compact(config, first, tmp_path / "nowhere", tmp_path / "b.safetensors")
    handle = server_factory(
        build_serving_model(config, checkpoint=first), checkpoint=str(first), updates={"enabled": True}
    )
    int8 = encode_rows(torch.full((1, 8), 0.3), ServingDType.INT8)[:, :12]
    with Client(handle.address) as client:
        client.update_rows("topics", [3], int8.tobytes(), serving=True)
    with pytest.raises(CheckpointError, match="table 'topics': update 1 holds int8 rows"):
        compact(config, first, default_log_dir(first), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists() and not list(tmp_path.glob(".b.safetensors*"))
    (tmp_path / "c.safetensors").write_bytes(b"")
    model_file = write_model_config(config, tmp_path / "m.yaml")
    proc = subprocess.run(
        [
            str(BIN),
            "compact",
            "--model",
            str(model_file),
            "--checkpoint",
            str(first),
            "--output",
            str(tmp_path / "c.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "exists; compact into a new path" in proc.stderr
