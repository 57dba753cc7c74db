"""Every start-up failure of `python -m embserve.server` is one line on stderr that names what to fix, with a
non-zero exit code and no traceback (unless `--log-level debug`)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from embserve.embeddings import LargeEmbeddings, ServingModel, init_weights, save_checkpoint
from embserve.server import StartupError
from tests.support import ServerHandle, make_config, write_model_config

TABLES = [{"name": "user", "num_embeddings": 50, "embedding_dim": 4}]


def _start(*args: str) -> tuple[int, list[str], str]:
    metrics = [] if "--metrics-port" in args else ["--no-metrics"]
    proc = subprocess.run(
        [sys.executable, "-m", "embserve.server", "--port", "0", *metrics, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr.splitlines(), proc.stderr


def _assert_one_line(args: list[str], *needles: str) -> str:
    code, lines, stderr = _start(*args)
    assert code != 0, stderr
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr
    assert lines[0].startswith("embserve serve: ")
    return lines[0]


@pytest.fixture
def model_yaml(tmp_path: Path) -> Path:
    return write_model_config(make_config(TABLES), tmp_path / "model.yaml")


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (here: a listening socket) holds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_missing_checkpoint_is_found_before_the_model_is_built(tmp_path: Path, model_yaml: Path) -> None:
    absent = tmp_path / "absent.safetensors"
    line = _assert_one_line(["--model", str(model_yaml), "--checkpoint", str(absent)], "--checkpoint", str(absent))
    assert "no such file" in line


def test_unreadable_checkpoint(tmp_path: Path, model_yaml: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _assert_one_line(["--model", str(model_yaml), "--checkpoint", str(junk)], str(junk), "cannot read checkpoint")


def test_shape_mismatch_names_the_table_and_file(tmp_path: Path, model_yaml: Path) -> None:
    other = LargeEmbeddings(make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 8}]))
    init_weights(other)
    path = tmp_path / "wide.safetensors"
    save_checkpoint(other, path)
    _assert_one_line(["--model", str(model_yaml), "--checkpoint", str(path)], str(path), "'user'", "(50, 8)", "(50, 4)")


def test_bad_model_yaml_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables:\n  - {name: user, num_embeddings: 0, embedding_dim: 4}\n")
    _assert_one_line(["--model", str(bad)], "--model", str(bad), "num_embeddings")


def test_model_yaml_that_is_not_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("tables: [\n  - {name: user\n")
    _assert_one_line(["--model", str(bad)], str(bad), "not valid YAML")


def test_unknown_model_name() -> None:
    _assert_one_line(["--model", "no_such_model"], "--model", "no_such_model", "default")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("batching:\n  max_batch_size: 0\n", ["batching.max_batch_size"]),
        ("surprise: 1\n", ["surprise"]),
        ("batching: [\n", ["not valid YAML", "line"]),
    ],
)
def test_bad_server_yaml_names_the_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(text)
    _assert_one_line(["--config", str(config)], *needles)


def test_missing_server_yaml(tmp_path: Path) -> None:
    _assert_one_line(["--config", str(tmp_path / "absent.yaml")], "--config", str(tmp_path / "absent.yaml"))


def test_grpc_port_in_use(model_yaml: Path, held_port: int) -> None:
    _assert_one_line(["--model", str(model_yaml), "--port", str(held_port)], "gRPC port", str(held_port), "--port")


def test_metrics_port_in_use(model_yaml: Path, held_port: int) -> None:
    line = _assert_one_line(
        ["--model", str(model_yaml), "--metrics-port", str(held_port)], "metrics port", str(held_port)
    )
    assert "--metrics-port" in line and "--no-metrics" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_on_a_cpu_host(model_yaml: Path) -> None:
    _assert_one_line(["--model", str(model_yaml), "--device", "cuda"], "--device cuda", "CUDA is not available")


def test_missing_tls_file(tmp_path: Path, model_yaml: Path) -> None:
    cert = tmp_path / "server.pem"
    _assert_one_line(
        ["--model", str(model_yaml), "--tls-cert", str(cert), "--tls-key", str(tmp_path / "server.key")],
        "--tls-cert",
        str(cert),
    )


def test_debug_level_adds_the_traceback(tmp_path: Path, model_yaml: Path) -> None:
    absent = tmp_path / "absent.pt"
    code, lines, stderr = _start("--model", str(model_yaml), "--checkpoint", str(absent), "--log-level", "debug")
    assert code != 0
    assert "Traceback" in stderr and str(absent) in lines[-1]


# The same failures when the port is taken between the check and the bind: the server itself reports them as a
# StartupError naming the port, and nothing is left half-started.


def test_server_bind_failure_names_the_grpc_port(
    server_factory: Callable[..., ServerHandle], small_serving: ServingModel, held_port: int
) -> None:
    with pytest.raises(StartupError, match=f"gRPC port {held_port} .*--port"):
        server_factory(small_serving, port=held_port)


def test_server_bind_failure_names_the_metrics_port(
    server_factory: Callable[..., ServerHandle], small_serving: ServingModel, held_port: int
) -> None:
    with pytest.raises(StartupError, match=f"metrics port {held_port} .*--metrics-port"):
        server_factory(small_serving, metrics_port=held_port)
    # Nothing of the failed start holds the gRPC port or the model: a server starts normally afterwards.
    assert server_factory(small_serving).server.port > 0


_TORCH_PROBE = """
import sys
from embserve.client.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch" in sys.modules, "torchrec" in sys.modules, code)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--help"],
        ["serve", "--checkpoint", "missing.safetensors", "--no-metrics"],
        ["serve", "--model", "no-such-model", "--no-metrics"],
        ["serve", "--max-batch-size", "0", "--no-metrics"],
    ],
)
def test_help_and_start_up_errors_do_not_import_torch(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    torch_loaded, torchrec_loaded, code = proc.stdout.splitlines()[-1].split()
    assert (torch_loaded, torchrec_loaded) == ("False", "False"), proc.stderr
    assert code == ("0" if "--help" in args else "2"), proc.stderr


def test_a_truncated_checkpoint_is_refused_from_its_header(tmp_path: Path) -> None:
    config = make_config(TABLES)
    model = LargeEmbeddings(config)
    init_weights(model)
    path = tmp_path / "w.safetensors"
    save_checkpoint(model, path)
    path.write_bytes(path.read_bytes()[:-10])
    _assert_one_line(
        ["--model", str(write_model_config(config, tmp_path / "m.yaml")), "--checkpoint", str(path)],
        "is truncated",
        "w.safetensors",
    )
