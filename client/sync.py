"""The blocking client."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, OutputDTypeName

from ._base import HEALTH_STATUS, USE_CLIENT_DEFAULT, BaseClient, Timeout
from ._streams import StreamPool
from .errors import EmbserveError, PermissionDenied, from_rpc_error
from .inputs import Features, Weights
from .result import LookupResult, ModelInfo
from .updates import Messages, RowUpdate, UpdateResult

__all__ = ["Client"]


class Client(BaseClient[grpc.Channel]):
    """A blocking embserve client over one reused gRPC channel.

    Args:
        addresses: `host:port`, a gRPC target (`dns:///name:port`), or several `host:port` replicas that calls are
            spread over with gRPC's `round_robin`.
        timeout: default deadline per call in seconds (None: no deadline).
        retry: retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED; None disables retries.
        tls: True for TLS with the system roots, a `TlsConfig` for custom roots or mutual TLS, None for plaintext.
        token: bearer token sent as `authorization` metadata on every call.
        max_message_bytes: largest request sent; larger requests are split into chunks and the results joined.
        transport: `unary` (one Lookup call per request) or `stream` (messages multiplexed over a few
            LookupStream calls; see README "Transports").
        streams: with `stream`, the streams per client.
        coalesce: with `stream`, lookups issued together (by several threads or tasks while a stream is writing,
            or by `AsyncClient` in one turn of the event loop) go out in one message when the server takes several
            per message; False: one lookup per message.
    """

    _streams: StreamPool | None = None  # opened by the first lookup over streams

    def _open_channel(
        self, target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        if creds is not None:
            return grpc.secure_channel(target, creds, options=options)
        return grpc.insecure_channel(target, options=options)

    def lookup(
        self,
        features: Features,
        *,
        weights: Weights | None = None,
        batch_size: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        output_dtype: OutputDType | OutputDTypeName = OutputDType.FLOAT32,
        request_id: str = "",
    ) -> LookupResult:
        """Pooled embeddings of `features`.

        Args:
            features: `{key: [[id, ...], ...]}`, `{key: (lengths, values[, weights])}` or a `KeyedJaggedTensor`.
            weights: per-id weights for the list form, `{key: [[w, ...], ...]}`.
            batch_size: number of examples; inferred from the features unless they are empty.
            timeout: deadline in seconds for this call; None: no deadline (default: the client's).
            output_dtype: `float32`, `float16` or `bfloat16` on the wire.
            request_id: echoed by the server and written to its logs.

        Raises:
            EmbserveError: a subclass per failure (`InvalidRequest`, `Overloaded`, `DeadlineExceeded`, ...).
        """
        self._fetch_limits(timeout)
        requests = self._requests(
            features, weights=weights, batch_size=batch_size, output_dtype=output_dtype, request_id=request_id
        )
        deadline = self._timeout(timeout)
        if self._transport == "stream":
            return self._joined(self._over_streams(requests, deadline))
        try:
            if len(requests) == 1:
                responses = [self._stub.Lookup(requests[0], timeout=deadline, metadata=self._metadata)]
            else:
                futures = [self._stub.Lookup.future(r, timeout=deadline, metadata=self._metadata) for r in requests]
                responses = [f.result() for f in futures]
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return self._joined(responses)

    def _over_streams(self, requests: list[pb.LookupRequest], deadline: float | None) -> list[pb.LookupResponse]:
        if self._streams is None:
            self._streams = StreamPool(
                self._channel, self._metadata, self._stream_count, self._retry, **self._coalescing()
            )
        if len(requests) == 1:
            return [self._streams.lookup(requests[0], deadline)]
        with concurrent.futures.ThreadPoolExecutor(min(len(requests), 8)) as pool:
            return list(pool.map(lambda r: self._streams.lookup(r, deadline), requests))  # type: ignore[union-attr]

    def update_rows(
        self,
        table: str,
        ids: Any,
        rows: Any,
        *,
        update_id: str = "",
        serving: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> UpdateResult:
        """Replaces rows of `table` on a server started with updates on; returns once the server serves them.

        Args:
            table: the table's name.
            ids: int64 row numbers, each in `[0, num_embeddings)`, no repeats.
            rows: float32 `[len(ids), embedding_dim]` (converted by the server to the table's serving type); with
                `serving=True`, the table's stored row bytes.
            update_id: echoed in the result and the server's log.
            timeout: deadline in seconds (None: none; default: the client's).

        Raises:
            InvalidRequest: the update does not fit the table (the server names the problem; nothing applied).
            EmbserveError: a subclass per other failure (`PermissionDenied` without an UpdateRows token, ...).
        """
        outcome = self.update_many([RowUpdate(table, ids, rows, update_id, serving)], timeout=timeout)[0]
        if isinstance(outcome, EmbserveError):
            raise outcome
        return outcome

    def update_many(
        self, updates: Iterable[RowUpdate], *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> list[UpdateResult | EmbserveError]:
        """Sends `updates` over one UpdateRows stream (an iterator is streamed as it yields); the server applies
        them in order. Returns each one's result, or the error it was refused with (the others are applied
        regardless); an update that cannot be encoded ends the stream and is raised."""
        messages = Messages(updates)
        try:
            answers = self._stub.UpdateRows(iter(messages), timeout=self._timeout(timeout), metadata=self._metadata)
            return messages.outcomes(answers)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _fetch_limits(self, timeout: Timeout) -> None:
        """Fetches the server's request limits once; a token that may not read metadata gets no chunking."""
        if self._needs_limits:
            try:
                self.metadata(timeout=timeout)
            except PermissionDenied:
                self._metadata_denied = True

    def metadata(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """The served model's tables, key order, version and request limits."""
        try:
            response = self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        self._info = ModelInfo.from_proto(response)
        return self._info

    def health(self, service: str = "", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The standard gRPC health status: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return HEALTH_STATUS[resp.status]

    def close(self) -> None:
        if self._streams is not None:
            self._streams.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
