"""Server configuration: one typed object, loaded from YAML and overridden by command-line flags.

Unknown keys are errors (`extra="forbid"`), as in the model config. Defaults are the module constants below. Each
field's `description` is its help text: `embserve serve --help` and the settings table of docs/server.md read it
(`flags`). Torch-free.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pydantic
import yaml

from embserve.embeddings.config import Engine, ShardingType, Storage
from embserve.v1.wire import DEFAULT_MAX_MESSAGE_BYTES

from .memory_defaults import (
    BATCH_BYTES_DEFAULT,
    PENDING_BYTES_DEFAULT,
    PENDING_PER_CONNECTION_DEFAULT,
    QUEUE_BYTES_DEFAULT,
    RECEIVE_BYTES_DEFAULT,
    RESPONSE_BYTES_DEFAULT,
)

__all__ = [
    "AuthConfig",
    "BatchPolicy",
    "BatchingConfig",
    "ConnectionsConfig",
    "LimitsConfig",
    "EventLoop",
    "LogFormat",
    "RouterConfig",
    "ServerConfig",
    "TlsConfig",
    "UpdatesConfig",
    "load_server_config",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_QUEUE_DELAY_US = 1000
DEFAULT_LATENCY_BUDGET_MS = 2.0
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
DEFAULT_UNUSED_CONNECTION_GRACE_MS = 10_000
# Descriptors kept for the process itself (model and log files, metrics endpoint, pipes, torch, the listener).
FD_RESERVE = 256
DEFAULT_CACHE_LOAD_FACTOR = 0.2
DEFAULT_OFFLOAD_DECODE_BYTES = 1 << 20
DEFAULT_DECODE_THREADS = 2
DEFAULT_MAX_DECODE_QUEUE = 16
DEFAULT_MAX_UPDATE_ROWS = 65_536
DEFAULT_MAX_UPDATE_STREAMS = 8
DEFAULT_UPDATES_POLL_MS = 10.0
DEFAULT_UPDATES_NICE = 10
DEFAULT_MAX_LOG_BYTES = 8 << 30


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
    BUDGET: a free slot waits for company only while no queued request has used up its latency budget
    (`latency_budget_ms`, or a quarter of its remaining deadline when that is shorter): fewer, larger batches,
    so less CPU per request, with every request's wait bounded by its own budget.
    """

    EAGER = "eager"
    WAIT = "wait"
    BUDGET = "budget"


def _field(default: Any, description: str, **bounds: Any) -> Any:
    return pydantic.Field(default, description=description, **bounds)


class BatchingConfig(_Strict):
    enabled: bool = _field(True, "batch concurrent requests (off: one forward per request)")
    policy: BatchPolicy = _field(
        BatchPolicy.EAGER,
        "eager: batch whatever is queued when the executor is free; wait: wait up to max_queue_delay_us for a "
        "full batch; budget: wait for company while no queued request is past its latency budget",
    )
    max_batch_size: int = _field(DEFAULT_MAX_BATCH_SIZE, "examples per forward; a larger request runs alone", gt=0)
    max_queue_delay_us: int = _field(
        DEFAULT_MAX_QUEUE_DELAY_US, "wait policy: longest wait for a fuller batch, microseconds", ge=0
    )
    latency_budget_ms: float = _field(
        DEFAULT_LATENCY_BUDGET_MS,
        "budget policy: longest a request waits for a fuller batch, milliseconds (a quarter of its remaining "
        "deadline when that is shorter)",
        gt=0,
    )
    max_queue_size: int = _field(DEFAULT_MAX_QUEUE_SIZE, "examples queued; beyond it RESOURCE_EXHAUSTED at once", gt=0)
    max_queue_wait_ms: float = _field(
        DEFAULT_MAX_QUEUE_WAIT_MS,
        "queue budget, milliseconds: a call that waited longer is answered RESOURCE_EXHAUSTED unrun",
        gt=0,
    )
    max_queue_bytes: int | None = _field(
        None,
        "bytes queued (each request's arrays plus its response); beyond it RESOURCE_EXHAUSTED at once; none: "
        f"{QUEUE_BYTES_DEFAULT}",
        ge=1 << 16,
    )
    max_batch_bytes: int | None = _field(
        None,
        "bytes one batch takes (its requests' arrays plus responses); a larger request runs alone; none: "
        f"{BATCH_BYTES_DEFAULT}",
        ge=1 << 16,
    )
    max_inflight_batches: int | None = _field(
        None, "batches assembled or computed at once; none: 1 on CPU, 2 on CUDA", ge=1, le=8
    )


