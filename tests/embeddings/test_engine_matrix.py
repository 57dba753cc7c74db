"""Every engine x data_type x weighted x serving_dtype combination against the numpy gather-and-sum reference.

Each model holds the table under test (`t`) beside an fp32 unweighted table and, when `t` is weighted, an fp32
weighted one, so the weighted collection mixes table types as real models do. Tolerances are stated bounds, per
output element, in terms of `S = sum_i |w_i * row_i|` over the bag's ids and `L`, the bag's length:

- float tables summed in float32 (fused engine, fp32 tables on the eager engine): `(L + 2) * 2^-24 * S`, the
  recursive-summation bound; the fp16 rows of an fp16 table are exact in float32, so this holds for them too;
- an fp32 table served as fp16: each row rounds once to fp16, `2^-11 * S` more;
- an fp16 table on the eager engine, which sums (and casts the weights) in fp16: `(L + 3) * 2^-11 * S`;
- int8, row-wise quantised with an fp16 scale and bias: at most one quantisation step of the row,
  `(max(row) - min(row)) / 255`, per id (half a step of rounding, plus the scale and bias rounding), times `|w|`.

The eager engine serves every table in its data_type: a serving_dtype is ignored there.

The fused engine also serves from a row directory, each table loaded into memory or read in place from its mapped
row file (`storage`): those results are bit for bit the ones of the same model converted in memory.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embserve.embeddings import LargeEmbeddings, ModelConfig, build_serving_model, init_weights, table_weights
from embserve.embeddings.row_directory import write_row_directory
from tests.reference import pool, random_features
from tests.support import float_tables, make_config

U32 = 2.0**-24
U16 = 2.0**-11
CASES = [
    (engine, storage, data_type, weighted, serving)
    for engine, data_type, weighted, serving in itertools.product(
        ["fused", "eager"], ["fp32", "fp16"], [False, True], ["fp32", "fp16", "int8"]
    )
    for storage in (["checkpoint", "memory", "mmap"] if engine == "fused" else ["checkpoint"])
]


def _config(data_type: str, weighted: bool, serving: str) -> ModelConfig:
    tables = [
        {
            "name": "t",
            "num_embeddings": 60,
            "embedding_dim": 8,
            "data_type": data_type,
            "weighted": weighted,
            "serving_dtype": serving,
        },
        {"name": "plain", "num_embeddings": 40, "embedding_dim": 4},
    ]
    if weighted:
        tables.append({"name": "wplain", "num_embeddings": 50, "embedding_dim": 4, "weighted": True})
    return make_config(tables, name="matrix")


def _bound(engine: str, data_type: str, serving: str, table: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The error bound of one bag, per column (see the module docstring)."""
    rows = table[ids].astype(np.float64)
    s = (np.abs(rows) * np.abs(w)[:, None]).sum(axis=0)
    n = len(ids)
    if engine == "eager":
        return np.asarray((n + 3) * U16 * s if data_type == "fp16" else (n + 2) * U32 * s)
    if serving == "int8":
        step = (rows.max(axis=1) - rows.min(axis=1)) / 255 if n else np.zeros(0)
        return np.asarray((np.abs(w) * step).sum() + (n + 2) * U32 * s)
    if serving == "fp16" and data_type == "fp32":
        return np.asarray((U16 + (n + 2) * U32) * s)
    return np.asarray((n + 2) * U32 * s)


def _row_directory(config: ModelConfig, path: Path) -> Path:
    module = LargeEmbeddings(config)
    init_weights(module)  # the same init as float_tables and an initialised server
    write_row_directory(config, {k: v.detach() for k, v in table_weights(module).items()}, path)
    return path


@pytest.mark.parametrize(("engine", "storage", "data_type", "weighted", "serving"), CASES)
def test_engine_matrix_matches_reference(
    engine: str, storage: str, data_type: str, weighted: bool, serving: str, tmp_path: Path
) -> None:
    config = _config(data_type, weighted, serving)
    tables = float_tables(config)
    in_memory = build_serving_model(config, engine=engine)
    if storage == "checkpoint":
        model = in_memory
    else:
        model = build_serving_model(
            config, checkpoint=_row_directory(config, tmp_path / "rows"), default_storage=storage
        )
        assert model.table_storage("t").value == storage
    rng = np.random.default_rng(7)
    rows = {t.name: t.num_embeddings for t in config.tables}
    keys, lengths, values, weights = random_features(
        rng, rows, 24, keys=list(model.keys), max_len=12, weighted=model.has_weighted_tables
    )
    weighted_keys = {t.name for t in config.tables if t.weighted}
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        weights=None if weights is None else torch.from_numpy(weights),
    )
    out = model.forward(kjt).numpy().astype(np.float64)
    if storage != "checkpoint":  # the same kernel over the same rows: bit for bit
        assert np.array_equal(out, in_memory.forward(kjt).numpy().astype(np.float64))
    expected = pool(tables, keys, lengths, values, weights, list(model.keys), weighted_keys=weighted_keys)
    assert out.shape == expected.shape

    starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
    batch = lengths.shape[1]
    for k, key in enumerate(model.keys):
        table_config = next(t for t in config.tables if t.name == key)
        if key == "t":
            t_engine, t_dtype, t_serving = engine, data_type, serving
        else:
            t_engine, t_dtype, t_serving = engine, "fp32", "fp32"
        cols = slice(model.offsets[k], model.offsets[k + 1])
        for b in range(batch):
            s, e = starts[keys.index(key) * batch + b], starts[keys.index(key) * batch + b + 1]
            ids = values[s:e]
            w = weights[s:e].astype(np.float64) if weights is not None and table_config.weighted else np.ones(len(ids))
            bound = _bound(t_engine, t_dtype, t_serving, tables[key], ids, w)
            diff = np.abs(out[b, cols] - expected[b, cols])
            assert (diff <= bound).all(), (
                f"{key} example {b}: diff {diff.max():.3g} over bound {bound.max():.3g} "
                f"({engine}, {data_type}, weighted={weighted}, serving={serving})"
            )
    if serving == "int8" and engine == "fused":
        assert not np.array_equal(out[:, : model.offsets[-1]], expected), "int8 serving should not be exact"
