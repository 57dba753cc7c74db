"""`embserve convert` and `embserve export`: trained weights in every supported layout become a checkpoint whose
values equal the original tables (numpy), and bad inputs fail with one message naming the problem."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import (
    LargeEmbeddings,
    ModelConfig,
    build_serving_model,
    canonical_keys,
    init_weights,
    load_checkpoint,
    load_model_config,
    model_config_from_dict,
    save_checkpoint,
    table_weights,
)
from embserve.embeddings.convert import ConvertError, convert, read_dcp_metadata
from embserve.client.cli import main
from tests.conftest import make_config, write_model_config
from tests.embeddings import _dcp_writer
from tests.reference import pool, random_features

RNG_TABLES = {"user": (60, 8, np.float32), "author": (30, 4, np.float16), "topics": (25, 6, np.float32)}


def _tables(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((r, d)).astype(t) for n, (r, d, t) in RNG_TABLES.items()}


def _loaded(config: ModelConfig, checkpoint: Path) -> dict[str, np.ndarray]:
    """The tables as embserve serves them: a fresh module, the checkpoint loaded through `load_checkpoint`."""
    model = LargeEmbeddings(config)
    load_checkpoint(model, checkpoint)
    return {k: v.detach().numpy().copy() for k, v in table_weights(model).items()}


@pytest.mark.parametrize(
    "prefix",
    ["", "ebc.", "model.large_embeddings.ebc.", "sparse_arch.embedding_bag_collection."],
    ids=["torchrec-ebc", "seed-module", "seed-model", "dlrm-style"],
)
def test_state_dict_with_any_prefix_converts_value_for_value(tmp_path: Path, prefix: str) -> None:
    tables = _tables()
    source = tmp_path / "trained.pt"
    torch.save({f"{prefix}embedding_bags.{n}.weight": torch.from_numpy(w) for n, w in tables.items()}, source)
    out, yaml_path = tmp_path / "out.safetensors", tmp_path / "out.yaml"
    config = convert(source, out, model_yaml=yaml_path)

    assert load_model_config(yaml_path) == config
    assert [(t.name, t.num_embeddings, t.embedding_dim, t.data_type.value, t.weighted) for t in config.tables] == [
        ("user", 60, 8, "fp32", False),
        ("author", 30, 4, "fp16", False),
        ("topics", 25, 6, "fp32", False),
    ]
    # The file carries the seed's keys, and serving loads the very same values (fp16 stays fp16).
    assert sorted(load_file(str(out))) == sorted(f"ebc.embedding_bags.{n}.weight" for n in tables)
    loaded = _loaded(config, out)
    for name, weight in tables.items():
        assert loaded[name].dtype == weight.dtype
        np.testing.assert_array_equal(loaded[name], weight)


def test_seed_model_with_weighted_tables_and_dense_layers(tmp_path: Path) -> None:
    config = make_config()
    seed_module = LargeEmbeddings(config)
    init_weights(seed_module, seed=5)
    expected = {k: v.detach().numpy().copy() for k, v in table_weights(seed_module).items()}
    state: dict[str, Any] = {f"model.large_embeddings.{k}": v for k, v in seed_module.state_dict().items()}
    state["model.mlp.weight"] = torch.ones(3, 3)
    # A training checkpoint nests the model next to counters that are not tensors of the model.
    source = tmp_path / "train_state.pt"
    torch.save({"model_state": state, "step": 1200}, source)

    with pytest.raises(ConvertError, match=r"2 keys are not embedding-table weights.*'model_state.model.mlp.weight'.*--ignore-other-keys"):
        convert(source, tmp_path / "x.safetensors")

    inferred = convert(source, tmp_path / "out.safetensors", ignore_other_keys=True)
    assert {t.name: t.weighted for t in inferred.tables} == {t.name: t.weighted for t in config.tables}
    loaded = _loaded(inferred, tmp_path / "out.safetensors")
    for name, weight in expected.items():
        np.testing.assert_array_equal(loaded[name], weight)


def test_bfloat16_widens_exactly_and_safetensors_input(tmp_path: Path) -> None:
    values = torch.randn(40, 8).to(torch.bfloat16)
    from safetensors.torch import save_file

    source = tmp_path / "trained.safetensors"
    save_file({"embedding_bags.user.weight": values}, str(source))
    config = convert(source, tmp_path / "out.safetensors")
    assert config.tables[0].data_type.value == "fp32"
    np.testing.assert_array_equal(_loaded(config, tmp_path / "out.safetensors")["user"], values.float().numpy())


def test_model_config_sets_order_and_serving_fields_and_is_checked(tmp_path: Path) -> None:
    tables = _tables()
    source = tmp_path / "trained.pt"
    torch.save({f"embedding_bags.{n}.weight": torch.from_numpy(w) for n, w in tables.items()}, source)
    model = model_config_from_dict(
        {
            "name": "ranker",
            "tables": [
                {"name": "topics", "num_embeddings": 25, "embedding_dim": 6, "weighted": True},
                {"name": "user", "num_embeddings": 60, "embedding_dim": 8, "id_policy": "hash"},
                {"name": "author", "num_embeddings": 30, "embedding_dim": 4, "data_type": "fp16"},
            ],
        }
    )
    out = tmp_path / "out.safetensors"
    assert convert(source, out, model=model, model_yaml=tmp_path / "m.yaml") == model
    assert load_model_config(tmp_path / "m.yaml") == model
    assert "weighted_ebc.embedding_bags.topics.weight" in load_file(str(out))
    loaded = _loaded(model, out)
    for name, weight in tables.items():
        np.testing.assert_array_equal(loaded[name], weight)

    wrong_rows = model_config_from_dict(
        {"tables": [{"name": n, "num_embeddings": 61 if n == "user" else r, "embedding_dim": d} for n, (r, d, _) in RNG_TABLES.items()]}
    )
    with pytest.raises(ConvertError, match=r"table 'user': weights are 60 x 8, the model config says 61 x 8"):
        convert(source, tmp_path / "y.safetensors", model=wrong_rows)
    fewer = model_config_from_dict({"tables": [{"name": "user", "num_embeddings": 60, "embedding_dim": 8}, {"name": "video", "num_embeddings": 5, "embedding_dim": 2}]})
    with pytest.raises(ConvertError, match=r"missing from the weights: \['video'\]; not in the model config: \['author', 'topics'\]"):
        convert(source, tmp_path / "y.safetensors", model=fewer)
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"dense.weight": torch.ones(2, 2)}, r"no embedding tables found.*'dense.weight'"),
        ({"embedding_bags.user.weight": torch.ones(10)}, r"table 'user' \('embedding_bags.user.weight'\) has shape \[10\], not \[rows, dim\]"),
        ({"embedding_bags.user.weight": torch.ones(4, 2, dtype=torch.int64)}, r"table 'user'.*dtype torch.int64; expected float32"),
        ({"embedding_bags.user.weight": torch.ones(4, 2, dtype=torch.float64)}, r"dtype torch.float64"),
        (
            {"a.ebc.embedding_bags.user.weight": torch.ones(4, 2), "b.ebc.embedding_bags.user.weight": torch.ones(4, 2)},
            r"table 'user' appears twice, at 'a.ebc.embedding_bags.user.weight' and 'b.ebc.embedding_bags.user.weight'",
        ),
        ({"embedding_bags.user.weight": torch.tensor([[1.0, float("nan")]])}, r"table 'user'.*non-finite weights"),
        ({"embedding_bags.user.weight": torch.ones(4, 2), "embedding_bags.user.bias": torch.ones(2)}, r"1 keys are not embedding-table weights \('embedding_bags.user.bias'\)"),
    ],
    ids=["no-tables", "1-d", "int", "float64", "duplicate", "nan", "unknown-key"],
)
def test_bad_state_dicts_are_named(tmp_path: Path, state: dict[str, torch.Tensor], message: str) -> None:
    source = tmp_path / "bad.pt"
    torch.save(state, source)
    with pytest.raises(ConvertError, match=message):
        convert(source, tmp_path / "out.safetensors")


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    source = tmp_path / "evil.pt"
    source.write_bytes(pickle.dumps({"embedding_bags.user.weight": Payload()}))
    with pytest.raises(ConvertError, match=r"evil.pt: cannot read weights"):
        convert(source, tmp_path / "out.safetensors")
    dcp_dir = tmp_path / "evil_dcp"
    dcp_dir.mkdir()
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConvertError, match=r"cannot read DCP metadata: UnpicklingError: refusing to load pathlib.Path.touch"):
        convert(dcp_dir, tmp_path / "out.safetensors")
    assert not marker.exists()


def _single_process_dcp(path: Path, state: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_dcp_with_shards_that_do_not_tile_the_table(tmp_path: Path) -> None:
    """A tampered layout (shards overlapping, or leaving rows uncovered) is refused before any value is read."""
    ckpt = tmp_path / "ckpt"
    _single_process_dcp(ckpt, {"embedding_bags.user.weight": torch.ones(10, 4)})
    metadata = read_dcp_metadata(ckpt)
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    entry = metadata.state_dict_metadata["embedding_bags.user.weight"]
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([6, 4])), ChunkStorageMetadata(torch.Size([5, 0]), torch.Size([5, 4]))]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConvertError, match=r"'embedding_bags.user.weight': shards at offsets \[0, 0\] and \[5, 0\] overlap"):
        convert(ckpt, tmp_path / "out.safetensors")
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([6, 4]))]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConvertError, match=r"shards cover 24 of 40 elements"):
        convert(ckpt, tmp_path / "out.safetensors")
    with pytest.raises(ConvertError, match=r"without a .metadata file"):
        convert(tmp_path, tmp_path / "out.safetensors")


# --- a real sharded save: 2 processes, gloo, torchrec DistributedModelParallel -----------------------------------

SHARDED_SEED = 11


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("dcp")
    mp.spawn(
        _dcp_writer.save_sharded,
        args=(2, str(folder / "rendezvous"), str(folder / "ckpt"), SHARDED_SEED),
        nprocs=2,
        join=True,
    )
    yield folder / "ckpt"


@pytest.mark.slow
def test_sharded_save_has_table_wise_and_row_wise_shards(sharded_checkpoint: Path) -> None:
    """The checkpoint under test really is sharded as planned: whole tables on one rank each, split rows on both."""
    metadata = read_dcp_metadata(sharded_checkpoint)
    files: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path.split("_")[2])  # __<rank>_<n>.distcp
    layout = {
        key.split(".")[-2]: [(list(c.offsets), list(c.sizes)) for c in sorted(meta.chunks, key=lambda c: list(c.offsets))]
        for key, meta in metadata.state_dict_metadata.items()
        if "embedding_bags" in key
    }
    assert layout == {
        "user": [([0, 0], [97, 8])],
        "author": [([0, 0], [45, 4])],
        "topics": [([0, 0], [51, 6]), ([51, 0], [50, 6])],
        "hashtags": [([0, 0], [17, 4]), ([17, 0], [16, 4])],
    }
    prefix = _dcp_writer.PREFIX
    assert files[f"{prefix}ebc.embedding_bags.user.weight"] == {"0"}
    assert files[f"{prefix}ebc.embedding_bags.author.weight"] == {"1"}
    assert files[f"{prefix}ebc.embedding_bags.topics.weight"] == {"0", "1"}
    assert files[f"{prefix}weighted_ebc.embedding_bags.hashtags.weight"] == {"0", "1"}


@pytest.mark.slow
def test_sharded_dcp_converts_value_for_value_and_serves(
    sharded_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, model_yaml = tmp_path / "sharded.safetensors", tmp_path / "sharded.yaml"
    assert main(["convert", str(sharded_checkpoint), "-o", str(out)]) == 2
    assert "keys are not embedding-table weights ('model.mlp.bias', 'model.mlp.weight')" in capsys.readouterr().err

    assert main(["convert", str(sharded_checkpoint), "-o", str(out), "--ignore-other-keys"]) == 0
    assert f"serve with --model {model_yaml} --checkpoint {out}" in capsys.readouterr().out
    config = load_model_config(model_yaml)
    assert config.name == "sharded"
    assert {t.name: (t.num_embeddings, t.embedding_dim, t.data_type.value, t.weighted) for t in config.tables} == {
        n: (r, d, dt, w) for n, r, d, dt, w, _ in _dcp_writer.TABLES
    }
    full = _dcp_writer.full_tables(SHARDED_SEED)
    loaded = _loaded(config, out)
    for name, weight in full.items():
        np.testing.assert_array_equal(loaded[name], weight)

    # And the served answers are the numpy gather-and-sum of the original tables.
    serving = build_serving_model(config, checkpoint=out, engine="fused")
    keys, lengths, values, weights = random_features(
        np.random.default_rng(0), {t.name: t.num_embeddings for t in config.tables}, 9, keys=canonical_keys(config), weighted=True
    )
    kjt = KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths.reshape(-1)), weights=torch.from_numpy(weights)  # type: ignore[arg-type]
    )
    expected = pool(full, keys, lengths, values, weights, list(serving.keys), weighted_keys={"hashtags"})
    np.testing.assert_allclose(serving.forward(kjt).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_dcp_against_a_model_config(sharded_checkpoint: Path, tmp_path: Path) -> None:
    model = write_model_config(model_config_from_dict(_dcp_writer.model_dict()), tmp_path / "model.yaml")
    out = tmp_path / "ckpt.safetensors"
    assert main(["convert", str(sharded_checkpoint), "-o", str(out), "--model", str(model), "--ignore-other-keys"]) == 0
    config = load_model_config(tmp_path / "ckpt.yaml")
    assert config.table_names == [t[0] for t in _dcp_writer.TABLES]  # the config's order, not the file's
    for name, weight in _loaded(config, out).items():
        np.testing.assert_array_equal(weight, _dcp_writer.full_tables(SHARDED_SEED)[name])


# --- embserve export ---------------------------------------------------------------------------------------------


def test_export_from_seed_and_re_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    model_path = write_model_config(config, tmp_path / "small.yaml")
    out, model_out = tmp_path / "init7.safetensors", tmp_path / "exported.yaml"
    assert main(["export", "--model", str(model_path), "--seed", "7", "-o", str(out), "--model-out", str(model_out)]) == 0
    assert load_model_config(model_out) == config
    reference = LargeEmbeddings(config)
    init_weights(reference, 7)
    for name, weight in _loaded(config, out).items():
        np.testing.assert_array_equal(weight, table_weights(reference)[name].detach().numpy())
    assert "ckpt-" in capsys.readouterr().out

    # Re-save a torch-format checkpoint as safetensors: same values, seed keys.
    torch_ckpt = tmp_path / "trained.pt"
    other = LargeEmbeddings(config)
    init_weights(other, 3)
    save_checkpoint(other, torch_ckpt)
    resaved = tmp_path / "trained.safetensors"
    assert main(["export", "--model", str(model_path), "--checkpoint", str(torch_ckpt), "-o", str(resaved)]) == 0
    for name, weight in _loaded(config, resaved).items():
        np.testing.assert_array_equal(weight, table_weights(other)[name].detach().numpy())


def test_export_and_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = write_model_config(make_config(), tmp_path / "small.yaml")
    assert main(["export", "--model", str(model_path), "--checkpoint", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embserve export: error: checkpoint" in err and "nope.pt' does not exist" in err
    assert main(["export", "--model", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.yaml' is neither a file nor a built-in model" in err
    assert main(["convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embserve convert: error:" in err and "nothing: no such file or directory" in err
