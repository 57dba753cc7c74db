from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from embserve.embeddings import (
    CheckpointError,
    LargeEmbeddings,
    build_serving_model,
    check_checkpoint,
    init_weights,
    load_checkpoint,
    save_checkpoint,
    table_weights,
)
from embserve.embeddings.weights import checkpoint_digest, read_state_dict
from tests.support import SMALL_TABLES, float_tables, make_config


def _weights(model: LargeEmbeddings) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in table_weights(model).items()}


def test_init_is_deterministic_and_per_table() -> None:
    a = float_tables(make_config(), seed=1)
    b = float_tables(make_config(), seed=1)
    c = float_tables(make_config(), seed=2)
    reordered = float_tables(make_config(list(reversed(SMALL_TABLES))), seed=1)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], reordered[name])
        assert not np.array_equal(a[name], c[name])
        bound = np.sqrt(1.0 / a[name].shape[0])
        assert np.abs(a[name]).max() <= bound * 1.001


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    config = make_config()
    src = LargeEmbeddings(config)
    init_weights(src, seed=7)
    path = tmp_path / f"ckpt{suffix}"
    save_checkpoint(src, path)
    dst = LargeEmbeddings(config)
    init_weights(dst, seed=0)
    load_checkpoint(dst, path)
    for name, w in _weights(src).items():
        np.testing.assert_array_equal(_weights(dst)[name], w)
    served = build_serving_model(config, checkpoint=path)
    assert served.version.startswith("ckpt-") and len(served.version) == len("ckpt-") + 12


def test_seed_style_state_dict_with_model_prefix_loads(tmp_path: Path) -> None:
    config = make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 4}])
    weight = torch.randn(50, 4)
    # A whole seed model's state dict: the embedding module sits under a prefix, next to dense layers.
    state = {
        "model.large_embeddings.ebc.embedding_bags.user.weight": weight,
        "model.mlp.0.weight": torch.randn(3, 3),
    }
    path = tmp_path / "seed.pt"
    torch.save(state, path)
    model = LargeEmbeddings(config)
    load_checkpoint(model, path)
    np.testing.assert_array_equal(_weights(model)["user"], weight.numpy())


def test_mismatches_name_the_table(tmp_path: Path) -> None:
    config = make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 4}])
    model = LargeEmbeddings(config)
    cases = {
        "shape.pt": (
            {"ebc.embedding_bags.user.weight": torch.zeros(49, 4)},
            r"table 'user': checkpoint shape \(49, 4\)",
        ),
        "missing.pt": (
            {"ebc.embedding_bags.other.weight": torch.zeros(50, 4)},
            r"tables the model does not: \['other'\]",
        ),
        "empty.pt": ({}, "no weights for table 'user'"),
        "nan.pt": ({"ebc.embedding_bags.user.weight": torch.full((50, 4), float("nan"))}, "non-finite"),
        "int.pt": ({"ebc.embedding_bags.user.weight": torch.zeros(50, 4, dtype=torch.int64)}, "not a float type"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(model, tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "absent.pt")
    # The check before the model is built finds the same file and table problems from the metadata alone.
    for name in ("shape.pt", "missing.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=cases[name][1]):
            check_checkpoint(config, tmp_path / name)
        assert str(tmp_path / name) in str(
            pytest.raises(CheckpointError, check_checkpoint, config, tmp_path / name).value
        )
    torch.save({"ebc.embedding_bags.user.weight": torch.zeros(50, 4)}, tmp_path / "ok.pt")
    check_checkpoint(config, tmp_path / "ok.pt")
    save_checkpoint(model, tmp_path / "ok.safetensors")
    check_checkpoint(config, tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match=r"table 'user': checkpoint shape \(50, 4\)"):
        check_checkpoint(
            make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 8}]), tmp_path / "ok.safetensors"
        )
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        check_checkpoint(config, tmp_path / "junk.safetensors")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled arbitrary code",))


def test_pickled_objects_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ebc.embedding_bags.user.weight": _Exploit()}, f)
    model = LargeEmbeddings(make_config([{"name": "user", "num_embeddings": 5, "embedding_dim": 2}]))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, garbage)