class LimitsConfig(_Strict):
    max_request_examples: int = _field(DEFAULT_MAX_REQUEST_EXAMPLES, "largest batch_size of one request", gt=0)
    max_request_ids: int = _field(DEFAULT_MAX_REQUEST_IDS, "most ids in one request", gt=0)
    max_message_bytes: int = _field(DEFAULT_MAX_MESSAGE_BYTES, "largest request message received, bytes", ge=1024)
    max_stream_outstanding: int = _field(
        DEFAULT_MAX_STREAM_OUTSTANDING,
        "LookupStream messages in progress per stream; beyond it a message is answered RESOURCE_EXHAUSTED at once",
        ge=1,
    )
    max_health_watches: int = _field(
        DEFAULT_MAX_HEALTH_WATCHES,
        "Health.Watch streams open at once without a valid token; beyond it RESOURCE_EXHAUSTED",
        ge=0,
    )
    max_response_bytes: int | None = _field(
        None,
        "largest response of one request (batch_size x output_dim x dtype size); beyond it INVALID_ARGUMENT; "
        f"none: {RESPONSE_BYTES_DEFAULT}",
        ge=1024,
    )
    max_pending_response_bytes: int | None = _field(
        None,
        "answers computed and not yet taken by their clients, all connections; at it, new calls are "
        f"RESOURCE_EXHAUSTED; none: {PENDING_BYTES_DEFAULT}",
        ge=1 << 16,
    )
    max_pending_response_bytes_per_connection: int | None = _field(
        None,
        "the same on one connection; at it, the connection's new calls and stream messages wait until its client "
        f"reads (flow control); none: {PENDING_PER_CONNECTION_DEFAULT}",
        ge=1 << 16,
    )
    max_receive_bytes: int | None = _field(
        None,
        "request messages read and not yet queued (or refused); beyond it RESOURCE_EXHAUSTED at once; none: "
        f"{RECEIVE_BYTES_DEFAULT}",
        ge=1 << 16,
    )
    offload_decode_bytes: int = _field(
        DEFAULT_OFFLOAD_DECODE_BYTES,
        "requests of at least this many bytes are decoded on the decode threads, off the event loop",
        ge=0,
    )
    decode_threads: int = _field(DEFAULT_DECODE_THREADS, "threads decoding large requests", ge=1, le=64)
    max_decode_queue: int = _field(
        DEFAULT_MAX_DECODE_QUEUE, "large requests decoding or waiting to; beyond it RESOURCE_EXHAUSTED at once", ge=1
    )


class ConnectionsConfig(_Strict):
    """HTTP/2 connection bounds, passed to gRPC as server options (`connections.grpc_options`)."""

    keepalive_time_ms: int = _field(
        DEFAULT_KEEPALIVE_TIME_MS, "server ping on a connection quiet this long, milliseconds", gt=0
    )
    keepalive_timeout_ms: int = _field(
        DEFAULT_KEEPALIVE_TIMEOUT_MS, "close a connection whose ping is unanswered this long, milliseconds", gt=0
    )
    max_connection_idle_ms: int = _field(
        DEFAULT_MAX_CONNECTION_IDLE_MS, "close a connection with no call for this long, milliseconds", gt=0
    )
    max_connection_age_ms: int = _field(
        DEFAULT_MAX_CONNECTION_AGE_MS, "ask clients to reconnect after this long, milliseconds", gt=0
    )
    max_connection_age_grace_ms: int = _field(
        DEFAULT_MAX_CONNECTION_AGE_GRACE_MS,
        "time calls get to finish on a connection past its age, milliseconds",
        ge=0,
    )
    max_concurrent_streams: int = _field(
        DEFAULT_MAX_CONCURRENT_STREAMS,
        "calls open at once on one connection; keep it above any one client channel's concurrency (a burst past "
        "it can be refused)",
        gt=0,
    )
    max_connections: int | None = _field(
        None, f"open connections; more are closed at once; none: the open-file limit less {FD_RESERVE}", gt=0
    )
    handshake_timeout_ms: int = _field(
        DEFAULT_HANDSHAKE_TIMEOUT_MS,
        "close a connection that has not finished its TLS/HTTP/2 set-up in this long, milliseconds",
        gt=0,
    )
    min_ping_interval_ms: int = _field(
        DEFAULT_MIN_PING_INTERVAL_MS, "client pings closer than this without data are strikes, milliseconds", ge=0
    )
    max_ping_strikes: int = _field(
        DEFAULT_MAX_PING_STRIKES, "strikes before the connection is closed (GOAWAY); 0: no limit", ge=0
    )
    unused_connection_grace_ms: int = _field(
        DEFAULT_UNUSED_CONNECTION_GRACE_MS,
        "near max_connections, connections that made no call for this long are closed, oldest first, so that new "
        "callers get in; 0: never, milliseconds",
        ge=0,
    )


