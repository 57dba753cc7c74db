"""The embserve Python SDK: `Client` and `AsyncClient`, typed results, one exception hierarchy.

Needs only grpcio, protobuf and numpy; torch and torchrec are used when present (KeyedJaggedTensor input,
`LookupResult.to_torch()`), never required.
"""

from embserve.v1.wire import OutputDType, OutputDTypeName

from ._base import USE_CLIENT_DEFAULT, Timeout, UseClientDefault
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
from .inputs import FeatureArrays, Features, IdLists, KeyedJaggedLike, SparseInput, Weights, to_sparse_input
from .result import LookupResult, ModelInfo, TableInfo
from .sharded import AsyncShardedClient, ShardedClient
from .sync import Client
from .updates import RowUpdate, UpdateResult

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "AsyncShardedClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "EmbserveError",
    "FeatureArrays",
    "Features",
    "IdLists",
    "InvalidRequest",
    "KeyedJaggedLike",
    "LookupResult",
    "ModelInfo",
    "OutputDType",
    "OutputDTypeName",
    "Overloaded",
    "PermissionDenied",
    "RetryPolicy",
    "RowUpdate",
    "ServerError",
    "ShardedClient",
    "SparseInput",
    "TableInfo",
    "Timeout",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "UpdateResult",
    "UseClientDefault",
    "Weights",
    "to_sparse_input",
]
