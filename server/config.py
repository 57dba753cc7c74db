"""Server configuration: one typed object, loaded from YAML and overridden by command-line flags.

Unknown keys are errors (`extra="forbid"`), as in the model config. Defaults are the module constants below.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pydantic
import yaml

from embserve.embeddings.config import Engine, ShardingType
from embserve.v1.wire import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "AuthConfig",
    "BatchPolicy",
    "BatchingConfig",
    "ConnectionsConfig",
    "LimitsConfig",
    "EventLoop",
    "LogFormat",
    "ServerConfig",
    "TlsConfig",
    "load_server_config",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_QUEUE_DELAY_US = 1000
DEFAULT_MAX_QUEUE_SIZE = 32768
DEFAULT_MAX_QUEUE_WAIT_MS = 200.0
DEFAULT_MAX_REQUEST_EXAMPLES = 16384
DEFAULT_MAX_REQUEST_IDS = 1_000_000
DEFAULT_MAX_STREAM_OUTSTANDING = 256
DEFAULT_GRACE_PERIOD_S = 10.0
DEFAULT_MAX_WORKER_RESTARTS_PER_MINUTE = 10
DEFAULT_MAX_HEALTH_WATCHES = 1000
DEFAULT_KEEPALIVE_TIME_MS = 60_000
DEFAULT_KEEPALIVE_TIMEOUT_MS = 20_000
DEFAULT_MAX_CONNECTION_IDLE_MS = 300_000
DEFAULT_MAX_CONNECTION_AGE_MS = 1_800_000
DEFAULT_MAX_CONNECTION_AGE_GRACE_MS = 60_000
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000
DEFAULT_MIN_PING_INTERVAL_MS = 60_000
DEFAULT_MAX_PING_STRIKES = 2
# Requests whose message is at least this many bytes are decoded on the decode threads, not the event loop.
DEFAULT_OFFLOAD_DECODE_BYTES = 1 << 20
DEFAULT_DECODE_THREADS = 2
DEFAULT_MAX_DECODE_QUEUE = 16


@enum.unique
class LogFormat(str, enum.Enum):
    JSON = "json"
    TEXT = "text"


@enum.unique
class EventLoop(str, enum.Enum):
    """The asyncio event loop the server runs on: uvloop (libuv; less CPU per call) or the standard library's."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@enum.unique
class BatchPolicy(str, enum.Enum):
    """When a batch is formed.

    EAGER: as soon as the executor has a free slot, with whatever is queued; requests gather by themselves while
    it is busy, and a lone request at low load never waits. WAIT: the first queued request waits up to
    `max_queue_delay_us` for the batch to fill (Triton's dynamic batcher), trading latency for larger batches.
    """

    EAGER = "eager"
    WAIT = "wait"


class BatchingConfig(_Strict):
    enabled: bool = True
    policy: BatchPolicy = BatchPolicy.EAGER
    max_batch_size: int = pydantic.Field(DEFAULT_MAX_BATCH_SIZE, gt=0)
    max_queue_delay_us: int = pydantic.Field(DEFAULT_MAX_QUEUE_DELAY_US, ge=0)
    max_queue_size: int = pydantic.Field(DEFAULT_MAX_QUEUE_SIZE, gt=0)
    # The queue budget: a call that waited longer than this for its batch is answered RESOURCE_EXHAUSTED unrun.
    max_queue_wait_ms: float = pydantic.Field(DEFAULT_MAX_QUEUE_WAIT_MS, gt=0)
    # Bytes the queue holds: each request's arrays plus the response it will produce. None: from the host's
    # memory (`admission.memory_default`).
    max_queue_bytes: int | None = pydantic.Field(None, ge=1 << 16)
    # Bytes one batch takes (the same count per request); a request larger than it runs alone. None: from the
    # host's memory.
    max_batch_bytes: int | None = pydantic.Field(None, ge=1 << 16)
    # None: 1 on CPU (the forward competes with the event loop for cores), 2 on CUDA (copy overlaps compute).
    max_inflight_batches: int | None = pydantic.Field(None, ge=1, le=8)


class LimitsConfig(_Strict):
    max_request_examples: int = pydantic.Field(DEFAULT_MAX_REQUEST_EXAMPLES, gt=0)
    max_request_ids: int = pydantic.Field(DEFAULT_MAX_REQUEST_IDS, gt=0)
    max_message_bytes: int = pydantic.Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    max_stream_outstanding: int = pydantic.Field(DEFAULT_MAX_STREAM_OUTSTANDING, ge=1)
    # Health.Watch streams open at once from callers without a valid token; beyond it RESOURCE_EXHAUSTED.
    max_health_watches: int = pydantic.Field(DEFAULT_MAX_HEALTH_WATCHES, ge=0)
    # The response one request may produce (batch_size x output_dim x dtype size); larger is INVALID_ARGUMENT.
    # None: from the host's memory.
    max_response_bytes: int | None = pydantic.Field(None, ge=1024)
    # Response bytes computed but not yet sent (a client that does not read holds them), over all connections
    # and on one connection; beyond either, new calls are refused RESOURCE_EXHAUSTED. None: from the host's memory.
    max_pending_response_bytes: int | None = pydantic.Field(None, ge=1 << 16)
    max_pending_response_bytes_per_connection: int | None = pydantic.Field(None, ge=1 << 16)
    # Request messages held by calls in progress: a call with a unary request reserves max_message_bytes before
    # its message is read and is refused RESOURCE_EXHAUSTED at once without room; a LookupStream message counts
    # its own size from read until queued. None: from the host's memory, at least max_message_bytes.
    max_receive_bytes: int | None = pydantic.Field(None, ge=1 << 16)
    # Requests of at least this many bytes are decoded on `decode_threads` threads, off the event loop; at most
    # `max_decode_queue` wait for them, beyond it RESOURCE_EXHAUSTED.
    offload_decode_bytes: int = pydantic.Field(DEFAULT_OFFLOAD_DECODE_BYTES, ge=0)
    decode_threads: int = pydantic.Field(DEFAULT_DECODE_THREADS, ge=1, le=64)
    max_decode_queue: int = pydantic.Field(DEFAULT_MAX_DECODE_QUEUE, ge=1)

    @pydantic.model_validator(mode="after")
    def _receive_holds_a_message(self) -> LimitsConfig:
        if self.max_receive_bytes is not None and self.max_receive_bytes < self.max_message_bytes:
            raise ValueError(
                f"limits.max_receive_bytes ({self.max_receive_bytes}) must be >= limits.max_message_bytes "
                f"({self.max_message_bytes}): every read reserves room for the largest message"
            )
        return self


