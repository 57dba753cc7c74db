"""The server process: gRPC (service, health, reflection), batcher, executor, metrics endpoint, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from embserve.embeddings import ServingModel, build_serving_model, load_model_config
from embserve.oip import wire as oip
from embserve.v1.wire import SERVICE_NAME

from .bounds import Bounds
from .compactor import Compactor
from .config import EventLoop, ServerConfig
from .connections import max_connections
from .frontdoor import FrontDoor
from .inference import InferenceServicer
from .listening import add_services, bind, grpc_options, start_metrics
from .local_backend import LocalBackend
from .metrics import ServerMetrics
from .placement import Placement, shard_placement
from .security import peer_guards
from .servicer import EmbeddingServicer
from .startup import StartupError
from .streams import StreamServicer
from .unused_connections import PeerActivity, UnusedConnectionReaper
from .updater import RowUpdater, UpdatesState, log_dir_for
from .updates import UpdateServicer
from .worker_control import WorkerChannel

__all__ = ["EmbserveServer", "ReloadFailed", "load_model", "run_on_event_loop", "serve_until_signal"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ReloadFailed(RuntimeError):
    """A new model version could not be loaded; the old one keeps serving."""


def load_model(config: ServerConfig) -> ServingModel:
    """Builds the serving model a server config names (model config, checkpoint or seed, device, engine), and
    checks that it computes (`ServingModel.self_check`)."""
    import torch

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {config.device!r} requested but CUDA is not available on this host")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.plan is not None and config.shard is not None:
        model = _load_shard_model(config)
        model.self_check()
        return model
    model = build_serving_model(
        load_model_config(config.model),
        checkpoint=config.checkpoint,
        seed=config.seed,
        device=config.device,
        engine=config.engine,
        version=config.model_version,
        shard_devices=config.shard_devices,
        sharding=config.sharding,
        default_storage=config.storage,
        cache_load_factor=config.cache_load_factor,
        copy_on_write=config.updates.enabled,
    )
    model.self_check()  # a model that cannot compute never reaches SERVING
    return model


def _load_shard_model(config: ServerConfig) -> ServingModel:
    """Shard `config.shard` of `config.plan`: its tables and rows of the whole model's weights (or its own row
    directory)."""
    from embserve.embeddings.plan import load_plan
    from embserve.embeddings.shard_weights import build_shard_model

    assert config.plan is not None and config.shard is not None
    whole = load_model_config(config.model)
    return build_shard_model(
        whole,
        load_plan(config.plan, whole),
        config.shard,
        checkpoint=config.checkpoint,
        seed=config.seed,
        version=config.model_version,
        device=config.device,
        engine=config.engine,
        shard_devices=config.shard_devices,
        sharding=config.sharding,
        default_storage=config.storage,
        cache_load_factor=config.cache_load_factor,
        copy_on_write=config.updates.enabled,
    )


def _placement(config: ServerConfig) -> Placement | None:
    if config.plan is None or config.shard is None:
        return None
    return shard_placement(load_model_config(config.model), config.plan, config.shard)


class EmbserveServer:
    """One embserve server: call `start`, then `stop`. Binds `config.host:config.port` (port 0: any free port).

    The app builds the pieces once: the backend (batcher and executor), the front door in front of it, and the
    three front ends (Lookup and metadata, LookupStream, the Open Inference Protocol) as thin translations.

    Args:
        config: server settings.
        model: a ready model; by default the one `config` names is built.
        bounds: this process's byte bounds; by default `config`'s, resolved against the host's memory (workers
            get their share).
        reuse_port: share the port with other processes (SO_REUSEPORT), as the workers of `--workers N` do;
            off otherwise, so that a port already in use is an error.
        worker: this process's worker index, for logs.
        supervised: a worker of `--workers N`, whose supervisor reloads it (a background compaction asks it to).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        model: ServingModel | None = None,
        bounds: Bounds | None = None,
        reuse_port: bool = False,
        worker: int = 0,
        supervised: bool = False,
    ) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.worker = worker
        self.supervised = supervised
        self.metrics = ServerMetrics()
        self.bounds = bounds or Bounds.of(config)
        self.backend = LocalBackend(
            model or load_model(config),
            batching=config.batching,
            bounds=self.bounds,
            metrics=self.metrics,
            trim_after_bytes=config.limits.offload_decode_bytes,
            on_storage_failure=self._storage_failed,
        )
        self.compactor: Compactor | None = None
        self.updater = self._open_updates()
        self._replayed: dict[int, UpdatesState] = {}  # prepared versions' replayed updates, by id of the model
        self._cap = max_connections(config.connections)
        self.door = FrontDoor(
            backend=self.backend,
            bounds=self.bounds,
            limits=config.limits,
            metrics=self.metrics,
            activity=PeerActivity(self._cap),
            placement=_placement(config),
        )
        self.metrics.track_budgets(self.door.accounting)
        self.metrics.track_tables(
            self.backend.model.keys,
            lambda name: self.backend.model.resident_bytes(name),
            lambda name: self.backend.model.disk_bytes(name),
        )
        self._front_ends = (EmbeddingServicer(self.door), StreamServicer(self.door))
        self._inference = InferenceServicer(self.door)
        self._updates = UpdateServicer(self.door, self.updater, max_streams=config.updates.max_streams)
        self.health, self._interceptors = peer_guards(config, self.metrics)
        self._reload_lock = asyncio.Lock()
        self._not_serving = False  # set when a row file fails under the server
        self.port: int = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._reaper: asyncio.Task[None] | None = None
        m = self.backend.model
        self.metrics.set_model(m.config.name, m.version, m.engine.value, str(m.device))

    @property
    def model(self) -> ServingModel:
        """The model serving now."""
        return self.backend.model

    def _open_updates(self) -> RowUpdater | None:
        """With updates on: the served base's delta log, replayed into the model before it serves."""
        settings = self.config.updates
        if not settings.enabled:
            return None
        checkpoint = self.config.checkpoint
        log_dir = log_dir_for(settings, checkpoint)
        state = UpdatesState.open(self.backend.model, log_dir, fsync=settings.fsync, checkpoint=checkpoint)
        self.backend.swap_model(state.model)
        self.compactor = (
            Compactor(self.config, log_dir, reload=self._serve_compacted, metrics=self.metrics)
            if settings.compact_after_bytes
            else None
        )
        return RowUpdater(
            settings,
            state,
            executor=self.backend.executor,
            metrics=self.metrics,
            log_grew=self.compactor.log_grew if self.compactor is not None else None,
        )

    async def _serve_compacted(self, base: str, here: bool) -> None:
        """After a compaction of `base` (`here`: by this process): serves the checkpoint's new content, unless this
        process has moved on from `base` already. A worker that folded asks its supervisor, which moves every worker;
        the other workers leave it to that one."""
        if self.updater is None or self.updater.base != base:
            return
        if self.supervised:
            if here:
                os.kill(os.getppid(), signal.SIGHUP)
            return
        try:
            await self.reload()
        except ReloadFailed:
            pass  # logged and counted by reload(); the old version keeps serving

    def replay_updates(self, model: ServingModel, checkpoint: str | None = None) -> ServingModel:
        """A new version (of `checkpoint`, by default the configured one) with its base's delta log replayed
        (blocking; before it is swapped in); the model itself when updates are off."""
        if self.updater is None:
            return model
        settings = self.config.updates
        checkpoint = checkpoint or self.config.checkpoint
        state = UpdatesState.open(model, log_dir_for(settings, checkpoint), fsync=settings.fsync, checkpoint=checkpoint)
        self._replayed[id(state.model)] = state
        return state.model

    def _storage_failed(self, err: Exception) -> None:
        """A table's row file changed under the server: the batches that touch it fail, and the server reports
        NOT_SERVING until a reload serves sound files."""
        if not self._not_serving:
            self._not_serving = True
            logger.error("a row file changed while served; NOT_SERVING until a reload", extra={"error": str(err)})
            loop = asyncio.get_running_loop()
            for service in ("", SERVICE_NAME, oip.SERVICE_NAME):
                loop.create_task(self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(
            options=grpc_options(self.config, reuse_port=self.reuse_port), interceptors=self._interceptors
        )
        embserve_handlers = {name: h for front in self._front_ends for name, h in front.handlers().items()}
        embserve_handlers.update(self._updates.handlers())
        add_services(server, embserve_handlers, self._inference.handlers(), self.health)
        try:
            self.port = bind(server, self.config)
            self._metrics_http, self.metrics_port = start_metrics(self.config, self.metrics.registry)
        except StartupError:
            await server.stop(None)
            await self.backend.close()
            raise
        await server.start()
        self._server = server
        self.backend.start()
        if self.updater is not None:
            self.updater.start()
        grace_ms = self.config.connections.unused_connection_grace_ms
        if grace_ms and UnusedConnectionReaper.supported() and self.door.activity is not None:
            reaper = UnusedConnectionReaper(
                port=self.port, cap=self._cap, grace_s=grace_ms / 1e3, activity=self.door.activity
            )
            self._reaper = asyncio.get_running_loop().create_task(reaper.run(), name="embserve-unused-connections")
        for service in ("", SERVICE_NAME, oip.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        m = self.backend.model
        logger.info(
            "serving",
            extra={
                "address": self.address,
                "metrics_port": self.metrics_port,
                "worker": self.worker,
                "pid": os.getpid(),
                "model": m.config.name,
                "version": m.version,
                "engine": m.engine.value,
                "device": str(m.device),
                "tables": len(m.keys),
                "policy": self.config.batching.policy.value,
                "max_batch_size": self.backend.max_batch_size,
            },
        )

    async def reload(self, checkpoint: str | None = None, version: str | None = None) -> ServingModel:
        """Loads a new version of the weights in a background thread and swaps it in between batches.

        Calls keep flowing during the load; every batch is computed by exactly one version, which its responses
        name. On any failure the old version keeps serving and `ReloadFailed` says why.

        Args:
            checkpoint: the weights to load; by default the configured checkpoint file, read again.
            version: the version to report; by default derived from the checkpoint's content.
        """
        async with self._reload_lock:
            old = self.backend.model
            config = self.config.model_copy(
                update={"checkpoint": checkpoint or self.config.checkpoint, "model_version": version}
            )
            try:
                if config.checkpoint is None:
                    raise ValueError("no checkpoint configured or given")
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(None, load_model, config)
                model = await loop.run_in_executor(None, self.replay_updates, model, config.checkpoint)
                await self._swap(model)
            except Exception as err:
                self.metrics.reloads.labels("failed").inc()
                logger.error(
                    "reload failed; still serving the old version",
                    extra={"version": old.version, "error": f"{type(err).__name__}: {err}"},
                )
                raise ReloadFailed(f"{type(err).__name__}: {err}") from None
            self.metrics.reloads.labels("ok").inc()
            if self._not_serving and self.door.accepting:
                self._not_serving = False
                for service in ("", SERVICE_NAME, oip.SERVICE_NAME):
                    await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.set_model(model.config.name, model.version, model.engine.value, str(model.device))
            logger.info("reloaded", extra={"old_version": old.version, "version": model.version})
            return model

    async def _swap(self, model: ServingModel) -> None:
        """Serves `model` from the next batch on; with updates on, its base's log is followed from then on."""
        state = self._replayed.pop(id(model), None)
        for stale in self._replayed.values():  # prepared, then dropped
            stale.log.close()
        self._replayed.clear()
        self.backend.swap_model(model)
        if self.updater is not None and state is not None:
            await self.updater.rebase(state)

    async def swap_in(self, model: ServingModel) -> None:
        """Serves `model` from the next batch on (a version prepared elsewhere, its updates replayed by
        `replay_updates`: `--workers` reloads)."""
        old = self.backend.model
        await self._swap(model)
        self.metrics.reloads.labels("ok").inc()
        self.metrics.set_model(model.config.name, model.version, model.engine.value, str(model.device))
        logger.info("reloaded", extra={"old_version": old.version, "version": model.version, "worker": self.worker})

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health NOT_SERVING, new calls UNAVAILABLE, accepted calls finish within `grace` seconds."""
        grace = self.config.grace_period_s if grace is None else grace
        self.door.begin_drain()
        if self.compactor is not None:  # before the grace period: a fold ending now must not start a reload
            await self.compactor.close()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Keep the port open while accepted calls finish, so probes read NOT_SERVING and new calls UNAVAILABLE.
        if not await self.door.inflight.wait_idle(grace):
            logger.warning("grace period over with calls in flight; cancelling them", extra={"grace_s": grace})
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        if self._reaper is not None:
            self._reaper.cancel()
        await self.backend.close()
        if self.updater is not None:
            await self.updater.close()
        self.door.offload.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        cancelled = sum(
            self.metrics.value("embserve_requests_total", {"method": m, "code": "CANCELLED"})
            for m in ("Lookup", "LookupStream", "ModelInfer")
        )
        # Calls whose handler was cancelled (by their caller, or by the end of the grace period): a drain that
        # cuts accepted calls shows here.
        logger.info("stopped", extra={"address": self.address, "lookups_cancelled": int(cancelled)})

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve_until_signal(
    config: ServerConfig,
    *,
    model: ServingModel | None = None,
    bounds: Bounds | None = None,
    worker: int | None = None,
    on_ready: Callable[[], object] | None = None,
    control: socket.socket | None = None,
) -> None:
    """Runs a server until SIGTERM/SIGINT, then drains. SIGHUP reloads the checkpoint, except in a worker of
    `--workers N`, whose supervisor reloads it: over `control` (`worker_control`), or by replacing the workers."""
    server = EmbserveServer(
        config,
        model=model,
        bounds=bounds,
        reuse_port=worker is not None,
        worker=worker or 0,
        supervised=worker is not None,
    )
    await server.start()
    channel = (
        WorkerChannel(control, server.swap_in, prepare=server.replay_updates, copy_on_write=config.updates.enabled)
        if control is not None
        else None
    )
    if channel is not None:
        channel.start()
    if on_ready is not None:
        on_ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await server.reload()
        except ReloadFailed:
            pass  # logged and counted by reload(); the old version keeps serving

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup if worker is None else lambda: None)
    await stop.wait()
    logger.info("signal received; draining", extra={"grace_period_s": config.grace_period_s})
    if channel is not None:
        channel.close()
    await server.stop()


def run_on_event_loop(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """Runs `main` to completion on a new event loop of the configured kind (`asyncio.run` with a loop factory)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if kind is EventLoop.UVLOOP:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
