"""The embserve Python SDK: `Client` and `AsyncClient`, typed results, one exception hierarchy.

Needs only grpcio, protobuf and numpy; torch and torchrec are used when present (KeyedJaggedTensor input,
`LookupResult.to_torch()`), never required.
"""

from ._transport import RetryPolicy, TlsConfig
from .aio import AsyncClient
from .errors import (
    Cancelled,
    DeadlineExceeded,
    EmbserveError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from .inputs import SparseInput, to_sparse_input
from .result import LookupResult, ModelInfo, TableInfo
from .sync import Client

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "EmbserveError",
    "InvalidRequest",
    "LookupResult",
    "ModelInfo",
    "Overloaded",
    "PermissionDenied",
    "RetryPolicy",
    "ServerError",
    "SparseInput",
    "TableInfo",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "to_sparse_input",
]
