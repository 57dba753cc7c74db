"""The asyncio client: the same methods as `Client`, awaitable."""

from __future__ import annotations

import asyncio
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

__all__ = ["AsyncClient"]


class AsyncClient:
    """An asyncio embserve client over one reused `grpc.aio` channel; arguments as `Client`'s."""

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
        self._settings = s = ClientSettings.build(
            addresses, timeout=timeout, retry=retry, tls=tls, token=token, max_message_bytes=max_message_bytes
        )
        creds = credentials(tls)
        self._channel = (
            grpc.aio.secure_channel(s.target, creds, options=s.options)
            if creds is not None
            else grpc.aio.insecure_channel(s.target, options=s.options)
        )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._max_message_bytes = max_message_bytes
        self._info: ModelInfo | None = None
        self._metadata_denied = False

    def _timeout(self, timeout: float | None) -> float | None:
        return self._settings.timeout if timeout is None else timeout

    async def lookup(
        self,
        features: Any,
        *,
        weights: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        output_dtype: str = "float32",
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features`; see `Client.lookup`."""
        requests = prepare_requests(
            features,
            weights=weights,
            batch_size=batch_size,
            output_dtype=output_dtype,
            request_id=request_id,
            info=await self._limits(timeout),
            max_message_bytes=self._max_message_bytes,
        )
        deadline = self._timeout(timeout)
        try:
            responses = await asyncio.gather(
                *(self._stub.Lookup(r, timeout=deadline, metadata=self._settings.metadata) for r in requests)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return LookupResult.concat([LookupResult.from_proto(r) for r in responses])

    async def _limits(self, timeout: float | None) -> ModelInfo | None:
        """The server's request limits, fetched once; None (no client-side chunking) when the token may not read
        metadata."""
        if self._info is None and not self._metadata_denied:
            try:
                await self.metadata(timeout=timeout)
            except PermissionDenied:
                self._metadata_denied = True
        return self._info

    async def metadata(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's tables, key order, version and request limits."""
        try:
            response = await self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(), timeout=self._timeout(timeout), metadata=self._settings.metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self._info = ModelInfo.from_proto(response)
        return self._info

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health status: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`."""
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return HEALTH_STATUS[resp.status]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
