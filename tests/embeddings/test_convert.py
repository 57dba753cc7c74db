"""`embserve convert` and `embserve export`: trained weights in every supported layout become a checkpoint whose
values equal the original tables (numpy), and bad inputs fail with one message naming the problem."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.client.cli import main
from embserve.embeddings import (
    LargeEmbeddings,
    LargeEmbeddingsConfig,
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
from embserve.embeddings.weights import checkpoint_digest, checkpoint_version
from tests.embeddings import _dcp_writer
from tests.reference import pool, random_features
from tests.support import make_config, write_model_config

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
    result = convert(source, out, model_yaml=yaml_path)
    config = result.config

    assert load_model_config(yaml_path) == config
    assert result.order_from == "the checkpoint's key order" and result.casts == {}
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

    with pytest.raises(
        ConvertError,
        match=r"2 keys are not embedding-table weights.*'model_state.model.mlp.weight'.*--ignore-other-keys",
    ):
        convert(source, tmp_path / "x.safetensors")

    inferred = convert(source, tmp_path / "out.safetensors", ignore_other_keys=True).config
    assert {t.name: t.weighted for t in inferred.tables} == {t.name: t.weighted for t in config.tables}
    loaded = _loaded(inferred, tmp_path / "out.safetensors")
    for name, weight in expected.items():
        np.testing.assert_array_equal(loaded[name], weight)


def test_bfloat16_widens_exactly_and_safetensors_input(tmp_path: Path) -> None:
    values = torch.randn(40, 8).to(torch.bfloat16)
    from safetensors.torch import save_file

    source = tmp_path / "trained.safetensors"
    save_file({"embedding_bags.user.weight": values}, str(source))
    result = convert(source, tmp_path / "out.safetensors")
    config = result.config
    assert config.tables[0].data_type.value == "fp32" and result.casts == {"user": "bf16"}
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
    assert convert(source, out, model=model, model_yaml=tmp_path / "m.yaml").config == model
    assert load_model_config(tmp_path / "m.yaml") == model
    assert "weighted_ebc.embedding_bags.topics.weight" in load_file(str(out))
    loaded = _loaded(model, out)
    for name, weight in tables.items():
        np.testing.assert_array_equal(loaded[name], weight)

    wrong_rows = model_config_from_dict(
        {
            "tables": [
                {"name": n, "num_embeddings": 61 if n == "user" else r, "embedding_dim": d}
                for n, (r, d, _) in RNG_TABLES.items()
            ]
        }
    )
    with pytest.raises(ConvertError, match=r"table 'user': weights are 60 x 8, the model config says 61 x 8"):
        convert(source, tmp_path / "y.safetensors", model=wrong_rows)
    fewer = model_config_from_dict(
        {
            "tables": [
                {"name": "user", "num_embeddings": 60, "embedding_dim": 8},
                {"name": "video", "num_embeddings": 5, "embedding_dim": 2},
            ]
        }
    )
    with pytest.raises(
        ConvertError, match=r"missing from the weights: \['video'\]; not in the model config: \['author', 'topics'\]"
    ):
        convert(source, tmp_path / "y.safetensors", model=fewer)
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"dense.weight": torch.ones(2, 2)}, r"no embedding tables found.*'dense.weight'"),
        (
            {"embedding_bags.user.weight": torch.ones(10)},
            r"table 'user' \('embedding_bags.user.weight'\) has shape \[10\], not \[rows, dim\]",
        ),
        (
            {"embedding_bags.user.weight": torch.ones(4, 2, dtype=torch.int64)},
            r"table 'user'.*dtype torch.int64; expected float32",
        ),
        ({"embedding_bags.user.weight": torch.ones(4, 2, dtype=torch.float64)}, r"dtype torch.float64"),
        (
            {
                "a.ebc.embedding_bags.user.weight": torch.ones(4, 2),
                "b.ebc.embedding_bags.user.weight": torch.ones(4, 2),
            },
            r"table 'user' appears twice, at 'a.ebc.embedding_bags.user.weight' and 'b.ebc.embedding_bags.user.weight'",
        ),
        ({"embedding_bags.user.weight": torch.tensor([[1.0, float("nan")]])}, r"table 'user'.*non-finite weights"),
        (
            {"embedding_bags.user.weight": torch.ones(4, 2), "embedding_bags.user.bias": torch.ones(2)},
            r"1 keys are not embedding-table weights \('embedding_bags.user.bias'\)",
        ),
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
    with pytest.raises(
        ConvertError, match=r"cannot read DCP metadata: UnpicklingError: refusing to load pathlib.Path.touch"
    ):
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
    entry.chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([6, 4])),
        ChunkStorageMetadata(torch.Size([5, 0]), torch.Size([5, 4])),
    ]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        ConvertError, match=r"'embedding_bags.user.weight': shards at offsets \[0, 0\] and \[5, 0\] overlap"
    ):
        convert(ckpt, tmp_path / "out.safetensors")
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([6, 4]))]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConvertError, match=r"shards cover 24 of 40 elements"):
        convert(ckpt, tmp_path / "out.safetensors")
    with pytest.raises(ConvertError, match=r"without a .metadata file"):
        convert(tmp_path, tmp_path / "out.safetensors")


# --- the table order is the training order, or the conversion is refused -----------------------------------------

TRAINING_ORDER = [  # a training job's order: not alphabetical (that would be author, hashtags, tweet, user)
    {"name": "user", "num_embeddings": 40, "embedding_dim": 8},
    {"name": "author", "num_embeddings": 30, "embedding_dim": 4},
    {"name": "hashtags", "num_embeddings": 20, "embedding_dim": 6, "weighted": True},
    {"name": "tweet", "num_embeddings": 50, "embedding_dim": 2},
]


def _trained_module(seed: int = 4) -> LargeEmbeddings:
    module = LargeEmbeddings(make_config(TRAINING_ORDER, name="trained"))
    init_weights(module, seed)
    return module


def _probe(config: LargeEmbeddingsConfig) -> KeyedJaggedTensor:
    keys, lengths, values, weights = random_features(
        np.random.default_rng(1),
        {t.name: t.num_embeddings for t in config.tables},
        7,
        keys=canonical_keys(config),
        weighted=True,
    )
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        weights=torch.from_numpy(weights),
    )


def test_dcp_keeps_the_training_order_and_serves_the_modules_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _trained_module()
    ckpt = tmp_path / "step_10"
    _single_process_dcp(ckpt, {f"model.large_embeddings.{k}": v for k, v in module.state_dict().items()})
    out = tmp_path / "ranker.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "response columns: user, author, tweet, hashtags (table order from the checkpoint's key order)" in printed
    config = load_model_config(tmp_path / "ranker.yaml")
    assert config.table_names == ["user", "author", "tweet", "hashtags"]  # unweighted tables, then weighted ones

    serving = build_serving_model(config, checkpoint=out, engine="fused")
    assert list(serving.keys) == canonical_keys(module.config)
    kjt = _probe(module.config)
    with torch.no_grad():
        expected = module(kjt).values().numpy()
    np.testing.assert_allclose(serving.forward(kjt).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_state_dict_file_keeps_its_order(tmp_path: Path) -> None:
    module = _trained_module()
    source = tmp_path / "trained.pt"
    torch.save(module.state_dict(), source)
    result = convert(source, tmp_path / "out.safetensors")
    assert result.config.table_names == ["user", "author", "tweet", "hashtags"]
    assert result.order_from == "the checkpoint's key order"


def _state(names: list[str]) -> dict[str, torch.Tensor]:
    """Two small tables, `user` (4 x 2) and `author` (5 x 2), keyed in the order of `names`."""
    tables = {"user": torch.full((4, 2), 1.0), "author": torch.full((5, 2), 2.0)}
    return {f"ebc.embedding_bags.{n}.weight": tables[n] for n in names}


def test_an_order_that_cannot_be_known_is_refused_until_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import DefaultSavePlanner

    sources = {
        "safetensors": tmp_path / "trained.safetensors",
        "sorted": tmp_path / "sorted.pt",
        "dcp": tmp_path / "dcp",
    }
    save_file(_state(["user", "author"]), str(sources["safetensors"]))
    torch.save(_state(["author", "user"]), sources["sorted"])
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        import torch.distributed.checkpoint as dcp

        dcp.save(
            _state(["user", "author"]),
            checkpoint_id=str(sources["dcp"]),
            planner=DefaultSavePlanner(flatten_state_dict=False),
            no_dist=True,
        )
    reasons = {
        "safetensors": "a safetensors file keeps no key order",
        "sorted": "its table keys are in sorted order, which is what torchrec's DistributedModelParallel.state_dict() gives",
        "dcp": "its metadata records no state-dict order for ['user', 'author'] (saved without DCP's default planner)",
    }
    for kind, source in sources.items():
        out = tmp_path / f"{kind}.safetensors"
        with pytest.raises(ConvertError, match=r"cannot tell the training order of its 2 tables: ") as caught:
            convert(source, out)
        assert reasons[kind] in str(caught.value) and "--order" in str(caught.value) and not out.exists()

        assert main(["convert", str(source), "-o", str(out), "--order", "user,author"]) == 0
        assert "response columns: user, author (table order from --order)" in capsys.readouterr().out
        assert load_model_config(tmp_path / f"{kind}.yaml").table_names == ["user", "author"]
        loaded = _loaded(load_model_config(tmp_path / f"{kind}.yaml"), out)
        for name in ("user", "author"):
            np.testing.assert_array_equal(loaded[name], _state([name])[f"ebc.embedding_bags.{name}.weight"].numpy())

    with pytest.raises(
        ConvertError, match=r"must name every table once: missing \['author'\]; not in the weights \['video'\]"
    ):
        convert(sources["sorted"], tmp_path / "x.safetensors", order=["user", "video"])
    with pytest.raises(ConvertError, match=r"named twice \['user'\]"):
        convert(sources["sorted"], tmp_path / "x.safetensors", order=["user", "author", "user"])
    model = make_config(
        [
            {"name": "user", "num_embeddings": 4, "embedding_dim": 2},
            {"name": "author", "num_embeddings": 5, "embedding_dim": 2},
        ]
    )
    with pytest.raises(ConvertError, match=r"from the model config or from --order, not both"):
        convert(sources["sorted"], tmp_path / "x.safetensors", model=model, order=["user", "author"])
    assert convert(sources["safetensors"], tmp_path / "x.safetensors", model=model).order_from == "the model config"
    assert not (tmp_path / "x.yaml").exists()


# --- one version string ----------------------------------------------------------------------------------------


def test_the_printed_version_is_the_served_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "trained.pt"
    torch.save(_trained_module().state_dict(), source)
    out = tmp_path / "ranker.safetensors"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    printed = re.search(r"\(version (\S+)\)", capsys.readouterr().out)
    assert printed is not None
    served = build_serving_model(load_model_config(tmp_path / "ranker.yaml"), checkpoint=out)
    assert printed[1] == served.version == checkpoint_version(out, checkpoint_digest(out))
    assert served.version.startswith("ranker-") and len(served.version) == len("ranker-") + 12

    model_path = write_model_config(make_config(), tmp_path / "small.yaml")
    exported = tmp_path / "init3.safetensors"
    assert main(["export", "--model", str(model_path), "--seed", "3", "-o", str(exported)]) == 0
    printed = re.search(r"\(version (\S+)\)", capsys.readouterr().out)
    assert printed is not None and printed[1] == build_serving_model(make_config(), checkpoint=exported).version


# --- every failure is one line naming the file, key or table ----------------------------------------------------


def _break_missing_shard(ckpt: Path) -> str:
    (ckpt / "__0_0.distcp").unlink()
    return f"{ckpt / '__0_0.distcp'}: shard file missing (it holds a shard of 'embedding_bags."


def _break_truncated_shard(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    return f"{shard}: shard file truncated: 100 bytes, but a shard of 'embedding_bags."


def _break_corrupt_shard(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    return f"{ckpt}: cannot read the DCP shards: "


def _break_truncated_metadata(ckpt: Path) -> str:
    metadata = ckpt / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    return f"{metadata}: cannot read DCP metadata: "


@pytest.mark.parametrize(
    "damage",
    [_break_missing_shard, _break_truncated_shard, _break_corrupt_shard, _break_truncated_metadata],
    ids=["missing-shard", "truncated-shard", "corrupt-shard", "truncated-metadata"],
)
def test_a_damaged_dcp_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any) -> None:
    ckpt = tmp_path / "ckpt"
    _single_process_dcp(
        ckpt, {"embedding_bags.user.weight": torch.ones(10, 4), "embedding_bags.author.weight": torch.ones(6, 2)}
    )
    needle = damage(ckpt)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConvertError) as caught:  # a ValueError, never DCP's CheckpointException (a BaseException)
        convert(ckpt, out, order=["user", "author"])
    assert isinstance(caught.value, ValueError) and needle in str(caught.value) and "\n" not in str(caught.value)
    assert main(["convert", str(ckpt), "-o", str(out), "--order", "user,author"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embserve convert: error: ") and needle in err, err
    assert not out.exists()


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "trained.pt"
    torch.save(_state(["user"]), source)
    missing = tmp_path / "no" / "such" / "folder"
    for output in (missing / "out.safetensors", missing / "out.pt"):
        with pytest.raises(
            ConvertError,
            match=f"{re.escape(str(output))}: cannot write: folder '{re.escape(str(missing))}' does not exist",
        ):
            convert(source, output)
        assert main(["convert", str(source), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{output}: cannot write" in err
    assert (
        main(["convert", str(source), "-o", str(tmp_path / "ok.safetensors"), "--model-out", str(missing / "m.yaml")])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"{missing / 'm.yaml'}: cannot write" in err
        and not (tmp_path / "ok.safetensors").exists()
    )

    model_path = write_model_config(make_config(), tmp_path / "small.yaml")
    for output in (missing / "out.safetensors", missing / "out.pt"):
        assert main(["export", "--model", str(model_path), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "embserve export: error: cannot write checkpoint" in err and str(missing) in err
    assert (
        main(
            [
                "export",
                "--model",
                str(model_path),
                "-o",
                str(tmp_path / "e.safetensors"),
                "--model-out",
                str(missing / "m.yaml"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing / 'm.yaml'}: cannot write" in err


# --- a data type other than the weights' is asked for ------------------------------------------------------------


def test_a_data_type_change_is_asked_for_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tables = _tables()  # user fp32, author fp16, topics fp32
    source = tmp_path / "trained.pt"
    torch.save({f"embedding_bags.{n}.weight": torch.from_numpy(w) for n, w in tables.items()}, source)
    as_trained = [
        {"name": n, "num_embeddings": r, "embedding_dim": d, "data_type": "fp16" if t is np.float16 else "fp32"}
        for n, (r, d, t) in RNG_TABLES.items()
    ]
    narrowed = make_config([{**t, "data_type": "fp16"} if t["name"] == "user" else t for t in as_trained])
    widened = make_config([{**t, "data_type": "fp32"} if t["name"] == "author" else t for t in as_trained])
    out = tmp_path / "out.safetensors"

    with pytest.raises(
        ConvertError, match=r"table 'user': the weights are fp32 but the model config says fp16; pass --cast user=fp16"
    ):
        convert(source, out, model=narrowed)
    with pytest.raises(
        ConvertError,
        match=r"table 'author': the weights are fp16 but the model config says fp32; pass --cast author=fp32",
    ):
        convert(source, out, model=widened)
    with pytest.raises(ConvertError, match=r"table 'user': --cast asks for fp32, the model config says fp16"):
        convert(source, out, model=narrowed, cast={"user": "fp32"})
    with pytest.raises(ConvertError, match=r"--cast names table 'video', which is not in the weights"):
        convert(source, out, cast={"video": "fp16"})
    with pytest.raises(ConvertError, match=r"--cast user=int8: not a data type \(fp32, fp16\)"):
        convert(source, out, cast={"user": "int8"})
    assert not out.exists()

    result = convert(source, out, model=narrowed, cast={"user": "fp16"})
    assert result.casts == {"user": "fp32"}
    assert _loaded(narrowed, out)["user"].dtype == np.float16
    np.testing.assert_array_equal(_loaded(narrowed, out)["user"], tables["user"].astype(np.float16))
    inferred = convert(source, out, cast={"author": "fp32"})
    assert inferred.casts == {"author": "fp16"} and inferred.config.tables[1].data_type.value == "fp32"

    # The command line: a bare --cast takes each table's type from --model; the output line reports the cast.
    model_path = write_model_config(narrowed, tmp_path / "narrowed.yaml")
    assert main(["convert", str(source), "-o", str(out), "--model", str(model_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "table 'user': the weights are fp32 but the model config says fp16" in err
    assert main(["convert", str(source), "-o", str(out), "--model", str(model_path), "--cast"]) == 0
    assert "user 60x8 fp16 (cast from fp32), author 30x4 fp16, topics 25x6 fp32" in capsys.readouterr().out
    assert main(["convert", str(source), "-o", str(out), "--cast", "author=fp32,topics=fp16"]) == 0
    assert (
        "user 60x8 fp32, author 30x4 fp32 (cast from fp16), topics 25x6 fp16 (cast from fp32)"
        in capsys.readouterr().out
    )
    assert main(["convert", str(source), "-o", str(out), "--cast"]) == 2
    assert "a bare --cast stores each table in its --model data type" in capsys.readouterr().err
    assert main(["convert", str(source), "-o", str(out), "--cast", "user"]) == 2
    assert "--cast 'user': expected TABLE=DTYPE" in capsys.readouterr().err


# --- a real sharded save: 2 processes, gloo, torchrec DistributedModelParallel -----------------------------------

SHARDED_SEED = 11


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("dcp")
    mp.spawn(  # type: ignore[no-untyped-call]
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
        key.split(".")[-2]: [
            (list(c.offsets), list(c.sizes)) for c in sorted(meta.chunks, key=lambda c: list(c.offsets))
        ]
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

    # DistributedModelParallel.state_dict() sorts its keys, so the checkpoint cannot say the training order.
    assert list(read_dcp_metadata(sharded_checkpoint).planner_data) == sorted(
        read_dcp_metadata(sharded_checkpoint).planner_data
    )
    assert main(["convert", str(sharded_checkpoint), "-o", str(out), "--ignore-other-keys"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot tell the training order of its 4 tables" in err
    assert "DistributedModelParallel.state_dict()" in err and "--order" in err and not out.exists()

    training_order = [t[0] for t in _dcp_writer.TABLES]
    args = [
        "convert",
        str(sharded_checkpoint),
        "-o",
        str(out),
        "--ignore-other-keys",
        "--order",
        ",".join(training_order),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"serve with --model {model_yaml} --checkpoint {out}" in printed
    assert "response columns: user, author, topics, hashtags (table order from --order)" in printed
    config = load_model_config(model_yaml)
    assert config.name == "sharded"
    assert [(t.name, t.num_embeddings, t.embedding_dim, t.data_type.value, t.weighted) for t in config.tables] == [
        (n, r, d, dt, w) for n, r, d, dt, w, _ in _dcp_writer.TABLES
    ]
    full = _dcp_writer.full_tables(SHARDED_SEED)
    loaded = _loaded(config, out)
    for name, weight in full.items():
        np.testing.assert_array_equal(loaded[name], weight)

    # The served columns are the trained module's: its forward, in its order, and the numpy gather-and-sum.
    serving = build_serving_model(config, checkpoint=out, engine="fused")
    assert list(serving.keys) == canonical_keys(model_config_from_dict(_dcp_writer.model_dict()))
    keys, lengths, values, weights = random_features(
        np.random.default_rng(0),
        {t.name: t.num_embeddings for t in config.tables},
        9,
        keys=canonical_keys(config),
        weighted=True,
    )
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        weights=torch.from_numpy(weights),
    )
    np.testing.assert_allclose(serving.forward(kjt).numpy(), _trained_forward(full, kjt), rtol=1e-5, atol=1e-5)
    expected = pool(full, keys, lengths, values, weights, list(serving.keys), weighted_keys={"hashtags"})
    np.testing.assert_allclose(serving.forward(kjt).numpy(), expected, rtol=1e-5, atol=1e-5)


def _trained_forward(tables: dict[str, np.ndarray], kjt: KeyedJaggedTensor) -> np.ndarray:
    """The training module's forward: the seed module of the training config, holding `tables`."""
    module = LargeEmbeddings(model_config_from_dict(_dcp_writer.model_dict()))
    with torch.no_grad():
        for name, param in table_weights(module).items():
            param.copy_(torch.from_numpy(tables[name]))
        out: np.ndarray = module(kjt).values().numpy()
        return out


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
    assert (
        main(["export", "--model", str(model_path), "--seed", "7", "-o", str(out), "--model-out", str(model_out)]) == 0
    )
    assert load_model_config(model_out) == config
    reference = LargeEmbeddings(config)
    init_weights(reference, 7)
    for name, weight in _loaded(config, out).items():
        np.testing.assert_array_equal(weight, table_weights(reference)[name].detach().numpy())
    assert f"(version init7-{checkpoint_digest(out)})" in capsys.readouterr().out

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
    assert (
        main(
            [
                "export",
                "--model",
                str(model_path),
                "--checkpoint",
                str(tmp_path / "nope.pt"),
                "-o",
                str(tmp_path / "o.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embserve export: error: checkpoint" in err and "nope.pt' does not exist" in err
    assert main(["export", "--model", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.yaml' is neither a file nor a built-in model" in err
    assert main(["convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embserve convert: error:" in err and "nothing: no such file or directory" in err
