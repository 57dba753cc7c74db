"""What the sync and async clients share: settings, request preparation, limits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from embserve.v1 import embserve_pb2 as pb

from ._transport import DEFAULT_MAX_MESSAGE_BYTES, RetryPolicy, TlsConfig, build_target, call_metadata, channel_options
from .inputs import to_sparse_input
from .result import ModelInfo

__all__ = ["HEALTH_STATUS", "ClientSettings", "prepare_requests"]

DEFAULT_TIMEOUT_S = 5.0
HEALTH_STATUS: dict[int, str] = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
_HEADROOM = 0.9  # chunks stay this far under the server's message limit


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    target: str
    options: list[tuple[str, Any]]
    tls: TlsConfig | bool | None
    metadata: tuple[tuple[str, str], ...] | None
    timeout: float | None

    @classmethod
    def build(
        cls,
        addresses: str | Sequence[str],
        *,
        timeout: float | None,
        retry: RetryPolicy | None,
        tls: TlsConfig | bool | None,
        token: str | None,
        max_message_bytes: int,
    ) -> ClientSettings:
        override = tls.server_name_override if isinstance(tls, TlsConfig) else None
        return cls(
            target=build_target(addresses),
            options=channel_options(retry=retry, max_message_bytes=max_message_bytes, server_name_override=override),
            tls=tls,
            metadata=call_metadata(token),
            timeout=timeout,
        )


def prepare_requests(
    features: Any,
    *,
    weights: Any,
    batch_size: int | None,
    output_dtype: str,
    request_id: str,
    info: ModelInfo | None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[pb.LookupRequest]:
    """Checks the features and splits them into requests that fit the server's limits (`info`)."""
    sparse = to_sparse_input(features, weights=weights, batch_size=batch_size)
    if info is not None:
        max_bytes = int(min(info.max_message_bytes or max_message_bytes, max_message_bytes) * _HEADROOM)
        chunks = sparse.chunks(info.max_request_examples or sparse.batch_size, max_bytes)
    else:
        chunks = [sparse]
    return [c.to_proto(output_dtype, request_id) for c in chunks]