class TlsConfig(_Strict):
    """Server TLS: PEM certificate chain and key; with `client_ca_file`, clients must present a certificate
    signed by that CA (mutual TLS)."""

    cert_file: str = pydantic.Field(description="PEM certificate chain: serve TLS")
    key_file: str = pydantic.Field(description="PEM private key for --tls-cert")
    client_ca_file: str | None = _field(None, "PEM CA: require client certificates it signed (mutual TLS)")


DEFAULT_SHARD_DEADLINE_MS = 5000.0
DEFAULT_MAX_ROUTED_REQUESTS = 4096
DEFAULT_PLAN_CHECK_INTERVAL_MS = 5000.0


class RouterConfig(_Strict):
    """`embserve route`: the shard servers of a sharding plan, and how the router calls them."""

    shards: list[str] = _field(
        [], "shard addresses K=HOST:PORT, one per flag; several for one shard are replicas, used round-robin"
    )
    shard_deadline_ms: float = _field(
        DEFAULT_SHARD_DEADLINE_MS, "deadline of the shard calls of a request whose caller set none, ms", gt=0
    )
    max_routed_requests: int = _field(
        DEFAULT_MAX_ROUTED_REQUESTS, "requests waiting on shards at once; beyond it RESOURCE_EXHAUSTED at once", gt=0
    )
    plan_check_interval_ms: float = _field(
        DEFAULT_PLAN_CHECK_INTERVAL_MS,
        "how often each shard's plan digest is read again (and after any call to it fails), ms",
        gt=0,
    )
    shard_token_file: str | None = _field(
        None, "file holding the bearer token sent to the shards; none: each caller's own token is passed on"
    )
    shard_tls_ca: str | None = _field(None, "PEM CA: call the shards over TLS, checking them against it")

    @pydantic.field_validator("shards")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            index, sep, address = entry.partition("=")
            if not sep or not index.strip().isdigit() or ":" not in address:
                raise ValueError(f"shard address {entry!r} must be K=HOST:PORT, e.g. 0=10.0.0.5:50051")
        return value

    def addresses(self) -> dict[int, list[str]]:
        """The addresses of each shard index, in the order given."""
        out: dict[int, list[str]] = {}
        for entry in self.shards:
            index, _, address = entry.partition("=")
            out.setdefault(int(index), []).append(address.strip())
        return out


class AuthConfig(_Strict):
    """Bearer-token auth. `tokens_file` lines are `<token> <methods>`, methods a comma list of RPC names
    (`Lookup`, `GetModelMetadata`) or `*`; `#` starts a comment. Health and reflection stay open for probes."""

    tokens_file: str = pydantic.Field(description="bearer tokens file: lines '<token> <methods or *>'")


class UpdatesConfig(_Strict):
    """Row updates while serving (`UpdateRows`): off by default, so that a replica is read-only unless asked."""

    enabled: bool = _field(False, "accept row updates (UpdateRows); off: a read-only server refuses them")
    log_dir: str | None = _field(None, "where the delta logs live; none: '<checkpoint>.updates' next to the checkpoint")
    fsync: bool = _field(
        True,
        "fsync the delta log before an update is answered; off: a crash of the host (not of the process) can lose "
        "the updates answered in the last seconds",
    )
    max_rows_per_message: int = _field(
        DEFAULT_MAX_UPDATE_ROWS, "rows one update message may replace (bounds how long lookups wait for one)", gt=0
    )
    max_streams: int = _field(
        DEFAULT_MAX_UPDATE_STREAMS, "UpdateRows streams open at once; beyond it RESOURCE_EXHAUSTED", gt=0
    )
    poll_interval_ms: float = _field(
        DEFAULT_UPDATES_POLL_MS, "how often a process reads the updates other processes appended, ms", gt=0
    )
    max_log_bytes: int = _field(
        DEFAULT_MAX_LOG_BYTES,
        "bytes the delta log of the served base may hold; beyond it updates are RESOURCE_EXHAUSTED until it is "
        "compacted (embserve compact)",
        gt=0,
    )
    compact_after_bytes: int = _field(
        0,
        "compact the delta log in the background once it holds this many bytes, into a new base at the checkpoint's "
        "path (a .safetensors file, or a symbolic link to a row directory), then reload it; 0: never (embserve "
        "compact by hand)",
        ge=0,
    )
    nice: int = _field(
        DEFAULT_UPDATES_NICE,
        "scheduling niceness of the thread that checks, encodes and logs updates (0: the server's own; Linux): "
        "when the cores are busy, lookups get them first",
        ge=0,
        le=19,
    )

    @pydantic.model_validator(mode="after")
    def _compaction_before_the_bound(self) -> UpdatesConfig:
        if self.compact_after_bytes >= self.max_log_bytes:
            raise ValueError(
                f"updates.compact_after_bytes ({self.compact_after_bytes}) must be below updates.max_log_bytes "
                f"({self.max_log_bytes}): the log would refuse updates before it is compacted"
            )
        return self


