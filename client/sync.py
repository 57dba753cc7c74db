"""The blocking client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc

from ._common import DEFAULT_TIMEOUT_S, HEALTH_STATUS, ClientSettings, prepare_requests
from ._transport import DEFAULT_MAX_MESSAGE_BYTES, RetryPolicy, TlsConfig, credentials
from .errors import PermissionDenied, from_rpc_error
from .result import LookupResult, ModelInfo

__all__ = ["Client"]


class Client:
    """A blocking embserve client over one reused gRPC channel.

    Args:
        addresses: `host:port`, a gRPC target (`dns:///name:port`), or several `host:port` replicas that calls are
            spread over with gRPC's `round_robin`.
        timeout: default deadline per call in seconds (None: no deadline).
        retry: retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED; None disables retries.
        tls: True for TLS with the system roots, a `TlsConfig` for custom roots or mutual TLS, None for plaintext.
        token: bearer token sent as `authorization` metadata on every call.
        max_message_bytes: largest request sent; larger requests are split into chunks and the results joined.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._settings = ClientSettings.build(
            addresses, timeout=timeout, retry=retry, tls=tls, token=token, max_message_bytes=max_message_bytes
        )
        s = self._settings
        creds = credentials(tls)
        self._channel = (
            grpc.secure_channel(s.target, creds, options=s.options)
            if creds is not None
            else grpc.insecure_channel(s.target, options=s.options)
        )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._max_message_bytes = max_message_bytes
        self._info: ModelInfo | None = None
        self._metadata_denied = False

    def _timeout(self, timeout: float | None) -> float | None:
        return self._settings.timeout if timeout is None else timeout

    def lookup(
        self,
        features: Any,
        *,
        weights: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        output_dtype: str = "float32",
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features`.

        Args:
            features: `{key: [[id, ...], ...]}`, `{key: (lengths, values[, weights])}` or a `KeyedJaggedTensor`.
            weights: per-id weights for the list form, `{key: [[w, ...], ...]}`.
            batch_size: number of examples; inferred from the features unless they are empty.
            timeout: deadline in seconds for this call (default: the client's).
            output_dtype: `float32`, `float16` or `bfloat16` on the wire.
            request_id: echoed by the server and written to its logs.

        Raises:
            EmbserveError: a subclass per failure (`InvalidRequest`, `Overloaded`, `DeadlineExceeded`, ...).
        """
        requests = prepare_requests(
            features,
            weights=weights,
            batch_size=batch_size,
            output_dtype=output_dtype,
            request_id=request_id,
            info=self._limits(timeout),
            max_message_bytes=self._max_message_bytes,
        )
        deadline = self._timeout(timeout)
        try:
            if len(requests) == 1:
                responses = [self._stub.Lookup(requests[0], timeout=deadline, metadata=self._settings.metadata)]
            else:
                futures = [
                    self._stub.Lookup.future(r, timeout=deadline, metadata=self._settings.metadata) for r in requests
                ]
                responses = [f.result() for f in futures]
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return LookupResult.concat([LookupResult.from_proto(r) for r in responses])

    def _limits(self, timeout: float | None) -> ModelInfo | None:
        """The server's request limits, fetched once; None (no client-side chunking) when the token may not read
        metadata."""
        if self._info is None and not self._metadata_denied:
            try:
                self.metadata(timeout=timeout)
            except PermissionDenied:
                self._metadata_denied = True
        return self._info

    def metadata(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's tables, key order, version and request limits."""
        try:
            info = ModelInfo.from_proto(
                self._stub.GetModelMetadata(
                    pb.GetModelMetadataRequest(), timeout=self._timeout(timeout), metadata=self._settings.metadata
                )
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self._info = info
        return info

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return HEALTH_STATUS[resp.status]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
