"""The embserve server: wire -> validated request -> batch -> forward -> split -> wire.

decode (wire -> `SparseRequest`, validation) -> batcher (queue, deadlines, batches) -> assembler (requests -> KJT
arrays) -> executor (device, forward, split) -> framing (rows -> LookupResponse bytes); servicer (the embserve.v1
handlers), inference (the Open Inference Protocol's handlers, into the same batcher) and app (process, health,
reflection, metrics) at the edges; flags and config for the settings.
"""

from .app import EmbserveServer, ReloadFailed
from .batcher import DynamicBatcher
from .config import AuthConfig, BatchingConfig, BatchPolicy, LimitsConfig, ServerConfig, TlsConfig, load_server_config
from .startup import StartupError
from .errors import (
    BatchFailed,
    DeadlineExpired,
    EmbserveError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)

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
