"""The server's settings table: each `ServerConfig` key with its command-line flag and help text.

The one definition that `embserve serve`'s flags, the flag-to-config overrides and the settings table of docs/server.md
all come from. Types, choices and defaults are read from `ServerConfig` itself, so none is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

import pydantic

from .admission import (
    BATCH_BYTES_DEFAULT,
    PENDING_BYTES_DEFAULT,
    PENDING_PER_CONNECTION_DEFAULT,
    QUEUE_BYTES_DEFAULT,
    RECEIVE_BYTES_DEFAULT,
    RESPONSE_BYTES_DEFAULT,
    describe_default,
)
from .config import ServerConfig
from .connections import FD_RESERVE

__all__ = ["SETTINGS", "Setting", "add_flags", "overrides_from", "settings_table"]

_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration key. `const`: the flag takes no value and sets the key to `const`."""

    key: str  # dotted ServerConfig key, e.g. "batching.max_batch_size"
    flag: str
    help: str
    const: Any = _UNSET

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "--model", "model config: a YAML path or a built-in name (default, twhin_local)"),
    Setting("checkpoint", "--checkpoint", "weights: a .safetensors or torch state-dict file; none: seeded init"),
    Setting("seed", "--seed", "init seed when there is no checkpoint"),
    Setting("model_version", "--model-version", "version string reported to clients; none: derived from the weights"),
    Setting("engine", "--engine", "fused: torchrec's quantized inference collection; eager: the plain module"),
    Setting("device", "--device", "cpu, cuda or cuda:N"),
    Setting("shard_devices", "--shard-devices", "above 1: split the tables over that many devices (int8/int4 tables)"),
    Setting("sharding", "--sharding", "how sharded tables are split"),
    Setting("host", "--host", "address to bind"),
    Setting("port", "--port", "gRPC port; 0 picks a free one"),
    Setting("metrics_port", "--metrics-port", "Prometheus /metrics port"),
    Setting("metrics_port", "--no-metrics", "no Prometheus endpoint", const=None),
    Setting("grace_period_s", "--grace-period", "seconds to drain on SIGTERM/SIGINT"),
    Setting("torch_threads", "--torch-threads", "torch intra-op threads; none: torch's default"),
    Setting("workers", "--workers", "server processes sharing the port and the weights"),
    Setting("max_worker_restarts_per_minute", "--max-worker-restarts", "worker deaths per minute the supervisor "
            "replaces; one more and it stops and exits 1"),
    Setting("log_level", "--log-level", "debug, info, warning or error"),
    Setting("log_format", "--log-format", "log line format on stderr"),
    Setting("event_loop", "--event-loop", "the event loop: uvloop spends less CPU per call than asyncio's own"),
    Setting("batching.enabled", "--no-batching", "one forward per request", const=False),
    Setting("batching.policy", "--batch-policy", "eager: batch whatever is queued when the executor is free; "
            "wait: wait up to max_queue_delay_us for a full batch"),
    Setting("batching.max_batch_size", "--max-batch-size", "examples per forward; a larger request runs alone"),
    Setting("batching.max_queue_delay_us", "--max-queue-delay-us", "wait policy: longest wait for a fuller batch, "
            "microseconds"),
    Setting("batching.max_queue_size", "--max-queue-size", "examples queued; beyond it RESOURCE_EXHAUSTED at once"),
    Setting("batching.max_queue_wait_ms", "--max-queue-wait-ms", "queue budget, milliseconds: a call that waited "
            "longer is answered RESOURCE_EXHAUSTED unrun"),
    Setting("batching.max_queue_bytes", "--max-queue-bytes", "bytes queued (each request's arrays plus its "
            f"response); beyond it RESOURCE_EXHAUSTED at once; none: {describe_default(QUEUE_BYTES_DEFAULT)}"),
    Setting("batching.max_batch_bytes", "--max-batch-bytes", "bytes one batch takes (its requests' arrays plus "
            f"responses); a larger request runs alone; none: {describe_default(BATCH_BYTES_DEFAULT)}"),
    Setting("batching.max_inflight_batches", "--max-inflight-batches", "batches assembled or computed at once; "
            "none: 1 on CPU, 2 on CUDA"),
    Setting("limits.max_request_examples", "--max-request-examples", "largest batch_size of one request"),
    Setting("limits.max_request_ids", "--max-request-ids", "most ids in one request"),
    Setting("limits.max_message_bytes", "--max-message-bytes", "largest request message received, bytes"),
    Setting("limits.max_stream_outstanding", "--max-stream-outstanding", "LookupStream messages in progress per "
            "stream; beyond it a message is answered RESOURCE_EXHAUSTED at once"),
    Setting("limits.max_health_watches", "--max-health-watches", "Health.Watch streams open at once without a "
            "valid token; beyond it RESOURCE_EXHAUSTED"),
    Setting("limits.max_response_bytes", "--max-response-bytes", "largest response of one request (batch_size x "
            f"output_dim x dtype size); beyond it INVALID_ARGUMENT; none: {describe_default(RESPONSE_BYTES_DEFAULT)}"),
    Setting("limits.max_pending_response_bytes", "--max-pending-response-bytes", "response bytes computed but "
            f"not yet sent, all connections; beyond it new calls RESOURCE_EXHAUSTED; none: "
            f"{describe_default(PENDING_BYTES_DEFAULT)}"),
    Setting("limits.max_pending_response_bytes_per_connection", "--max-pending-response-bytes-per-connection",
            f"the same on one connection; none: {describe_default(PENDING_PER_CONNECTION_DEFAULT)}"),
    Setting("limits.max_receive_bytes", "--max-receive-bytes", "request messages held by calls in progress; "
            "a call reserves max_message_bytes before its message is read, and without room is RESOURCE_EXHAUSTED "
            "at once; a LookupStream message counts its size until queued; none: "
            f"{describe_default(RECEIVE_BYTES_DEFAULT)}, at least max_message_bytes"),
    Setting("limits.offload_decode_bytes", "--offload-decode-bytes", "requests of at least this many bytes are "
            "decoded on the decode threads, off the event loop"),
    Setting("limits.decode_threads", "--decode-threads", "threads decoding large requests"),
    Setting("limits.max_decode_queue", "--max-decode-queue", "large requests decoding or waiting to; beyond it "
            "RESOURCE_EXHAUSTED at once"),
    Setting("connections.keepalive_time_ms", "--keepalive-time-ms", "server ping on a connection quiet this long, "
            "milliseconds"),
    Setting("connections.keepalive_timeout_ms", "--keepalive-timeout-ms", "close a connection whose ping is "
            "unanswered this long, milliseconds"),
    Setting("connections.max_connection_idle_ms", "--max-connection-idle-ms", "close a connection with no call "
            "for this long, milliseconds"),
    Setting("connections.max_connection_age_ms", "--max-connection-age-ms", "ask clients to reconnect after this "
            "long, milliseconds"),
    Setting("connections.max_connection_age_grace_ms", "--max-connection-age-grace-ms", "time calls get to finish "
            "on a connection past its age, milliseconds"),
    Setting("connections.max_concurrent_streams", "--max-concurrent-streams", "calls open at once on one "
            "connection; keep it above any one client channel's concurrency (a burst past it can be refused)"),
    Setting("connections.max_connections", "--max-connections", "open connections; more are closed at once; "
            f"none: the open-file limit less {FD_RESERVE}"),
    Setting("connections.handshake_timeout_ms", "--handshake-timeout-ms", "close a connection that has not "
            "finished its TLS/HTTP/2 set-up in this long, milliseconds"),
    Setting("connections.min_ping_interval_ms", "--min-ping-interval-ms", "client pings closer than this without "
            "data are strikes, milliseconds"),
    Setting("connections.max_ping_strikes", "--max-ping-strikes", "strikes before the connection is closed "
            "(GOAWAY); 0: no limit"),
    Setting("tls.cert_file", "--tls-cert", "PEM certificate chain: serve TLS"),
    Setting("tls.key_file", "--tls-key", "PEM private key for --tls-cert"),
    Setting("tls.client_ca_file", "--tls-client-ca", "PEM CA: require client certificates it signed (mutual TLS)"),
    Setting("auth.tokens_file", "--auth-tokens-file", "bearer tokens file: lines '<token> <methods or *>'"),
)


