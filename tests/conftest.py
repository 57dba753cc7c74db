"""Fixtures: small model configs, their float weights, and a real server on an ephemeral port."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from embserve.embeddings import ModelConfig, ServingModel, build_serving_model
from tests.support import ServerHandle, float_tables, make_config, start_server


@pytest.fixture(scope="session")
def small_config() -> ModelConfig:
    return make_config()


@pytest.fixture(scope="session")
def small_tables(small_config: ModelConfig) -> dict[str, np.ndarray]:
    return float_tables(small_config)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerHandle]]:
    """Starts servers with `ServerConfig` overrides; stops them after. Defaults: port 0, no metrics port, and a
    queue budget long enough that a loaded test machine never turns a correctness test into an overload test
    (the tests of the budget set their own)."""
    from embserve.server.config import ServerConfig

    handles: list[ServerHandle] = []

    def make(serving: ServingModel | None = None, **overrides: Any) -> ServerHandle:
        data: dict[str, Any] = {"port": 0, "metrics_port": None, "grace_period_s": 2.0}
        data.update(overrides)
        data["batching"] = {"max_queue_wait_ms": 30_000, **overrides.get("batching", {})}
        handle = start_server(ServerConfig.model_validate(data), serving)
        handles.append(handle)
        return handle

    yield make
    for h in handles:
        h.stop()


@pytest.fixture(scope="session")
def small_serving(small_config: ModelConfig) -> ServingModel:
    return build_serving_model(small_config, engine="fused")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
