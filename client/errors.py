"""The client's exceptions; a raw `grpc.RpcError` never reaches callers.

EmbserveError                 .code (gRPC status name or "CLIENT"), .details (the server's message)
├── InvalidRequest            INVALID_ARGUMENT, or rejected client-side before sending
├── Overloaded                RESOURCE_EXHAUSTED (retried first, when retries are on)
├── DeadlineExceeded          DEADLINE_EXCEEDED
├── Unavailable               UNAVAILABLE (retried first, when retries are on)
│   └── Cancelled             CANCELLED: the server cancelled the call unanswered, as it does to calls that
│                             arrive while it shuts down (the SDK never cancels on its own; retried too)
├── Unauthenticated           UNAUTHENTICATED
├── PermissionDenied          PERMISSION_DENIED
└── ServerError               INTERNAL, UNKNOWN and every other status
"""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "EmbserveError",
    "InvalidRequest",
    "Overloaded",
    "PermissionDenied",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "from_status",
]


class EmbserveError(Exception):
    """Base of every error the SDK raises."""

    def __init__(self, details: str, code: str = "CLIENT") -> None:
        super().__init__(f"{code}: {details}" if code != "CLIENT" else details)
        self.code = code
        self.details = details


class InvalidRequest(EmbserveError, ValueError):
    pass


class Overloaded(EmbserveError):
    pass


class DeadlineExceeded(EmbserveError, TimeoutError):
    pass


class Unavailable(EmbserveError, ConnectionError):
    pass


class Unauthenticated(EmbserveError):
    pass


class PermissionDenied(EmbserveError):
    pass


class Cancelled(Unavailable):
    pass


class ServerError(EmbserveError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[EmbserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_status(code: int, details: str) -> EmbserveError:
    """The SDK exception for a LookupStream message answered with status `code` (a gRPC status number)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(status, ServerError)(details, status.name)


def from_rpc_error(err: grpc.RpcError) -> EmbserveError:
    """The SDK exception for a failed call, carrying the server's status and message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _BY_CODE.get(code, ServerError)(details, code.name)