class ConnectionsConfig(_Strict):
    """HTTP/2 connection bounds, passed to gRPC as server options (`connections.grpc_options`)."""

    keepalive_time_ms: int = pydantic.Field(DEFAULT_KEEPALIVE_TIME_MS, gt=0)
    keepalive_timeout_ms: int = pydantic.Field(DEFAULT_KEEPALIVE_TIMEOUT_MS, gt=0)
    max_connection_idle_ms: int = pydantic.Field(DEFAULT_MAX_CONNECTION_IDLE_MS, gt=0)
    max_connection_age_ms: int = pydantic.Field(DEFAULT_MAX_CONNECTION_AGE_MS, gt=0)
    max_connection_age_grace_ms: int = pydantic.Field(DEFAULT_MAX_CONNECTION_AGE_GRACE_MS, ge=0)
    max_concurrent_streams: int = pydantic.Field(DEFAULT_MAX_CONCURRENT_STREAMS, gt=0)
    # None: the open-file limit less a reserve for the process's own files (`connections.FD_RESERVE`).
    max_connections: int | None = pydantic.Field(None, gt=0)
    handshake_timeout_ms: int = pydantic.Field(DEFAULT_HANDSHAKE_TIMEOUT_MS, gt=0)
    min_ping_interval_ms: int = pydantic.Field(DEFAULT_MIN_PING_INTERVAL_MS, ge=0)
    max_ping_strikes: int = pydantic.Field(DEFAULT_MAX_PING_STRIKES, ge=0)


class TlsConfig(_Strict):
    """Server TLS: PEM certificate chain and key; with `client_ca_file`, clients must present a certificate
    signed by that CA (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class AuthConfig(_Strict):
    """Bearer-token auth. `tokens_file` lines are `<token> <methods>`, methods a comma list of RPC names
    (`Lookup`, `GetModelMetadata`) or `*`; `#` starts a comment. Health and reflection stay open for probes."""

    tokens_file: str


class ServerConfig(_Strict):
    """Everything `embserve serve` needs; see the README's configuration table."""

    model: str = "default"
    checkpoint: str | None = None
    seed: int = 0
    model_version: str | None = None
    engine: Engine = Engine.FUSED
    device: str = "cpu"
    shard_devices: int = pydantic.Field(1, ge=1)  # > 1: torchrec table sharding over that many devices
    sharding: ShardingType = ShardingType.TABLE_WISE
    host: str = DEFAULT_HOST
    port: int = pydantic.Field(DEFAULT_PORT, ge=0, le=65535)
    metrics_port: int | None = pydantic.Field(DEFAULT_METRICS_PORT, ge=0, le=65535)
    grace_period_s: float = pydantic.Field(DEFAULT_GRACE_PERIOD_S, ge=0)
    torch_threads: int | None = pydantic.Field(None, ge=1)
    workers: int = pydantic.Field(1, ge=1)  # server processes sharing the port and the weights
    # Worker deaths within a minute that the supervisor replaces; one more and it stops and exits non-zero.
    max_worker_restarts_per_minute: int = pydantic.Field(DEFAULT_MAX_WORKER_RESTARTS_PER_MINUTE, ge=0)
    log_level: str = "info"
    log_format: LogFormat = LogFormat.JSON
    event_loop: EventLoop = EventLoop.UVLOOP
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None

    @pydantic.field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {value!r}")
        return value.lower()

    @pydantic.field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and value != "cuda" and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @pydantic.model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServerConfig:
        if self.batching.max_queue_size < self.batching.max_batch_size:
            raise ValueError(
                f"batching.max_queue_size ({self.batching.max_queue_size}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size})"
            )
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> ServerConfig:
        """A copy with dotted keys (`batching.max_batch_size`) replaced."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            node[leaf] = value
        return ServerConfig.model_validate(data)


def load_server_config(path: str | Path | None) -> ServerConfig:
    """Reads a server YAML file (None: the defaults); errors name the offending key."""
    if path is None:
        return ServerConfig()
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    try:
        return ServerConfig.model_validate(data)
    except pydantic.ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {msgs}") from None
