"""Server logs: embserve's own INFO shows at the default level, other libraries' INFO chatter does not, and the
plain-text format keeps every `extra` field that the JSON lines carry."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from embserve.embeddings import build_serving_model
from embserve.server.logs import configure_logging
from tests.support import make_config


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_third_party_info_is_quiet_at_the_default_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    # fbgemm logs "Feature Gates" through the root logger and torchrec a quantization note, both at INFO, while the
    # fused collection is built.
    build_serving_model(make_config([{"name": "user", "num_embeddings": 10, "embedding_dim": 4}]), engine="fused")
    logging.getLogger("embserve.server.app").info("serving", extra={"address": "127.0.0.1:1"})
    logging.getLogger("torchrec.somewhere").warning("a real warning")
    logging.getLogger().info("root chatter")
    lines = _lines(capsys)
    records = [json.loads(line) for line in lines]
    assert not any("Feature Gates" in line or "root chatter" in line for line in lines), lines
    assert not any(r["logger"].startswith("torchrec") and r["level"] == "info" for r in records), lines
    assert any(r["msg"] == "serving" for r in records)
    assert any(r["msg"] == "a real warning" for r in records)
    assert any(r["logger"].startswith("embserve.embeddings") for r in records)  # embserve's own build line


@pytest.mark.usefixtures("restore_logging")
def test_debug_level_shows_everything(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "json")
    logging.getLogger().info("root chatter")
    logging.getLogger("torchrec.somewhere").debug("detail")
    lines = _lines(capsys)
    assert any("root chatter" in line for line in lines) and any("detail" in line for line in lines)


@pytest.mark.usefixtures("restore_logging")
def test_text_format_keeps_the_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    logging.getLogger("embserve.server.app").info(
        "serving", extra={"address": "127.0.0.1:50051", "version": "ckpt-3f2a9c81b0de", "worker": 0}
    )
    (line,) = _lines(capsys)
    assert "INFO embserve.server.app: serving" in line
    assert "address=127.0.0.1:50051" in line and "version=ckpt-3f2a9c81b0de" in line and "worker=0" in line