class ServerConfig(_Strict):
    """Everything `embserve serve` needs; see the README's configuration table."""

    model: str = _field("default", "model config: a YAML path or a built-in name (default, twhin_local)")
    checkpoint: str | None = _field(
        None,
        "weights: a .safetensors or torch state-dict file, or a row directory (embserve export --storage mmap); "
        "none: seeded init",
    )
    seed: int = _field(0, "init seed when there is no checkpoint")
    model_version: str | None = _field(None, "version string reported to clients; none: derived from the weights")
    engine: Engine = _field(Engine.FUSED, "fused: torchrec's quantized inference collection; eager: the plain module")
    device: str = _field("cpu", "cpu, cuda or cuda:N")
    shard_devices: int = _field(1, "above 1: split the tables over that many devices (int8/int4 tables)", ge=1)
    sharding: ShardingType = _field(ShardingType.TABLE_WISE, "how sharded tables are split")
    storage: Storage = _field(
        Storage.MEMORY,
        "where the rows of tables whose config names no storage are served from: memory; mmap (read in place from "
        "the row directory's files, CPU); managed (fbgemm's managed caching, CUDA). mmap and managed need a row "
        "directory as --checkpoint",
    )
    cache_load_factor: float = _field(
        DEFAULT_CACHE_LOAD_FACTOR, "managed tables: the share of their rows the device cache holds", gt=0, le=1
    )
    plan: str | None = _field(None, "sharding plan (embserve plan): serve one of its shards, given by --shard")
    shard: int | None = _field(None, "the shard of --plan this server serves: its tables and rows only", ge=0)
    host: str = _field(DEFAULT_HOST, "address to bind")
    port: int = _field(DEFAULT_PORT, "gRPC port; 0 picks a free one", ge=0, le=65535)
    metrics_port: int | None = _field(DEFAULT_METRICS_PORT, "Prometheus /metrics port", ge=0, le=65535)
    grace_period_s: float = _field(DEFAULT_GRACE_PERIOD_S, "seconds to drain on SIGTERM/SIGINT", ge=0)
    torch_threads: int | None = _field(None, "torch intra-op threads; none: torch's default", ge=1)
    workers: int = _field(1, "server processes sharing the port and the weights", ge=1)
    max_worker_restarts_per_minute: int = _field(
        DEFAULT_MAX_WORKER_RESTARTS_PER_MINUTE,
        "worker deaths per minute the supervisor replaces; one more and it stops and exits 1",
        ge=0,
    )
    log_level: str = _field("info", "debug, info, warning or error")
    log_format: LogFormat = _field(LogFormat.JSON, "log line format on stderr")
    event_loop: EventLoop = _field(
        EventLoop.UVLOOP, "the event loop: uvloop spends less CPU per call than asyncio's own"
    )
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    router: RouterConfig = RouterConfig()
    updates: UpdatesConfig = UpdatesConfig()
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

    @pydantic.model_validator(mode="after")
    def _plan_and_shard(self) -> ServerConfig:
        if (self.plan is None) != (self.shard is None) and not self.router.shards:
            raise ValueError("plan and shard go together: a shard server needs --plan and --shard")
        return self

    @pydantic.model_validator(mode="after")
    def _compaction_of_a_checkpoint(self) -> ServerConfig:
        if self.updates.compact_after_bytes and self.checkpoint is None:
            raise ValueError("updates.compact_after_bytes needs a checkpoint to compact into (--checkpoint)")
        if self.updates.compact_after_bytes and self.plan is not None:
            raise ValueError(
                "updates.compact_after_bytes is not for a shard server (--plan): its log holds the shard's rows, "
                "not the checkpoint's"
            )
        if self.updates.compact_after_bytes and self.model_version is not None:
            raise ValueError(
                "updates.compact_after_bytes and model_version do not go together: a compacted base is named after "
                "its weights"
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
