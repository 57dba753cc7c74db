"""The router process: the same front door, front ends, health, auth, TLS, metrics and drain as a server, with
the router backend (`router`) behind it instead of a model. Torch-free."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from embserve.embeddings.config import load_model_config
from embserve.embeddings.plan import load_plan
from embserve.oip import wire as oip
from embserve.v1.wire import SERVICE_NAME

from .bounds import Bounds
from .config import ServerConfig
from .connections import max_connections
from .frontdoor import FrontDoor
from .inference import InferenceServicer
from .listening import add_services, bind, grpc_options, start_metrics
from .metrics import ServerMetrics
from .placement import Placement
from .router import RouterBackend
from .security import peer_guards
from .servicer import EmbeddingServicer
from .shard_channels import ShardChannels, parse_shard_addresses
from .startup import StartupError
from .streams import StreamServicer
from .unused_connections import PeerActivity

__all__ = ["RouterServer", "check_router", "route_until_signal"]

logger = logging.getLogger(__name__)


def check_router(config: ServerConfig) -> None:
    """Checks the model, the plan and the shard addresses before anything binds; `StartupError` naming the fault."""
    from embserve.embeddings.errors import ConfigError

    if config.plan is None:
        raise StartupError("--plan is required: the plan the shards serve")
    try:
        plan = load_plan(config.plan, load_model_config(config.model))
        parse_shard_addresses(config.router.addresses(), plan.shard_count)
    except (ConfigError, ValueError) as err:
        raise StartupError(str(err)) from None
    for path, flag in (
        (config.router.shard_token_file, "--shard-token-file"),
        (config.router.shard_tls_ca, "--shard-tls-ca"),
    ):
        if path is not None and not Path(path).is_file():
            raise StartupError(f"{flag} {path}: no such file")


class RouterServer:
    """One router: call `start`, then `stop`. Binds `config.host:config.port` (port 0: any free port).

    Args:
        config: its settings; `config.model` the whole model, `config.plan` the plan, `config.router` the shards.
    """

    def __init__(self, config: ServerConfig) -> None:
        if config.plan is None:
            raise StartupError("a router needs --plan")
        self.config = config
        model = load_model_config(config.model)
        plan = load_plan(config.plan, model)
        addresses = parse_shard_addresses(config.router.addresses(), plan.shard_count)
        settings = config.router
        token = Path(settings.shard_token_file).read_text().strip() if settings.shard_token_file else None
        creds = (
            grpc.ssl_channel_credentials(Path(settings.shard_tls_ca).read_bytes()) if settings.shard_tls_ca else None
        )
        self.metrics = ServerMetrics()
        self.bounds = Bounds.of(config)
        channels = ShardChannels(
            addresses,
            plan_digest=plan.digest or "",
            credentials=creds,
            token=token,
            check_interval_s=settings.plan_check_interval_ms / 1e3,
            # round_robin: a `dns:///name:port` shard address (a headless Service) spreads over every replica.
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.lb_policy_name", "round_robin"),
            ],
        )
        self.backend = RouterBackend(
            model,
            plan,
            channels,
            metrics=self.metrics,
            max_routed_requests=settings.max_routed_requests,
            max_routed_bytes=self.bounds.max_queue_bytes,
            default_deadline_s=settings.shard_deadline_ms / 1e3,
        )
        self.door = FrontDoor(
            backend=self.backend,
            bounds=self.bounds,
            limits=config.limits,
            metrics=self.metrics,
            activity=PeerActivity(max_connections(config.connections)),
            placement=Placement(plan_digest=plan.digest or "", shard_count=plan.shard_count),
        )
        self.metrics.track_budgets(self.door.accounting)
        self._front_ends = (EmbeddingServicer(self.door), StreamServicer(self.door))
        self._inference = InferenceServicer(self.door)
        self.health, self._interceptors = peer_guards(config, self.metrics)
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self.metrics.set_model(model.name, "", "router", f"{plan.shard_count} shards")

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(options=grpc_options(self.config, reuse_port=False), interceptors=self._interceptors)
        handlers = {name: h for front in self._front_ends for name, h in front.handlers().items()}
        add_services(server, handlers, self._inference.handlers(), self.health)
        try:
            self.port = bind(server, self.config)
            self._metrics_http, self.metrics_port = start_metrics(self.config, self.metrics.registry)
        except StartupError:
            await server.stop(None)
            raise
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME, oip.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("routing", extra={"address": self.address, "pid": os.getpid(), "shards": self.door.placement})

    async def stop(self, grace: float | None = None) -> None:
        """Drains as a server does: health NOT_SERVING, new calls UNAVAILABLE, accepted calls finish."""
        grace = self.config.grace_period_s if grace is None else grace
        self.door.begin_drain()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.door.inflight.wait_idle(grace)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        await self.backend.close()
        self.door.offload.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def route_until_signal(config: ServerConfig) -> None:
    """Runs a router until SIGTERM/SIGINT, then drains."""
    router = RouterServer(config)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop()
