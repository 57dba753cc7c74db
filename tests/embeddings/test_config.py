from __future__ import annotations

from pathlib import Path

import pytest

from embserve.embeddings import (
    ConfigError,
    DataType,
    ServingDType,
    builtin_model_names,
    load_model_config,
    model_config_from_dict,
)


def test_builtin_configs_load() -> None:
    assert {"default", "twhin_local"} <= set(builtin_model_names())
    twhin = load_model_config("twhin_local")
    assert [(t.name, t.num_embeddings, t.embedding_dim, t.data_type) for t in twhin.tables] == [
        ("user", 424241, 4, DataType.FP32),
        ("tweet", 72543, 4, DataType.FP32),
    ]
    default = load_model_config("default")
    assert 8 <= len(default.tables) <= 26
    assert all(32 <= t.embedding_dim <= 128 and 10**4 <= t.num_embeddings <= 10**6 for t in default.tables)
    assert any(t.data_type is DataType.FP16 for t in default.tables)


def test_seed_style_config_with_all_seed_fields(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text(
        """
tables:
  - name: user
    num_embeddings: 10
    embedding_dim: 4
    data_type: fp16
    pretrained: {emb_name: user, embedding_snapshot_uri: gs://bucket/snap}
    vocab: gs://bucket/vocab
    optimizer: {learning_rate: 0.1, sgd: {lr: 0.1}}
tables_to_log: [user]
"""
    )
    cfg = load_model_config(path)
    assert cfg.name == "seed"
    table = cfg.tables[0]
    assert table.pretrained is not None and table.pretrained.emb_name == "user"
    assert table.effective_serving_dtype is ServingDType.FP16


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([{"name": "a", "num_embeddings": 10, "embedding_dim": 4}] * 2, "duplicate table name 'a'"),
        ([{"name": "a", "num_embeddings": 0, "embedding_dim": 4}], "tables.0.num_embeddings"),
        ([{"name": "a", "num_embeddings": 10, "embedding_dim": -1}], "tables.0.embedding_dim"),
        ([{"name": "a", "num_embeddings": 10, "embedding_dim": 4, "colour": 1}], "tables.0.colour"),
        ([{"name": "a", "num_embeddings": 10, "embedding_dim": 4, "data_type": "bf16"}], "tables.0.data_type"),
        ([{"name": "a", "num_embeddings": 10, "embedding_dim": 4, "serving_dtype": "int2"}], "serving_dtype"),
        ([{"name": "a b", "num_embeddings": 10, "embedding_dim": 4}], "table name 'a b'"),
        ([], "tables"),
    ],
)
def test_invalid_configs_name_the_problem(tables: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        model_config_from_dict({"tables": tables})


def test_unknown_top_level_key_and_bad_tables_to_log() -> None:
    with pytest.raises(ConfigError, match="extra_thing"):
        model_config_from_dict({"tables": [{"name": "a", "num_embeddings": 1, "embedding_dim": 1}], "extra_thing": 1})
    with pytest.raises(ConfigError, match="unknown table 'zz'"):
        model_config_from_dict(
            {"tables": [{"name": "a", "num_embeddings": 1, "embedding_dim": 1}], "tables_to_log": ["zz"]}
        )


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        load_model_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(bad)
