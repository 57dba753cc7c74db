"""Connection bounds: the gRPC server options made from `ConnectionsConfig`, and the open-file limit.

A connection costs the server a file descriptor and HTTP/2 state whether or not it ever makes a call. These
options close connections that never finish their set-up, sit idle or grow old, cap the calls open on one
connection, and refuse connections beyond `max_connections` at once, below the process's open-file limit, so that
a flood of idle connections cannot exhaust the descriptors the calls of established clients need.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from .config import FD_RESERVE, ConnectionsConfig

__all__ = ["FD_RESERVE", "grpc_options", "max_connections", "raise_fd_limit"]

logger = logging.getLogger(__name__)

# Soft limit used when the hard limit is unlimited (the kernel refuses RLIM_INFINITY for RLIMIT_NOFILE).
_NOFILE_CEILING = 1 << 20


def raise_fd_limit() -> int:
    """Raises the soft open-file limit to the hard limit where the OS allows; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            logger.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(err)})
    return soft


def max_connections(config: ConnectionsConfig) -> int:
    """The configured connection cap, or by default the current open-file limit less `FD_RESERVE` (at least 1)."""
    if config.max_connections is not None:
        return config.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = _NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft
    return max(1, limit - FD_RESERVE)


def grpc_options(config: ConnectionsConfig) -> list[tuple[str, Any]]:
    """gRPC core server options (channel args) for the connection bounds."""
    return [
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.max_connection_idle_ms", config.max_connection_idle_ms),
        ("grpc.max_connection_age_ms", config.max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_ms),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", max_connections(config)),
        ("grpc.server_handshake_timeout_ms", config.handshake_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", config.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
    ]
