"""`--workers N`: several server processes on one port, sharing one copy of the weights.

The parent loads the model once, then forks the workers before any gRPC object exists (gRPC does not survive a
fork of a process that has started it). The forward only reads the weights, so their pages stay shared
copy-on-write by every worker. Each worker binds the same port with SO_REUSEPORT, and the kernel spreads new
connections over them. The parent supervises: a worker that dies is replaced; SIGHUP loads the new checkpoint in
the parent and replaces the workers one generation at a time (new ones ready before the old ones drain); SIGTERM
drains every worker and exits 0.

The supervisor's exit code tells the truth: more than `max_worker_restarts_per_minute` worker deaths within a
minute and it drains the rest and exits 1, so that systemd or Kubernetes restarts the whole service. Workers do
not outlive it: each asks the kernel for SIGTERM when its parent dies (Linux `PR_SET_PDEATHSIG`), so a supervisor
killed with SIGKILL leaves no orphan holding the port.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from embserve.embeddings import Engine, ServingModel, StorageFailed, load_model_config
from embserve.embeddings.shared_rows import SharedRows

from .app import load_model, run_on_event_loop, serve_until_signal
from .bounds import Bounds
from .config import ServerConfig
from .worker_control import SupervisorChannel, channel_pair

__all__ = ["run_workers"]

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_GAVE_UP = 1  # the supervisor's exit code when workers keep dying or do not start


def _reserve_port(host: str, port: int) -> socket.socket:
    """Holds the port (bound, never listening) with SO_REUSEPORT, so workers can join it; picks one for port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    metrics = config.metrics_port
    return config.model_copy(
        update={"port": port, "metrics_port": metrics + index if metrics else metrics, "torch_threads": None}
    )


