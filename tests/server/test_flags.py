"""The settings table is the one definition of the serve flags, the config overrides and the README table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from embserve.embeddings import Engine, ShardingType
from embserve.server.config import BatchPolicy, ServerConfig
from embserve.server.flags import SETTINGS, add_flags, overrides_from, settings_table

README = Path(__file__).resolve().parents[2] / "docs" / "server.md"  # the settings table lives there


def _parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return ServerConfig().with_overrides(overrides_from(parser.parse_args(list(argv))))


def test_readme_settings_table_is_the_generated_one() -> None:
    text = README.read_text()
    assert settings_table() in text, (
        "docs/server.md settings table differs: regenerate it with python -m embserve.server.flags"
    )


def test_every_config_field_has_a_flag() -> None:
    def keys(model: type, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            sub = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if hasattr(a, "model_fields")]
            out |= keys(sub[0], f"{prefix}{name}.") if sub else {f"{prefix}{name}"}
        return out

    assert keys(ServerConfig) == {s.key for s in SETTINGS}


def test_flags_set_their_keys_with_typed_values() -> None:
    config = _parse(
        "--engine",
        "eager",
        "--sharding",
        "row_wise",
        "--batch-policy",
        "wait",
        "--max-batch-size",
        "64",
        "--max-queue-wait-ms",
        "12.5",
        "--no-batching",
        "--no-metrics",
        "--port",
        "0",
        "--workers",
        "3",
    )
    assert config.engine is Engine.EAGER and config.sharding is ShardingType.ROW_WISE
    assert config.batching.policy is BatchPolicy.WAIT and config.batching.max_batch_size == 64
    assert config.batching.max_queue_wait_ms == 12.5 and config.batching.enabled is False
    assert config.metrics_port is None and config.port == 0 and config.workers == 3


def test_unset_flags_leave_the_file_values() -> None:
    base = ServerConfig().with_overrides({"batching.max_batch_size": 77, "metrics_port": 1234})
    parser = argparse.ArgumentParser()
    add_flags(parser)
    config = base.with_overrides(overrides_from(parser.parse_args(["--seed", "5"])))
    assert (config.batching.max_batch_size, config.metrics_port, config.seed) == (77, 1234, 5)


def test_bad_choice_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--engine", "turbo")
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_help_shows_each_default() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: 2048)" in text and "(default: fused)" in text and "(default: 200.0)" in text
