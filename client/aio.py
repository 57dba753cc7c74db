"""The asyncio client: the same methods as `Client`, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, OutputDTypeName

from ._base import HEALTH_STATUS, USE_CLIENT_DEFAULT, BaseClient, Timeout
from ._streams import AsyncStreamPool
from .errors import EmbserveError, PermissionDenied, from_rpc_error
from .inputs import Features, Weights
from .result import LookupResult, ModelInfo
from .updates import Messages, RowUpdate, UpdateResult

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient[grpc.aio.Channel]):
    """An asyncio embserve client over one reused `grpc.aio` channel; arguments as `Client`'s."""

    _streams: AsyncStreamPool | None = None  # opened by the first lookup over streams

    def _open_channel(
        self, target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        if creds is not None:
            return grpc.aio.secure_channel(target, creds, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    async def lookup(
        self,
        features: Features,
        *,
        weights: Weights | None = None,
        batch_size: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        output_dtype: OutputDType | OutputDTypeName = OutputDType.FLOAT32,
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features`; see `Client.lookup`."""
        await self._fetch_limits(timeout)
        requests = self._requests(
            features, weights=weights, batch_size=batch_size, output_dtype=output_dtype, request_id=request_id
        )
        deadline = self._timeout(timeout)
        if self._transport == "stream":
            if self._streams is None:
                self._streams = AsyncStreamPool(
                    self._channel, self._metadata, self._stream_count, self._retry, **self._coalescing()
                )
            pool = self._streams
            return self._joined(await asyncio.gather(*(pool.lookup(r, deadline) for r in requests)))
        try:
            responses = await asyncio.gather(
                *(self._stub.Lookup(r, timeout=deadline, metadata=self._metadata) for r in requests)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return self._joined(responses)

    async def update_rows(
        self,
        table: str,
        ids: Any,
        rows: Any,
        *,
        update_id: str = "",
        serving: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> UpdateResult:
        """Replaces rows of `table`; see `Client.update_rows`."""
        outcome = (await self.update_many([RowUpdate(table, ids, rows, update_id, serving)], timeout=timeout))[0]
        if isinstance(outcome, EmbserveError):
            raise outcome
        return outcome

    async def update_many(
        self, updates: Iterable[RowUpdate], *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[UpdateResult | EmbserveError]:
        """Sends `updates` over one UpdateRows stream; see `Client.update_many`."""
        messages = Messages(updates)
        try:
            call = self._stub.UpdateRows(iter(messages), timeout=self._timeout(timeout), metadata=self._metadata)
            return messages.outcomes([answer async for answer in call])
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def _fetch_limits(self, timeout: Timeout) -> None:
        """Fetches the server's request limits once; a token that may not read metadata gets no chunking."""
        if self._needs_limits:
            try:
                await self.metadata(timeout=timeout)
            except PermissionDenied:
                self._metadata_denied = True

    async def metadata(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """The served model's tables, key order, version and request limits."""
        try:
            response = await self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self._info = ModelInfo.from_proto(response)
        return self._info

    async def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The standard gRPC health status: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`."""
        try:
            resp = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return HEALTH_STATUS[resp.status]

    async def close(self) -> None:
        if self._streams is not None:
            await self._streams.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
