"""The server's exceptions, and the one place they map to gRPC status codes.

    EmbserveError
    ├── InvalidRequest      INVALID_ARGUMENT   the request breaks the protocol or the model's limits
    ├── Overloaded          RESOURCE_EXHAUSTED the queue is full
    ├── DeadlineExpired     DEADLINE_EXCEEDED  the caller's deadline passed before its batch ran
    ├── ShuttingDown        UNAVAILABLE        the server is draining and takes no new calls
    ├── UnknownModel        NOT_FOUND          an Open Inference Protocol call names another model or version
    ├── BatchFailed         INTERNAL           the forward of the request's batch raised
    ├── CallGone            CANCELLED          the caller went away before its answer could be sent (nothing is
    │                                          sent back: counted only)
    ├── ShardUnavailable    UNAVAILABLE        a router's shard is down or unreachable (the message names it)
    ├── ShardMismatch       FAILED_PRECONDITION a router's shard serves another plan, or answers another layout
    └── ShardFailed         the shard's code   a router's shard refused or failed its part of the request

The Open Inference Protocol answers with the codes Triton uses for the same conditions (`oip_status_code_of`):
the same, except that a full queue is UNAVAILABLE, as Triton's "Exceeds maximum queue size" is.
"""

from __future__ import annotations

import grpc

__all__ = [
    "BatchFailed",
    "CallGone",
    "DeadlineExpired",
    "EmbserveError",
    "InvalidRequest",
    "Overloaded",
    "ShardFailed",
    "ShardMismatch",
    "ShardUnavailable",
    "ShuttingDown",
    "UnknownModel",
    "oip_status_code_of",
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


class UnknownModel(EmbserveError):
    code = grpc.StatusCode.NOT_FOUND


class BatchFailed(EmbserveError):
    code = grpc.StatusCode.INTERNAL


class CallGone(EmbserveError):
    code = grpc.StatusCode.CANCELLED


class ShardUnavailable(EmbserveError):
    code = grpc.StatusCode.UNAVAILABLE


class ShardMismatch(EmbserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ShardFailed(EmbserveError):
    """A shard's own refusal or failure, passed on with its status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The status a call ends with for `error`; anything not an `EmbserveError` is INTERNAL."""
    return error.code if isinstance(error, EmbserveError) else grpc.StatusCode.INTERNAL


def oip_status_code_of(error: BaseException) -> grpc.StatusCode:
    """The status an Open Inference Protocol call ends with for `error`: Triton's code for the condition."""
    return grpc.StatusCode.UNAVAILABLE if isinstance(error, Overloaded) else status_code_of(error)
