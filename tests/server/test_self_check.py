"""Start-up self-check: a model that cannot compute never reaches SERVING; `embserve serve` exits 1 with one
line naming the table."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from embserve.embeddings import SelfCheckFailed, ServingModel
from embserve.server.app import EmbserveServer, ReloadFailed
from embserve.server.config import ServerConfig
from tests.support import ServerHandle, make_config, write_model_config

Factory = Callable[..., ServerHandle]
TABLES = [
    {"name": "user", "num_embeddings": 50, "embedding_dim": 8},
    {"name": "tags", "num_embeddings": 30, "embedding_dim": 4, "data_type": "fp16", "weighted": True},
]
# Run in the server process: any forward with ids for table 'tags' fails.
BREAK_TAGS = """
import sys
from embserve.embeddings import ServingModel
forward = ServingModel.forward
def broken(self, features):
    if features["tags"].values().numel():
        raise RuntimeError("injected fault\\nmore context")
    return forward(self, features)
"""


def _break_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace: dict[str, object] = {}
    exec(BREAK_TAGS, namespace)
    monkeypatch.setattr(ServingModel, "forward", namespace["broken"])


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_server_refuses_a_model_that_cannot_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    model = write_model_config(make_config(TABLES), tmp_path / "m.yaml")
    config = ServerConfig(model=str(model), engine=engine, port=0, metrics_port=None)
    EmbserveServer(config)  # computes: constructed
    _break_tags(monkeypatch)
    with pytest.raises(SelfCheckFailed, match="table 'tags': RuntimeError: injected fault$"):
        EmbserveServer(config)


def test_reload_to_a_model_that_cannot_compute_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_factory: Factory
) -> None:
    from embserve.embeddings import LargeEmbeddings, init_weights, save_checkpoint

    config = make_config(TABLES)
    ckpt = tmp_path / "w.safetensors"
    lm = LargeEmbeddings(config)
    init_weights(lm, 1)
    save_checkpoint(lm, ckpt)
    handle = server_factory(model=str(write_model_config(config, tmp_path / "m.yaml")), checkpoint=str(ckpt))
    before = handle.server.model.version
    _break_tags(monkeypatch)
    with pytest.raises(ReloadFailed, match="table 'tags'"):
        handle.call(handle.server.reload(str(ckpt), version="next"))
    assert handle.server.model.version == before


def _serve(code: str, args: list[str]) -> tuple[int, list[str]]:
    """Runs `embserve serve`; the exit code and its stderr lines. A server that gets as far as serving is stopped
    at once and fails the test, rather than left to run into a timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            assert '"msg": "serving"' not in line, "a model that cannot compute reached SERVING"
        return proc.wait(timeout=60), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_exits_non_zero_with_one_line_naming_the_table(tmp_path: Path) -> None:
    model = write_model_config(make_config(TABLES), tmp_path / "m.yaml")
    code = (
        BREAK_TAGS
        + "ServingModel.forward = broken\nfrom embserve.client.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    args = ["serve", "--model", str(model), "--engine", "eager", "--port", "0", "--no-metrics"]
    code_default, lines = _serve(code, args)
    assert code_default == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    assert lines[-1] == "embserve serve: self-check failed for table 'tags': RuntimeError: injected fault", lines
    code_quiet, quiet = _serve(code, [*args, "--log-level", "error"])
    assert code_quiet == 1
    assert quiet == [lines[-1]]  # the one line, and nothing else
