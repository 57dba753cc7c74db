"""Fixtures: small model configs, their float weights, and a real server on an ephemeral port."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pathlib import Path

import numpy as np
import pytest
import yaml

from embserve.embeddings import (
    LargeEmbeddings,
    ModelConfig,
    ServingModel,
    build_serving_model,
    init_weights,
    model_config_from_dict,
    table_weights,
)

SMALL_TABLES: list[dict[str, Any]] = [
    {"name": "user", "num_embeddings": 1000, "embedding_dim": 16},
    {"name": "author", "num_embeddings": 500, "embedding_dim": 8, "data_type": "fp16"},
    {"name": "hashtags", "num_embeddings": 300, "embedding_dim": 12, "weighted": True},
    {"name": "topics", "num_embeddings": 200, "embedding_dim": 4, "id_policy": "hash"},
]


def make_config(tables: list[dict[str, Any]] | None = None, name: str = "small") -> ModelConfig:
    return model_config_from_dict({"name": name, "tables": tables or SMALL_TABLES})


def write_model_config(config: ModelConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


def float_tables(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The tables' weights as float32 numpy arrays, from the same deterministic init the server uses."""
    model = LargeEmbeddings(config)
    init_weights(model, seed)
    return {k: v.detach().float().numpy().copy() for k, v in table_weights(model).items()}


@pytest.fixture(scope="session")
def small_config() -> ModelConfig:
    return make_config()


@pytest.fixture(scope="session")
def small_tables(small_config: ModelConfig) -> dict[str, np.ndarray]:
    return float_tables(small_config)


class ServerHandle:
    """A real embserve server running on its own event loop in a background thread."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server = server
        self.loop = loop
        self.thread = thread

    @property
    def address(self) -> str:
        return str(self.server.address)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return float(self.server.metrics.value(name, labels))

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


def start_server(config: Any, model: ServingModel | None = None) -> ServerHandle:
    from embserve.server.app import EmbserveServer

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                server = EmbserveServer(config, model=model)
                await server.start()
                box["server"] = server
            except BaseException as err:  # surfaced to the test below
                box["error"] = err
            ready.set()

        loop.run_until_complete(boot())
        if "server" in box:
            loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name="embserve-test-server", daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in box:
        raise box["error"]
    return ServerHandle(box["server"], loop, thread)


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
