"""Every script in `examples/` runs as a user would run it (a separate process, the server's address as argument)
against an in-process server, and every embedding it prints is the numpy gather-and-sum of the same features.
`train_convert_serve.py` makes its own model (trains, saves, converts, serves) and checks it against the trained
module."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embserve.embeddings import ServingModel
from tests.certs import make_pki
from tests.reference import assert_pooled_close, pool
from tests.support import ServerHandle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL_MODEL_FLAGS = ["--id-feature", "user", "--weighted-feature", "hashtags"]
WEIGHTED = {"hashtags"}


def _run(script: str, *args: str, timeout: float = 120) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"{script} printed no lookups:\n{proc.stdout}"
    return records


def _check(record: dict[str, Any], tables: dict[str, np.ndarray], serving: ServingModel) -> None:
    """Rebuilds the jagged features from the printed id lists and compares every printed value with numpy."""
    features, weights = record["features"], record["weights"]
    keys = list(features)
    batch = len(next(iter(features.values())))
    lengths = np.array([[len(ids) for ids in features[k]] for k in keys], dtype=np.int32).reshape(len(keys), batch)
    values = np.array([i for k in keys for ids in features[k] for i in ids], dtype=np.int64)
    w = np.array(
        [
            x
            for k in keys
            for b, ids in enumerate(features[k])
            for x in (weights[k][b] if k in weights else [1.0] * len(ids))
        ],
        dtype=np.float32,
    )
    assert record["keys"] == list(serving.keys)
    expected = pool(tables, keys, lengths, values, w, record["keys"], weighted_keys=WEIGHTED)
    out = np.array(record["embeddings"], dtype=np.float32)
    assert out.shape == expected.shape
    dims = {t.name: t.embedding_dim for t in serving.config.tables}
    fp16 = {t.name for t in serving.config.tables if t.data_type.value == "fp16"}
    assert_pooled_close(dims, fp16, record["keys"], out, expected)
    assert np.abs(out).sum() > 0  # the features hit real rows, not only empty bags


Factory = Callable[..., ServerHandle]


def test_sync_lookup_lists_and_numpy(
    server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(small_serving)
    records = _run("sync_lookup.py", server.address, *SMALL_MODEL_FLAGS)
    assert [r["example"] for r in records] == ["lists", "numpy"]
    for record in records:
        _check(record, small_tables, small_serving)


def test_async_lookup_over_several_addresses(
    server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    a, b = server_factory(small_serving), server_factory(small_serving)
    records = _run("async_lookup.py", a.address, b.address, "--feature", "user", "--calls", "6")
    assert len(records) == 6
    for record in records:
        _check(record, small_tables, small_serving)
    # Every example was served by one of the two replicas given (round_robin uses whichever are connected, so how
    # the calls split between them is not fixed).
    assert a.metric("embserve_examples_total") + b.metric("embserve_examples_total") == 6 * 2


def test_kjt_in_keyed_tensor_out(
    server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    server = server_factory(small_serving)
    (record,) = _run("kjt_lookup.py", server.address, *SMALL_MODEL_FLAGS)
    _check(record, small_tables, small_serving)


def test_tls_and_token(
    tmp_path: Path, server_factory: Factory, small_serving: ServingModel, small_tables: dict[str, np.ndarray]
) -> None:
    pki = make_pki(tmp_path)
    (tmp_path / "tokens.txt").write_text("s3cret-example-token Lookup,GetModelMetadata\n")
    (tmp_path / "token").write_text("s3cret-example-token\n")
    server = server_factory(
        small_serving,
        tls={"cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"])},
        auth={"tokens_file": str(tmp_path / "tokens.txt")},
    )
    port = server.address.rsplit(":", 1)[1]
    args = [
        f"localhost:{port}",
        "--ca",
        str(pki["ca.pem"]),
        "--token-file",
        str(tmp_path / "token"),
        "--feature",
        "user",
    ]
    (record,) = _run("tls_token.py", *args)
    _check(record, small_tables, small_serving)

    (tmp_path / "wrong").write_text("not-the-token\n")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tls_token.py"), *args[:3], "--token-file", str(tmp_path / "wrong")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "Unauthenticated" in proc.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("[!_]*.py")))
def test_every_example_has_help(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "python examples/" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_train_convert_serve() -> None:
    """Trained with DistributedModelParallel on 2 processes, saved with DCP, converted, served: the served columns
    are the trained module's, in its order, under the version `embserve convert` printed."""
    records = _run("train_convert_serve.py", "--steps", "3", timeout=300)
    served = next(r for r in records if r["example"] == "served")
    checks = next(r for r in records if r["example"] == "checks")
    assert served["keys"] == ["user", "author", "hashtags", "tweet"]  # the training config's order, not sorted
    assert checks["columns_in_training_order"] and checks["version_as_printed"]
    assert checks["bit_for_bit"] == {"author": True, "hashtags": True, "tweet": True}
    assert checks["row_wise_within_rounding"] == {"user": True}
    assert np.abs(served["embeddings"]).sum() > 0


@pytest.mark.slow
def test_a_table_larger_than_memory_is_served_in_place(tmp_path: Path) -> None:
    (record,) = _run("larger_than_memory.py", "--dir", str(tmp_path), "--calls", "200", timeout=600)
    assert record["storage"] == "mmap"
    assert record["table_bytes"] > record["physical_memory"]  # more rows than the machine could hold
    assert record["disk_bytes"] < 1 << 30  # sparse: only the rows written take disk
    assert record["lookups_checked"] == 200 * 16 and record["written_rows_hit"] > 0  # every answer checked exact
    assert record["server_rss_bytes"] < 2 << 30  # bounded by what the traffic touched, not by the table
    assert not any(tmp_path.iterdir())  # the example removed its files


@pytest.mark.slow
def test_freshly_trained_rows_are_pushed_and_served(tmp_path: Path) -> None:
    (record,) = _run("fresh_rows.py", "--dir", str(tmp_path), "--steps", "3", timeout=300)
    assert record["rows_pushed"]["user"] > 0 and record["rows_pushed"]["author"] > 0  # the script checked each row
    assert record["version"].endswith("+2")  # one update message per table: the base, then two updates
    assert "rows applied" in record["update"]
