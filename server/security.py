"""Transport security and auth: TLS / mutual-TLS credentials, a bearer-token interceptor, and the bounds on what
callers without a token can cost.

Tokens are kept only as SHA-256 digests and compared in constant time; no token is ever logged. A refused call is
answered without reading its request message (the refusal is a request-streaming handler that never reads), and
is counted under its method's name only if the service has that method (`metrics.method_label`). Health stays
open for probes, but token-free `Health.Watch` streams are capped (`limits.max_health_watches`). A token's line
names the methods it may call, by method name, from either service: embserve.v1's (`Lookup`, `GetModelMetadata`)
and the Open Inference Protocol's (`ModelInfer`, `ModelMetadata`, `ServerMetadata`), or `*` for all the read
methods. The names are distinct across the two services, and a token gets what it names (`Lookup` also allows
`LookupStream`, the same lookups over a stream; it does not imply `ModelInfer`). `UpdateRows` writes: `*` does not
include it, and a token that names it gets only what it names, so a writer's token does not read and a reader's
does not write. The probes need no token: the health service, and OIP's `ServerLive`, `ServerReady`, `ModelReady`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from embserve.oip import wire as oip
from embserve.v1.wire import METHODS, method_path

from .config import ServerConfig, TlsConfig
from .decode import ECHO_CHARS
from .metrics import ServerMetrics, method_label

__all__ = ["AuthInterceptor", "WatchLimitedHealth", "load_tokens", "peer_guards", "server_credentials"]

logger = logging.getLogger(__name__)

SERVICE_PREFIXES = (method_path(""), oip.method_path(""))
OPEN_METHODS = frozenset(oip.method_path(m) for m in ("ServerLive", "ServerReady", "ModelReady"))
ALL_METHODS = frozenset(METHODS) | frozenset(oip.METHODS)
WRITE_METHODS = frozenset({"UpdateRows"})
READ_METHODS = ALL_METHODS - WRITE_METHODS
assert not set(METHODS) & set(oip.METHODS), "a token's method names must be unambiguous across the services"

Metadata = Sequence[tuple[str, str | bytes]]


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must authenticate with a certificate it signed."""
    key = Path(tls.key_file).read_bytes()
    chain = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> dict[str, frozenset[str]]:
    """Reads `<token> <methods>` lines into {sha256(token): allowed methods}; errors name the line, not the token."""
    tokens: dict[str, frozenset[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<token> <methods>'")
        methods = READ_METHODS if parts[1] == "*" else frozenset(parts[1].split(","))
        if "Lookup" in methods:
            methods |= {"LookupStream"}  # the same lookups, over a stream
        unknown = methods - ALL_METHODS
        if unknown:
            raise ValueError(f"{path}:{number}: unknown methods {sorted(unknown)}; known: {sorted(ALL_METHODS)}")
        tokens[_digest(parts[0])] = methods
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` without reading the request: grpc.aio receives a unary handler's message in
    full before calling it, but leaves a request-streaming handler's messages unread until it iterates them."""

    async def deny(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks `authorization: Bearer <token>` on the embserve and OIP services: a missing or unknown token is
    UNAUTHENTICATED, a token without the method PERMISSION_DENIED. Health, reflection and the OIP probes stay
    open."""

    def __init__(self, tokens: dict[str, frozenset[str]], metrics: ServerMetrics) -> None:
        self._tokens = tokens
        self._metrics = metrics

    def _allowed(self, presented: str) -> frozenset[str] | None:
        digest = _digest(presented)
        for known, methods in self._tokens.items():
            if hmac.compare_digest(known, digest):
                return methods
        return None

    def authenticated(self, metadata: Metadata | None) -> bool:
        """Whether the call carries a valid token (for any method)."""
        header = _bearer(metadata)
        return header is not None and self._allowed(header) is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        prefix = next((p for p in SERVICE_PREFIXES if method.startswith(p)), None)
        if prefix is None or method in OPEN_METHODS:
            return await continuation(details)
        name = method[len(prefix) :]
        token = _bearer(details.invocation_metadata)
        if token is None:
            return self._refuse(name, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>'")
        allowed = self._allowed(token)
        if allowed is None:
            return self._refuse(name, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if name not in allowed:
            return self._refuse(name, grpc.StatusCode.PERMISSION_DENIED, f"token may not call {name[:ECHO_CHARS]}")
        return await continuation(details)

    def _refuse(self, name: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        self._metrics.requests.labels(method_label(name), code.name).inc()
        return _deny(code, message)


def _bearer(metadata: Metadata | None) -> str | None:
    header = next((v for k, v in metadata or () if k == "authorization"), None)
    if not isinstance(header, str) or not header.startswith("Bearer "):
        return None
    return header[len("Bearer ") :].strip()


class WatchLimitedHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, with at most `limit` `Health.Watch` streams open at once from callers
    without a valid token (each holds a stream and a task until the caller leaves); beyond it RESOURCE_EXHAUSTED.
    Callers with a valid token, and `Check`, are not limited."""

    def __init__(self, limit: int, metrics: ServerMetrics, auth: AuthInterceptor | None = None) -> None:
        super().__init__()
        self._limit = limit
        self._metrics = metrics
        self._auth = auth
        self._open = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self._auth is not None and self._auth.authenticated(context.invocation_metadata()):
            await super().Watch(request, context)
            return
        if self._open >= self._limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._open} health watches without a token are open, the limit (limits.max_health_watches)",
            )
        self._open += 1
        self._metrics.health_watches.set(self._open)
        try:
            await super().Watch(request, context)
        finally:
            self._open -= 1
            self._metrics.health_watches.set(self._open)


def peer_guards(
    config: ServerConfig, metrics: ServerMetrics
) -> tuple[WatchLimitedHealth, list[grpc.aio.ServerInterceptor]]:
    """The server's health servicer and its interceptors: bearer-token auth when `config.auth` is set."""
    auth = AuthInterceptor(load_tokens(config.auth.tokens_file), metrics) if config.auth else None
    return WatchLimitedHealth(config.limits.max_health_watches, metrics, auth), [auth] if auth else []
