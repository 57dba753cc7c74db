"""Transport security and auth: TLS / mutual-TLS credentials, and a bearer-token interceptor.

Tokens are kept only as SHA-256 digests and compared in constant time; no token is ever logged. A token's line
names the methods it may call, by method name, from either service: embserve.v1's (`Lookup`, `GetModelMetadata`)
and the Open Inference Protocol's (`ModelInfer`, `ModelMetadata`, `ServerMetadata`), or `*` for all of them. The
names are distinct across the two services, and a token gets exactly what it names: `Lookup` does not imply
`ModelInfer`. The probes need no token: the health service, and OIP's `ServerLive`, `ServerReady`, `ModelReady`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from embserve.oip import wire as oip
from embserve.v1.wire import METHODS, method_path

from .config import TlsConfig
from .metrics import ServerMetrics

__all__ = ["AuthInterceptor", "load_tokens", "server_credentials"]

logger = logging.getLogger(__name__)

SERVICE_PREFIXES = (method_path(""), oip.method_path(""))
OPEN_METHODS = frozenset(oip.method_path(m) for m in ("ServerLive", "ServerReady", "ModelReady"))
ALL_METHODS = frozenset(METHODS) | frozenset(oip.METHODS)
assert not set(METHODS) & set(oip.METHODS), "a token's method names must be unambiguous across the services"


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
        methods = ALL_METHODS if parts[1] == "*" else frozenset(parts[1].split(","))
        unknown = methods - ALL_METHODS
        if unknown:
            raise ValueError(f"{path}:{number}: unknown methods {sorted(unknown)}; known: {sorted(ALL_METHODS)}")
        tokens[_digest(parts[0])] = methods
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)


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
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return self._refuse(name, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>'")
        allowed = self._allowed(header[len("Bearer ") :].strip())
        if allowed is None:
            return self._refuse(name, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if name not in allowed:
            return self._refuse(name, grpc.StatusCode.PERMISSION_DENIED, f"token may not call {name}")
        return await continuation(details)

    def _refuse(self, name: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        self._metrics.requests.labels(name, code.name).inc()
        return _deny(code, message)
