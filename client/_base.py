"""What the sync and async clients share: settings, channel and stubs, deadlines, limits, request preparation.

`Client` and `AsyncClient` add only their I/O (blocking or awaitable calls) on top of `BaseClient`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc
from embserve.v1.wire import DEFAULT_MAX_MESSAGE_BYTES, OutputDType

from ._streams import MAX_COALESCED
from ._transport import RetryPolicy, TlsConfig, build_target, call_metadata, channel_options, credentials
from .inputs import Features, Weights, to_sparse_input
from .result import LookupResult, ModelInfo

__all__ = ["DEFAULT_TIMEOUT_S", "HEALTH_STATUS", "USE_CLIENT_DEFAULT", "BaseClient", "Timeout", "UseClientDefault"]


class UseClientDefault(enum.Enum):
    """The type of `USE_CLIENT_DEFAULT`."""

    USE_CLIENT_DEFAULT = enum.auto()


USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT
"""A call's `timeout` when it is not given: the client's own. (`timeout=None` means no deadline.)"""

Timeout: TypeAlias = "float | None | Literal[UseClientDefault.USE_CLIENT_DEFAULT]"

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_TRANSPORT = "stream"
DEFAULT_STREAMS = 2
HEALTH_STATUS: dict[int, str] = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
_HEADROOM = 0.9  # chunks stay this far under the server's message limit

ChannelT = TypeVar("ChannelT")


class BaseClient(Generic[ChannelT]):
    """Settings, channel and stubs, deadlines and request building; the arguments are `Client`'s."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        transport: str = DEFAULT_TRANSPORT,
        streams: int = DEFAULT_STREAMS,
        coalesce: bool = True,
    ) -> None:
        if transport not in ("unary", "stream"):
            raise ValueError(f"transport must be 'unary' or 'stream', got {transport!r}")
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        override = tls.server_name_override if isinstance(tls, TlsConfig) else None
        self._target = build_target(addresses)
        self._options = channel_options(retry=retry, max_message_bytes=max_message_bytes, server_name_override=override)
        self._metadata = call_metadata(token)
        self._default_timeout = timeout
        self._retry = retry
        self._transport = transport
        self._stream_count = streams
        self._coalesce = coalesce
        self._max_message_bytes = max_message_bytes
        self._channel = self._open_channel(self._target, credentials(tls), self._options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated, untyped
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: ModelInfo | None = None
        self._metadata_denied = False

    def _open_channel(
        self, target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> ChannelT:
        raise NotImplementedError

    def _timeout(self, timeout: Timeout) -> float | None:
        """A call's deadline in seconds: its own, or the client's when not given; None: no deadline."""
        return self._default_timeout if timeout is USE_CLIENT_DEFAULT else timeout

    @property
    def _needs_limits(self) -> bool:
        """Whether the server's limits are still to be fetched (not yet known, and not denied to this token)."""
        return self._info is None and not self._metadata_denied

    def _requests(
        self,
        features: Features,
        *,
        weights: Weights | None,
        batch_size: int | None,
        output_dtype: OutputDType | str,
        request_id: str,
    ) -> list[pb.LookupRequest]:
        """Checks the features and splits them into requests that fit the server's limits (when known)."""
        sparse = to_sparse_input(features, weights=weights, batch_size=batch_size)
        info = self._info
        if info is not None:
            max_bytes = int(min(info.max_message_bytes or self._max_message_bytes, self._max_message_bytes) * _HEADROOM)
            chunks = sparse.chunks(info.max_request_examples or sparse.batch_size, max_bytes)
        else:
            chunks = [sparse]
        return [c.to_proto(output_dtype, request_id) for c in chunks]

    def _coalescing(self) -> dict[str, int]:
        """How many lookups (and bytes) one stream message may carry: what the server takes, when it says."""
        info = self._info
        if not self._coalesce or info is None or info.max_stream_batch <= 1:
            return {"max_batch": 1, "max_bytes": 0}
        limit = min(info.max_message_bytes or self._max_message_bytes, self._max_message_bytes)
        return {"max_batch": min(MAX_COALESCED, info.max_stream_batch), "max_bytes": int(limit * _HEADROOM)}

    @staticmethod
    def _joined(responses: Sequence[pb.LookupResponse]) -> LookupResult:
        """One result from the responses of a request's chunks, in order."""
        return LookupResult.concat([LookupResult.from_proto(r) for r in responses])
