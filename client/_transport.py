"""Channel set-up shared by the sync and async clients: target, service config (retries, load balancing),
message sizes, credentials and per-call metadata."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from embserve.v1.wire import SERVICE_NAME

__all__ = ["RetryPolicy", "TlsConfig", "build_target", "channel_options", "call_metadata", "credentials"]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retry policy (exponential backoff with jitter) for UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED
    (lookups are idempotent reads, so a call the server cancelled while shutting down is safe to resend).

    `max_attempts` counts the first try; gRPC caps it at 5.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(
                f"max_attempts must be 2..5 (gRPC's limit), got {self.max_attempts}; use retry=None to disable"
            )
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoffs and multiplier must be > 0")


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS settings: `root_certificates` (PEM) to trust, and a client key/certificate chain for mutual TLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name_override: str | None = None


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), port


def build_target(addresses: str | Sequence[str]) -> str:
    """One gRPC target for one or several `host:port` addresses.

    Several addresses become a static `ipv4:`/`ipv6:` list (host names resolved now) that `round_robin` spreads
    calls over. A single address, or a `dns:///...` target, is passed through unchanged.
    """
    if isinstance(addresses, str):
        return addresses
    addresses = list(addresses)
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    resolved: list[tuple[int, str]] = []
    for a in addresses:
        host, port = _host_port(a)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)[0][4][0])
        resolved.append((ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"))
    versions = {v for v, _ in resolved}
    if len(versions) > 1:
        raise ValueError("mixing IPv4 and IPv6 addresses in one client is not supported")
    return f"ipv{versions.pop()}:" + ",".join(a for _, a in resolved)


def channel_options(
    *, retry: RetryPolicy | None, max_message_bytes: int, server_name_override: str | None = None
) -> list[tuple[str, Any]]:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry is not None:
        config["methodConfig"] = [
            {
                # The unary methods only: the stream pool resends what a broken LookupStream left unanswered.
                "name": [{"service": SERVICE_NAME, "method": m} for m in ("Lookup", "GetModelMetadata")],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s:.6f}s",
                    "maxBackoff": f"{retry.max_backoff_s:.6f}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": list(retry.retryable_codes),
                },
            }
        ]
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", -1),
    ]
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return options


def credentials(tls: TlsConfig | bool | None) -> grpc.ChannelCredentials | None:
    if not tls:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    return grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None