@pytest.mark.parametrize("shape", [(1, 4), (4,), (50, 1)])
def test_broadcastable_shapes_are_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """A (1, dim) or (dim,) table would fill every row by broadcasting if only the copy checked the shape."""
    model = LargeEmbeddings(make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 4}]))
    init_weights(model, 0)
    before = _weights(model)["user"]
    torch.save({"ebc.embedding_bags.user.weight": torch.ones(shape)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=rf"table 'user': checkpoint shape \({shape[0]},"):
        load_checkpoint(model, tmp_path / "w.pt")
    np.testing.assert_array_equal(_weights(model)["user"], before)  # nothing written


def _safetensors_file(
    path: Path, entries: dict[str, tuple[str, list[int], int, int]], data: bytes, *, data_at: int = 8
) -> Path:
    """A safetensors file written by hand: header entries (dtype, shape, start, end) over `data`, which starts at a
    byte offset that is `data_at` modulo 8 (the header padded with spaces)."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": [a, b]} for k, (d, s, a, b) in entries.items()}
    text = json.dumps(header).encode()
    text += b" " * ((data_at - 8 - len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_safetensors_reads_as_the_safetensors_library_reads_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = {
        "a": torch.randn(7, 5),
        "b": torch.randn(3, 4).half(),
        "c": torch.randn(6).bfloat16(),
        "d": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "e": torch.tensor([True, False, True]),
        "f": torch.zeros(0, 4),
        "g": torch.tensor(2.5),
        "h": torch.randn(4).to(torch.float8_e4m3fn),
    }
    save_file(state, str(tmp_path / "w.safetensors"))
    read, digest = read_state_dict(tmp_path / "w.safetensors")
    reference = load_file(str(tmp_path / "w.safetensors"))
    assert read.keys() == reference.keys() and digest == checkpoint_digest(tmp_path / "w.safetensors")
    for key, tensor in reference.items():
        assert read[key].dtype == tensor.dtype and read[key].shape == tensor.shape
        assert torch.equal(read[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    # A tensor whose bytes start off its type's alignment is read too (copied to an aligned place).
    values = np.arange(6, dtype="<f4")
    odd = _safetensors_file(tmp_path / "odd.safetensors", {"x": ("F32", [2, 3], 0, 24)}, values.tobytes(), data_at=3)
    assert (8 + int.from_bytes(odd.read_bytes()[:8], "little")) % 4 == 3
    np.testing.assert_array_equal(read_state_dict(odd)[0]["x"].numpy(), values.reshape(2, 3))


@pytest.mark.parametrize(
    ("entries", "data", "problem"),
    [
        ({"x": ("F32", [4], 0, 16)}, b"\0" * 8, "its tensors take 16 bytes and its data has 8"),
        ({"x": ("F32", [4], 0, 16)}, b"\0" * 24, "its tensors take 16 bytes and its data has 24"),
        ({"x": ("F32", [4], 0, 12)}, b"\0" * 16, "tensor 'x' has 12 bytes for shape [4]"),
        ({"x": ("F32", [-4], 0, 0)}, b"", "tensor 'x' has no valid dtype, shape and offsets"),
        ({"x": ("F32", [2.0], 0, 8)}, b"\0" * 8, "tensor 'x' has no valid dtype, shape and offsets"),
        ({"x": ("Q4", [4], 0, 16)}, b"\0" * 16, "tensor 'x' has no valid dtype, shape and offsets"),
        ({"x": ("F32", [4], 16, 0)}, b"\0" * 16, "tensor 'x' has -16 bytes for shape [4]"),
        ({"x": ("F32", [2], 0, 8), "y": ("F32", [2], 4, 12)}, b"\0" * 12, "tensor 'y' does not follow the one before"),
        ({"x": ("F32", [2], 0, 8), "y": ("F32", [2], 12, 20)}, b"\0" * 20, "tensor 'y' does not follow the one before"),
    ],
)
def test_damaged_safetensors_headers_are_refused_naming_the_tensor(
    tmp_path: Path, entries: dict[str, tuple[str, list[int], int, int]], data: bytes, problem: str
) -> None:
    path = _safetensors_file(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        read_state_dict(path)


def test_safetensors_headers_with_a_name_twice_or_odd_metadata_are_refused(tmp_path: Path) -> None:
    twice = b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "x": {"dtype": "U8", "shape": [1], '
    twice += b'"data_offsets": [0, 1]}}'
    odd = b'{"__metadata__": {"a": 1}, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    for name, header, problem in (("twice", twice, "names a tensor twice"), ("odd", odd, "not a mapping of strings")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
        with pytest.raises(CheckpointError, match=problem):
            read_state_dict(path)