def _field(key: str) -> pydantic.fields.FieldInfo:
    model: type[pydantic.BaseModel] = ServerConfig
    *parents, leaf = key.split(".")
    for p in parents:
        model = _model_of(model.model_fields[p].annotation)
    return model.model_fields[leaf]


def _model_of(annotation: Any) -> type[pydantic.BaseModel]:
    for t in typing.get_args(annotation) or (annotation,):
        if isinstance(t, type) and issubclass(t, pydantic.BaseModel):
            return t
    raise TypeError(f"{annotation} is not a config section")


def _value_type(annotation: Any) -> Any:
    """`int | None` -> int; the flag's value type."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def default_of(key: str) -> Any:
    """The default of a config key; `_UNSET` for keys of optional sections (tls, auth) that have none."""
    field = _field(key)
    return _UNSET if field.is_required() else field.get_default(call_default_factory=True)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds every setting's flag; defaults are left None so that unset flags do not override the YAML file."""
    for s in SETTINGS:
        if s.const is not _UNSET:
            parser.add_argument(s.flag, dest=s.dest, action="store_true", help=s.help)
            continue
        kind = _value_type(_field(s.key).annotation)
        default = default_of(s.key)
        shown = "" if default is _UNSET else f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = {"dest": s.dest, "help": s.help + shown, "metavar": s.key.rsplit(".", 1)[-1].upper()}
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs.update(choices=[e.value for e in kind], metavar=None)
        elif kind in (int, float):
            kwargs["type"] = kind
        parser.add_argument(s.flag, **kwargs)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys the given flags set (flags left out are absent)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value = getattr(args, s.dest, None)
        if s.const is not _UNSET:
            if value:
                out[s.key] = s.const
        elif value is not None:
            out[s.key] = value
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def settings_table() -> str:
    """The settings table of docs/server.md (Markdown), one row per flag."""
    rows = ["| config key | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        d = default_of(s.key)
        default = "" if d is _UNSET or (s.const is not _UNSET and s.const is None) else f"`{_shown(d)}`"
        rows.append(f"| `{s.key}` | `{s.flag}` | {default} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m embserve.server.flags: the settings table of docs/server.md
    print(settings_table())
