"""The embserve server: wire -> validated request -> batch -> forward -> split -> wire.

codec (proto <-> numpy, validation) -> batcher (queue, deadlines, batches) -> assembler (requests -> KJT arrays)
-> executor (device, forward, split) -> servicer (gRPC handlers) -> app (process, health, reflection, metrics).
Public names are imported lazily, so that `embserve query` (in `cli`) runs in a client-only install.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BatchFailed",
    "BatchPolicy",
    "BatchingConfig",
    "DeadlineExpired",
    "DynamicBatcher",
    "EmbserveError",
    "EmbserveServer",
    "InvalidRequest",
    "LimitsConfig",
    "Overloaded",
    "ServerConfig",
    "ShuttingDown",
    "load_server_config",
]

_HOME = {
    "BatchFailed": "errors",
    "DeadlineExpired": "errors",
    "EmbserveError": "errors",
    "InvalidRequest": "errors",
    "Overloaded": "errors",
    "ShuttingDown": "errors",
    "BatchPolicy": "config",
    "BatchingConfig": "config",
    "LimitsConfig": "config",
    "ServerConfig": "config",
    "load_server_config": "config",
    "DynamicBatcher": "batcher",
    "EmbserveServer": "app",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
