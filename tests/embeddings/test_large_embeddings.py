"""LargeEmbeddings and its serving forms against the numpy gather-and-sum reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import LargeEmbeddings, ModelConfig, build_serving_model, canonical_keys, init_weights
from tests.reference import assert_pooled_close, pool, random_features
from tests.support import make_config


def _kjt(keys: list[str], lengths: np.ndarray, values: np.ndarray, weights: np.ndarray | None) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        weights=None if weights is None else torch.from_numpy(weights),
    )


def _canonical_features(
    config: ModelConfig, rng: np.random.Generator, batch: int, weighted: bool
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    rows = {t.name: t.num_embeddings for t in config.tables}
    return random_features(rng, rows, batch, keys=canonical_keys(config), weighted=weighted)


def assert_matches(config: ModelConfig, keys: list[str], out: np.ndarray, expected: np.ndarray) -> None:
    dims = {t.name: t.embedding_dim for t in config.tables}
    fp16 = {t.name for t in config.tables if t.data_type.value == "fp16"}
    assert_pooled_close(dims, fp16, keys, out, expected)


def test_seed_structure_and_state_dict_keys(small_config: ModelConfig) -> None:
    unweighted_only = make_config([t for t in small_config.model_dump()["tables"] if not t["weighted"]])
    model = LargeEmbeddings(unweighted_only)
    assert isinstance(model.surgery_cut_point, torch.nn.Identity)
    assert sorted(model.state_dict()) == sorted(f"ebc.embedding_bags.{t.name}.weight" for t in unweighted_only.tables)
    assert model.ebc is not None
    configs = model.ebc.embedding_bag_configs()
    assert [c.feature_names for c in configs] == [[t.name] for t in unweighted_only.tables]
    assert all(c.pooling.name == "SUM" for c in configs)
    assert model.state_dict()["ebc.embedding_bags.author.weight"].dtype == torch.float16


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_eager_forward_matches_reference(
    small_config: ModelConfig, small_tables: dict[str, np.ndarray], batch: int
) -> None:
    model = LargeEmbeddings(small_config)
    init_weights(model, 0)
    rng = np.random.default_rng(batch)
    keys, lengths, values, weights = _canonical_features(small_config, rng, batch, weighted=True)
    with torch.inference_mode():
        out = model(_kjt(keys, lengths, values, weights))
    assert out.keys() == canonical_keys(small_config)
    # Weights apply to the weighted table only; the unweighted collection ignores them, as torchrec does.
    expected = pool(small_tables, keys, lengths, values, weights, keys, weighted_keys={"hashtags"})
    assert_matches(small_config, keys, out.values().numpy(), expected)


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_serving_model_fp32_and_fp16_tables_exact(
    small_config: ModelConfig, small_tables: dict[str, np.ndarray], engine: str
) -> None:
    serving = build_serving_model(small_config, engine=engine)
    rng = np.random.default_rng(3)
    keys, lengths, values, weights = _canonical_features(small_config, rng, 33, weighted=True)
    out = serving.forward(_kjt(keys, lengths, values, weights)).numpy()
    expected = pool(small_tables, keys, lengths, values, weights, list(serving.keys), weighted_keys={"hashtags"})
    assert_matches(small_config, list(serving.keys), out, expected)


@pytest.mark.parametrize(("dtype", "bound"), [("fp16", 2e-3), ("int8", 0.02), ("int4", 0.3)])
def test_quantized_serving_dtypes_error_bounded(dtype: str, bound: float) -> None:
    tables = [{"name": f"t{i}", "num_embeddings": 400, "embedding_dim": 32, "serving_dtype": dtype} for i in range(3)]
    config = make_config(tables)
    reference = build_serving_model(make_config([{**t, "serving_dtype": "fp32"} for t in tables]))
    quantized = build_serving_model(config)
    assert quantized.weight_bytes["t0"] < reference.weight_bytes["t0"]
    rng = np.random.default_rng(0)
    keys, lengths, values, _ = _canonical_features(config, rng, 64, weighted=False)
    kjt = _kjt(keys, lengths, values, None)
    exact = reference.forward(kjt).numpy()
    approx = quantized.forward(kjt).numpy()
    # Row-wise quantization: per-id error <= half a step of the row's range; relative to the pooled magnitude.
    err = np.abs(approx - exact).max() / np.abs(exact).max()
    assert err < bound, f"{dtype}: relative error {err:.4f} over bound {bound}"
    assert err > 0 or dtype == "fp16"


def test_weight_bytes_reflect_serving_dtype() -> None:
    tables = [
        {"name": "a", "num_embeddings": 100, "embedding_dim": 64},
        {"name": "b", "num_embeddings": 100, "embedding_dim": 64, "serving_dtype": "fp16"},
        {"name": "c", "num_embeddings": 100, "embedding_dim": 64, "serving_dtype": "int8"},
    ]
    sizes = build_serving_model(make_config(tables)).weight_bytes
    assert sizes["a"] == 100 * 64 * 4
    assert sizes["b"] == 100 * 64 * 2
    assert 100 * 64 <= sizes["c"] < 100 * 64 * 2
