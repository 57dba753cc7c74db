"""Tables served from row files: read in place (mmap) or loaded (memory), reloaded while calls run, refused when
their files are damaged, and failing safely when a file is truncated under the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.client import Client, LookupResult, ServerError
from embserve.embeddings import LargeEmbeddings, ModelConfig, build_serving_model, init_weights, table_weights
from embserve.embeddings.row_directory import row_file_path, write_row_directory
from embserve.embeddings.row_files import DATA_OFFSET
from tests.reference import assert_pooled_close, pool
from tests.support import ServerHandle, float_tables, make_config, write_model_config

Factory = Callable[..., ServerHandle]
BIN = Path(sys.executable).parent / "embserve"
TABLES = [
    {"name": "user", "num_embeddings": 4000, "embedding_dim": 16},
    {"name": "author", "num_embeddings": 500, "embedding_dim": 8, "data_type": "fp16"},
    {"name": "topics", "num_embeddings": 300, "embedding_dim": 8, "serving_dtype": "int8"},
    {"name": "hashtags", "num_embeddings": 300, "embedding_dim": 12, "weighted": True},
]
FEATURES = {"user": [[1, 3999], [7]], "author": [[2], []], "hashtags": [[5, 6], [299]]}
WEIGHTS = {"hashtags": [[0.5, 2.0], [1.5]]}


def _rows(config: ModelConfig, seed: int, path: Path) -> Path:
    module = LargeEmbeddings(config)
    init_weights(module, seed)
    write_row_directory(config, {k: v.detach() for k, v in table_weights(module).items()}, path)
    return path


def _expected(tables: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    names = ["user", "author", "hashtags"]
    lengths = np.array([[2, 1], [1, 0], [2, 1]], np.int32)
    values = np.array([1, 3999, 7, 2, 5, 6, 299])
    weights = np.array([1, 1, 1, 1, 0.5, 2.0, 1.5], np.float32)
    return pool(tables, names, lengths, values, weights, keys, weighted_keys={"hashtags"})


def _check(config: ModelConfig, tables: dict[str, np.ndarray], result: LookupResult) -> None:
    dims = {t.name: t.embedding_dim for t in config.tables}
    keys = list(result.keys)
    user_cols = slice(result.offsets[keys.index("user")], result.offsets[keys.index("user") + 1])
    assert_pooled_close(dims, {"author"}, keys, result.embeddings, _expected(tables, keys))
    np.testing.assert_allclose(result.embeddings[:, user_cols], _expected(tables, keys)[:, user_cols], rtol=1e-6)


@pytest.fixture
def config() -> ModelConfig:
    return make_config(TABLES, name="stored")


@pytest.mark.parametrize("storage", ["mmap", "memory"])
def test_a_row_directory_is_served_in_each_storage(
    storage: str, tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    rows = _rows(config, 3, tmp_path / "rows")
    model = build_serving_model(config, checkpoint=rows, default_storage=storage)
    handle = server_factory(model)
    with Client(handle.address) as client:
        result = client.lookup(FEATURES, weights=WEIGHTS)
        info = client.metadata()
    _check(config, float_tables(config, 3), result)
    assert result.model_version == model.version and model.version.startswith("rows-")
    by_name = {t.name: t for t in info.tables}
    for name in ("user", "author", "topics", "hashtags"):
        assert by_name[name].storage == storage
        assert by_name[name].disk_bytes >= by_name[name].weight_bytes > 0  # the row file's pages on disk
        assert 0 < by_name[name].resident_bytes
    assert handle.metric("embserve_table_resident_bytes", {"table": "user"}) > 0
    assert handle.metric("embserve_page_faults_total", {"kind": "minor"}) > 0


def test_reload_to_a_new_row_directory_fails_no_call(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    a, b = _rows(config, 3, tmp_path / "a"), _rows(config, 4, tmp_path / "b")
    model = build_serving_model(config, checkpoint=a, default_storage="mmap")
    handle = server_factory(
        model, model=str(write_model_config(config, tmp_path / "m.yaml")), checkpoint=str(a), storage="mmap"
    )
    results: list[LookupResult] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def traffic() -> None:
        with Client(handle.address, retry=None) as client:
            while not stop.is_set():
                try:
                    results.append(client.lookup(FEATURES, weights=WEIGHTS))
                except Exception as err:  # any failure fails the test below
                    errors.append(err)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        new = handle.call(handle.server.reload(str(b)))
        with Client(handle.address) as client:
            after = client.lookup(FEATURES, weights=WEIGHTS)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert after.model_version == new.version != model.version
    refs = {model.version: float_tables(config, 3), new.version: float_tables(config, 4)}
    for r in [*results, after]:  # every answer wholly from the version it names
        _check(config, refs[r.model_version], r)


def test_a_row_file_truncated_while_served_fails_the_batch_naming_the_table(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    rows = _rows(config, 3, tmp_path / "rows")
    model = build_serving_model(config, checkpoint=rows, default_storage="mmap")
    handle = server_factory(model, model=str(write_model_config(config, tmp_path / "m.yaml")), storage="mmap")
    with Client(handle.address, retry=None) as client:
        client.lookup(FEATURES, weights=WEIGHTS)
        path = row_file_path(rows, "user")
        os.truncate(path, DATA_OFFSET + 100)  # in place: the mapping's pages past the end are gone
        with pytest.raises(ServerError, match="table 'user': its row file .*user.safetensors' was truncated"):
            client.lookup(FEATURES, weights=WEIGHTS)
        status = health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        handle.call(handle.server.reload(str(_rows(config, 3, tmp_path / "sound"))))
        assert client.health() == "SERVING"
        _check(config, float_tables(config, 3), client.lookup(FEATURES, weights=WEIGHTS))


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "serve", "--port", "0", "--no-metrics", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_damaged_row_files_are_refused_at_start_naming_the_table(tmp_path: Path, config: ModelConfig) -> None:
    rows = _rows(config, 3, tmp_path / "rows")
    model = str(write_model_config(config, tmp_path / "m.yaml"))
    os.truncate(row_file_path(rows, "topics"), DATA_OFFSET + 64)
    proc = _serve("--model", model, "--checkpoint", str(rows), "--storage", "mmap")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "topics.safetensors' of table 'topics' is truncated" in proc.stderr
    row_file_path(rows, "author").write_bytes(b"not a row file" * 400)
    os.truncate(row_file_path(rows, "topics"), 0)
    proc = _serve("--model", model, "--checkpoint", str(rows), "--storage", "mmap")
    assert proc.returncode == 2 and "author.safetensors' is not an embserve row file" in proc.stderr, proc.stderr
    proc = _serve("--model", model, "--storage", "mmap")  # mmap without a row directory
    assert proc.returncode == 2 and "table 'user' has storage mmap: serve it from a row directory" in proc.stderr


def test_verify_finds_rows_changed_after_they_were_written(tmp_path: Path, config: ModelConfig) -> None:
    rows = _rows(config, 3, tmp_path / "rows")
    ok = subprocess.run([str(BIN), "verify", str(rows)], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and "every row matches its digest" in ok.stdout, ok.stderr
    with open(row_file_path(rows, "hashtags"), "r+b") as f:  # same size, one byte changed
        f.seek(DATA_OFFSET + 5)
        f.write(b"\x7f")
    bad = subprocess.run([str(BIN), "verify", str(rows)], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2, bad.stdout
    assert "table 'hashtags': its rows do not match the digest" in bad.stderr


def test_export_and_convert_write_servable_row_directories(tmp_path: Path, config: ModelConfig) -> None:
    model_yaml = str(write_model_config(config, tmp_path / "m.yaml"))
    exported = subprocess.run(
        [
            str(BIN),
            "export",
            "--model",
            model_yaml,
            "--seed",
            "3",
            "--storage",
            "mmap",
            "-o",
            str(tmp_path / "exported"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    version = exported.stdout.split("(version ")[1].split(")")[0]
    served = build_serving_model(
        make_config(TABLES, name="stored").model_copy(), checkpoint=tmp_path / "exported", default_storage="mmap"
    )
    assert served.version == version  # the printed version is the served one
    module = LargeEmbeddings(config)
    init_weights(module, 3)
    state = {f"model.{k}": v for k, v in module.state_dict().items()}
    torch.save(state, tmp_path / "trained.pt")
    converted = subprocess.run(
        [
            str(BIN),
            "convert",
            str(tmp_path / "trained.pt"),
            "--model",
            model_yaml,
            "-o",
            str(tmp_path / "converted"),
            "--storage",
            "mmap",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert converted.returncode == 0, converted.stderr
    a = (tmp_path / "exported" / "user.safetensors").read_bytes()[4096:]
    b = (tmp_path / "converted" / "user.safetensors").read_bytes()[4096:]
    assert a == b  # the same weights, the same rows


@pytest.mark.slow
def test_a_worker_killed_by_sigbus_is_reported_naming_the_row_file(tmp_path: Path, config: ModelConfig) -> None:
    from embserve.benchmarks.procs import ServerProcess

    rows = _rows(config, 3, tmp_path / "rows")
    args = [
        str(BIN),
        "serve",
        "--workers",
        "2",
        "--model",
        str(write_model_config(config, tmp_path / "m.yaml")),
        "--checkpoint",
        str(rows),
        "--storage",
        "mmap",
        "--port",
        "0",
        "--no-metrics",
        "--grace-period",
        "1",
    ]
    with ServerProcess(args, "embserve --workers 2") as server:
        workers = server.logs.wait("serving", 2)
        os.truncate(row_file_path(rows, "author"), DATA_OFFSET + 8)
        os.kill(int(str(workers[0]["pid"])), signal.SIGBUS)  # as the kernel does when a read passes the file's end
        report = server.logs.wait("worker died of SIGBUS reading a row file")[0]
        assert "table 'author'" in str(report["error"]) and "author.safetensors" in str(report["error"])
        server.signal(signal.SIGTERM)
        server.popen.wait(60)
