"""The embserve server: wire -> validated request -> batch -> forward -> split -> wire.

Three front ends (`servicer`: Lookup and metadata; `streams`: LookupStream; `inference`: the Open Inference
Protocol) translate their wire types into one request path, the `frontdoor` (decoding, byte budgets, calls in
flight, drain, status and metrics), which hands validated requests to a `backend`: `local_backend` batches them
(`batcher`), assembles one KJT (`assembler`) and runs the model (`executor`), framing each answer (`framing`).
`app` builds them once; `cli`, `flags` and `config` are the settings. Names are loaded from their modules when
first used, so that the command line and its settings run without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AuthConfig",
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
    "ReloadFailed",
    "ServerConfig",
    "ShuttingDown",
    "StartupError",
    "TlsConfig",
    "UnknownModel",
    "load_server_config",
]

# Searched in this order for a name: the torch-free modules first.
_MODULES = ("config", "errors", "startup", "batcher", "app")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            value = getattr(importlib.import_module(f".{module}", __name__), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .app import EmbserveServer, ReloadFailed
    from .batcher import DynamicBatcher
    from .config import (
        AuthConfig,
        BatchingConfig,
        BatchPolicy,
        LimitsConfig,
        ServerConfig,
        TlsConfig,
        load_server_config,
    )
    from .errors import (
        BatchFailed,
        DeadlineExpired,
        EmbserveError,
        InvalidRequest,
        Overloaded,
        ShuttingDown,
        UnknownModel,
    )
    from .startup import StartupError
