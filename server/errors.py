"""The server's exceptions, and the one place they map to gRPC status codes.

    EmbserveError
    ├── InvalidRequest      INVALID_ARGUMENT   the request breaks the protocol or the model's limits
    ├── Overloaded          RESOURCE_EXHAUSTED the queue is full
    ├── DeadlineExpired     DEADLINE_EXCEEDED  the caller's deadline passed before its batch ran
    ├── ShuttingDown        UNAVAILABLE        the server is draining and takes no new calls
    └── BatchFailed         INTERNAL           the forward of the request's batch raised
"""

from __future__ import annotations

import grpc

__all__ = [
    "BatchFailed",
    "DeadlineExpired",
    "EmbserveError",
    "InvalidRequest",
    "Overloaded",
    "ShuttingDown",
    "status_code_of",
]


class EmbserveError(Exception):
    """Base of every error the server answers a call with."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidRequest(EmbserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(EmbserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(EmbserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ShuttingDown(EmbserveError):
    code = grpc.StatusCode.UNAVAILABLE


class BatchFailed(EmbserveError):
    code = grpc.StatusCode.INTERNAL


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The status a call ends with for `error`; anything not an `EmbserveError` is INTERNAL."""
    return error.code if isinstance(error, EmbserveError) else grpc.StatusCode.INTERNAL