def _die_with_parent(parent: int) -> None:
    """In a new worker: SIGTERM (drain, then exit) when the supervisor dies. The check of the parent's pid after
    `prctl` covers a supervisor that died between the fork and the `prctl`."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(EXIT_GAVE_UP)


def _fork_worker(
    config: ServerConfig,
    bounds: Bounds,
    make_model: Callable[[], ServingModel],
    index: int,
    threads: int,
    inherited: Iterable[int],
    control: socket.socket | None,
) -> tuple[int, int]:
    """Forks one worker; returns (pid, fd that becomes readable when it serves). The worker closes the
    supervisor's descriptors listed in `inherited`, builds its model with `make_model`, and listens on `control`
    for new versions."""
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent(parent)
            for fd in (read_fd, *inherited):
                os.close(fd)
            import torch

            torch.set_num_threads(threads)
            model = make_model()
            run_on_event_loop(
                serve_until_signal(
                    config,
                    model=model,
                    bounds=bounds,
                    worker=index,
                    on_ready=lambda: os.write(write_fd, b"1"),
                    control=control,
                ),
                config.event_loop,
            )
        except BaseException:
            logger.exception("worker failed", extra={"worker": index})
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


class _Generation:
    """The workers serving one model: built by `make_model` in each worker. Each worker not yet serving has an open
    ready pipe in `pending`; it is closed when the worker reports ready, when it dies, or when the generation is
    abandoned. With `shared` rows each worker has a control channel, over which new versions reach it."""

    def __init__(
        self,
        config: ServerConfig,
        bounds: Bounds,
        make_model: Callable[[], ServingModel],
        count: int,
        threads: int,
        port: int,
        listener: int,
        *,
        version: str,
        shared: SharedRows | None = None,
    ) -> None:
        self.config, self.threads, self.port, self.listener = config, threads, port, listener
        self.make_model, self.version, self.shared = make_model, version, shared
        self.bounds = bounds
        self.count = count
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.pending: dict[int, int] = {}  # ready fd -> pid
        self.channels: dict[int, SupervisorChannel] = {}  # pid -> control channel (shared rows only)
        for index in range(count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        config = _worker_config(self.config, index, self.port)
        ours, theirs = channel_pair() if self.shared is not None else (None, None)
        inherited = [self.listener, *self.pending, *(c.sock.fileno() for c in self.channels.values())]
        if ours is not None:
            inherited.append(ours.fileno())
        try:
            pid, fd = _fork_worker(config, self.bounds, self.make_model, index, self.threads, inherited, theirs)
        finally:
            if theirs is not None:
                theirs.close()
        self.pids[pid] = index
        self.pending[fd] = pid
        if ours is not None:
            self.channels[pid] = SupervisorChannel(ours)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.poll_ready(min(0.5, max(0.0, deadline - time.monotonic())))
        return not self.pending

    def poll_ready(self, timeout: float = 0.0) -> list[int]:
        """Closes the pipes of workers that now serve (or died); returns their pids."""
        ready, _, _ = select.select(list(self.pending), [], [], timeout) if self.pending else ([], [], [])
        pids = []
        for fd in ready:
            os.read(fd, 1)  # b"1" when serving, b"" when the worker died first
            os.close(fd)
            pids.append(self.pending.pop(fd))
        return pids

    def forget(self, pid: int) -> int | None:
        """Drops an exited worker (closing its pipe if it never served); returns its index if it was ours."""
        for fd, owner in list(self.pending.items()):
            if owner == pid:
                os.close(fd)
                del self.pending[fd]
        channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()
        return self.pids.pop(pid, None)

    def close(self) -> None:
        """Closes the pipes of workers that never reported ready (the generation is being abandoned) and the
        control channels."""
        for fd in self.pending:
            os.close(fd)
        self.pending.clear()
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()

    def reload_in_place(self, rows: SharedRows, timeout: float) -> str | None:
        """Sends a new version to every serving worker and commits it once all have prepared it; returns None, or
        why the old version keeps serving. Workers still starting are replaced afterwards, with the new rows."""
        ready = {pid: ch for pid, ch in self.channels.items() if pid not in self.pending.values()}
        deadline = time.monotonic() + timeout
        for channel in ready.values():
            channel.prepare(rows)
        answers = {pid: channel.receive(deadline) for pid, channel in ready.items()}
        failed = {pid: a for pid, a in answers.items() if not a or not a.get("ok")}
        if failed:
            for channel in ready.values():
                channel.send("abort")
            pid, answer = next(iter(failed.items()))
            return f"worker {self.pids.get(pid)} could not prepare it: {(answer or {}).get('error', 'no answer')}"
        for channel in ready.values():
            channel.send("commit")
        for pid, channel in ready.items():
            if channel.receive(time.monotonic() + 30) is None:
                logger.error("worker did not confirm the new version", extra={"pid": pid})
        old, self.shared, self.version = self.shared, rows, rows.version
        self.make_model = _shared_model(rows, copy_on_write=self.config.updates.enabled)
        for pid in list(self.pending.values()):  # started with the old rows: replaced with the new ones
            os.kill(pid, signal.SIGTERM)
        if old is not None:
            old.close()  # the workers keep their own mappings of the old rows until they let the old version go
        return None

    def signal_all(self, sig: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _report_bus_error(generation: _Generation, pid: int) -> None:
    """A worker killed by SIGBUS touched a page of a mapped row file that was no longer there: name the file."""
    try:
        if generation.shared is not None:
            generation.shared.check_files()
    except StorageFailed as err:
        logger.error("worker died of SIGBUS reading a row file", extra={"pid": pid, "error": str(err)})
        return
    logger.error("worker died of SIGBUS; its row files look intact now", extra={"pid": pid})


def _shared_model(rows: SharedRows, *, copy_on_write: bool) -> Callable[[], ServingModel]:
    def make() -> ServingModel:
        model = rows.serving_model(copy_on_write=copy_on_write)
        model.self_check()
        return model

    return make


def _prepare(config: ServerConfig) -> tuple[SharedRows | None, Callable[[], ServingModel], str]:
    """What the workers will serve: the fused engine on the CPU from shared rows (one copy for every worker, and
    reloaded in place); any other engine or device as a model the supervisor builds and the workers inherit (a
    reload then starts new workers)."""
    if config.engine is Engine.FUSED and config.device == "cpu" and config.shard_devices == 1 and config.plan is None:
        rows = SharedRows.prepare(
            load_model_config(config.model),
            checkpoint=config.checkpoint,
            seed=config.seed,
            default_storage=config.storage,
            version=config.model_version,
        )
        return rows, _shared_model(rows, copy_on_write=config.updates.enabled), rows.version
    model = load_model(config.model_copy(update={"torch_threads": None}))
    return None, lambda: model, model.version


def run_workers(config: ServerConfig, workers: int) -> int:
    """Serves with `workers` processes until SIGTERM/SIGINT; returns the exit code."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    import torch

    reserved = _reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    # GNU OpenMP's thread pool does not survive fork: the parent stays single-threaded until the workers exist.
    torch.set_num_threads(1)
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // workers)
    shared, make_model, version = _prepare(config)
    flags: dict[str, bool] = {"stop": False, "reload": False}

    def on_signal(signum: int, frame: Any) -> None:
        flags["reload" if signum == signal.SIGHUP else "stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    listener = reserved.fileno()
    # Each worker holds its share of the server's byte bounds, so that together they hold what one process would.
    bounds = Bounds.of(config).share(workers)
    current = _Generation(config, bounds, make_model, workers, threads, port, listener, version=version, shared=shared)
    if not current.wait_ready(_READY_TIMEOUT_S):
        logger.error(
            "workers did not start", extra={"missing": sorted(current.pids[p] for p in current.pending.values())}
        )
        current.close()
        current.signal_all(signal.SIGKILL)
        return EXIT_GAVE_UP
    logger.info(
        "workers serving",
        extra={
            "address": f"{config.host}:{port}",
            "workers": workers,
            "pid": os.getpid(),
            "version": version,
            "torch_threads_per_worker": threads,
            "reload": "in place" if shared is not None else "new workers",
        },
    )
    retiring: list[_Generation] = []
    restarts: list[float] = []
    gave_up = False
    while not flags["stop"]:
        time.sleep(0.2)
        while True:  # reap exited workers
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for gen in retiring:
                gen.forget(pid)
            index = current.forget(pid)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
                _report_bus_error(current, pid)
            if index is not None and not flags["stop"]:
                restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
                if len(restarts) > config.max_worker_restarts_per_minute:
                    logger.error(
                        "workers keep dying; giving up",
                        extra={
                            "status": status,
                            "max_worker_restarts_per_minute": config.max_worker_restarts_per_minute,
                        },
                    )
                    flags["stop"] = gave_up = True
                    break
                logger.error("worker exited; replacing it", extra={"worker": index, "pid": pid, "status": status})
                current.spawn(index)
        for pid in current.poll_ready():
            if pid in current.pids:
                logger.info("worker replaced", extra={"worker": current.pids[pid], "pid": pid})
        retiring = [g for g in retiring if g.pids]
        if flags["reload"]:
            flags["reload"] = False
            fresh_config = config.model_copy(update={"model_version": None})
            try:
                new_shared, new_make, new_version = _prepare(fresh_config)
            except Exception as err:
                logger.error(
                    "reload failed; still serving the old version",
                    extra={"version": current.version, "error": f"{type(err).__name__}: {err}"},
                )
                continue
            if new_shared is not None and current.shared is not None:
                old_version = current.version
                problem = current.reload_in_place(new_shared, _READY_TIMEOUT_S)
                if problem is not None:
                    new_shared.close()
                    logger.error(
                        "reload failed; still serving the old version", extra={"version": old_version, "error": problem}
                    )
                else:
                    logger.info(
                        "reloaded", extra={"old_version": old_version, "version": new_version, "in_place": True}
                    )
                continue
            fresh = _Generation(
                config, bounds, new_make, workers, threads, port, listener, version=new_version, shared=new_shared
            )
            if not fresh.wait_ready(_READY_TIMEOUT_S):
                logger.error("new workers did not start; keeping the old ones")
                fresh.close()
                fresh.signal_all(signal.SIGKILL)
                continue
            current.close()
            current.signal_all(signal.SIGTERM)  # they drain while the new generation takes new connections
            retiring.append(current)
            logger.info("reloaded", extra={"old_version": current.version, "version": new_version, "in_place": False})
            current = fresh
    for gen in [current, *retiring]:
        gen.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + config.grace_period_s + 10
    alive = {pid for gen in [current, *retiring] for pid in gen.pids}
    while alive and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            alive.discard(pid)
        else:
            time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    for gen in [current, *retiring]:
        gen.close()
        if gen.shared is not None:
            gen.shared.close()
    reserved.close()
    logger.info("stopped", extra={"address": f"{config.host}:{port}", "gave_up": gave_up})
    return EXIT_GAVE_UP if gave_up else 0
