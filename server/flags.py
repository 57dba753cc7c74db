"""The server's settings table: each `ServerConfig` key with its command-line flag.

The one definition that `embserve serve`'s flags, the flag-to-config overrides and the settings table of docs/server.md
all come from. Help texts, types, choices and defaults are read from `ServerConfig` itself (each field's
`description`), so none is written twice; a flag that sets a key to a constant (`--no-metrics`) has its own help.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

import pydantic

from .config import ServerConfig

__all__ = ["SETTINGS", "Setting", "add_flags", "overrides_from", "settings_table"]

_UNSET = object()
# What only a server that computes takes: the router (`embserve route`) reads the model config and the plan only.
_SERVE_ONLY = frozenset(
    {
        "checkpoint",
        "seed",
        "model_version",
        "engine",
        "device",
        "shard_devices",
        "sharding",
        "storage",
        "cache_load_factor",
        "shard",
        "torch_threads",
        "workers",
        "max_worker_restarts_per_minute",
    }
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration key and its flag. `const`: the flag takes no value and sets the key to `const`, and
    `const_help` says what that means."""

    key: str  # dotted ServerConfig key, e.g. "batching.max_batch_size"
    flag: str
    const: Any = _UNSET
    const_help: str = ""

    @property
    def command(self) -> str:
        """Which command takes the flag: `serve`, `route` (the router's own settings) or `both`."""
        if self.key.startswith("router."):
            return "route"
        if self.key.split(".")[0] in _SERVE_ONLY or self.key.startswith("batching."):
            return "serve"
        return "both"

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def help(self) -> str:
        if self.const is not _UNSET:
            return self.const_help
        return _field(self.key).description or ""


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "--model"),
    Setting("checkpoint", "--checkpoint"),
    Setting("seed", "--seed"),
    Setting("model_version", "--model-version"),
    Setting("engine", "--engine"),
    Setting("device", "--device"),
    Setting("shard_devices", "--shard-devices"),
    Setting("sharding", "--sharding"),
    Setting("storage", "--storage"),
    Setting("cache_load_factor", "--cache-load-factor"),
    Setting("plan", "--plan"),
    Setting("shard", "--shard"),
    Setting("host", "--host"),
    Setting("port", "--port"),
    Setting("metrics_port", "--metrics-port"),
    Setting("metrics_port", "--no-metrics", const=None, const_help="no Prometheus endpoint"),
    Setting("grace_period_s", "--grace-period"),
    Setting("torch_threads", "--torch-threads"),
    Setting("workers", "--workers"),
    Setting("max_worker_restarts_per_minute", "--max-worker-restarts"),
    Setting("log_level", "--log-level"),
    Setting("log_format", "--log-format"),
    Setting("event_loop", "--event-loop"),
    Setting("batching.enabled", "--no-batching", const=False, const_help="one forward per request"),
    Setting("batching.policy", "--batch-policy"),
    Setting("batching.max_batch_size", "--max-batch-size"),
    Setting("batching.max_queue_delay_us", "--max-queue-delay-us"),
    Setting("batching.latency_budget_ms", "--batch-latency-budget-ms"),
    Setting("batching.max_queue_size", "--max-queue-size"),
    Setting("batching.max_queue_wait_ms", "--max-queue-wait-ms"),
    Setting("batching.max_queue_bytes", "--max-queue-bytes"),
    Setting("batching.max_batch_bytes", "--max-batch-bytes"),
    Setting("batching.max_inflight_batches", "--max-inflight-batches"),
    Setting("updates.enabled", "--updates", const=True, const_help="accept row updates (UpdateRows)"),
    Setting("updates.log_dir", "--updates-dir"),
    Setting("updates.fsync", "--no-updates-fsync", const=False, const_help="answer updates before the log is fsynced"),
    Setting("updates.max_rows_per_message", "--max-update-rows"),
    Setting("updates.max_streams", "--max-update-streams"),
    Setting("updates.poll_interval_ms", "--updates-poll-ms"),
    Setting("updates.max_log_bytes", "--max-update-log-bytes"),
    Setting("updates.compact_after_bytes", "--compact-after-bytes"),
    Setting("updates.nice", "--updates-nice"),
    Setting("limits.max_request_examples", "--max-request-examples"),
    Setting("limits.max_request_ids", "--max-request-ids"),
    Setting("limits.max_message_bytes", "--max-message-bytes"),
    Setting("limits.max_stream_outstanding", "--max-stream-outstanding"),
    Setting("limits.max_health_watches", "--max-health-watches"),
    Setting("limits.max_response_bytes", "--max-response-bytes"),
    Setting("limits.max_pending_response_bytes", "--max-pending-response-bytes"),
    Setting("limits.max_pending_response_bytes_per_connection", "--max-pending-response-bytes-per-connection"),
    Setting("limits.max_receive_bytes", "--max-receive-bytes"),
    Setting("limits.offload_decode_bytes", "--offload-decode-bytes"),
    Setting("limits.decode_threads", "--decode-threads"),
    Setting("limits.max_decode_queue", "--max-decode-queue"),
    Setting("connections.keepalive_time_ms", "--keepalive-time-ms"),
    Setting("connections.keepalive_timeout_ms", "--keepalive-timeout-ms"),
    Setting("connections.max_connection_idle_ms", "--max-connection-idle-ms"),
    Setting("connections.max_connection_age_ms", "--max-connection-age-ms"),
    Setting("connections.max_connection_age_grace_ms", "--max-connection-age-grace-ms"),
    Setting("connections.max_concurrent_streams", "--max-concurrent-streams"),
    Setting("connections.max_connections", "--max-connections"),
    Setting("connections.handshake_timeout_ms", "--handshake-timeout-ms"),
    Setting("connections.min_ping_interval_ms", "--min-ping-interval-ms"),
    Setting("connections.max_ping_strikes", "--max-ping-strikes"),
    Setting("connections.unused_connection_grace_ms", "--unused-connection-grace-ms"),
    Setting("tls.cert_file", "--tls-cert"),
    Setting("tls.key_file", "--tls-key"),
    Setting("tls.client_ca_file", "--tls-client-ca"),
    Setting("auth.tokens_file", "--auth-tokens-file"),
    Setting("router.shards", "--shard-address"),
    Setting("router.shard_deadline_ms", "--shard-deadline-ms"),
    Setting("router.max_routed_requests", "--max-routed-requests"),
    Setting("router.plan_check_interval_ms", "--plan-check-interval-ms"),
    Setting("router.shard_token_file", "--shard-token-file"),
    Setting("router.shard_tls_ca", "--shard-tls-ca"),
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


def add_flags(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """Adds the flags of `command`'s settings (`serve` or `route`); defaults are left None so that unset flags do
    not override the YAML file."""
    for s in SETTINGS:
        if s.command not in (command, "both"):
            continue
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
        elif typing.get_origin(kind) is list:
            kwargs["action"] = "append"
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
