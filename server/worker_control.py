"""The supervisor's channel to each worker of `--workers N`: a new model version reaches running workers without
new processes, so a reload never closes a listener (closing one resets the connections in its accept queue).

Over a Unix socket (SOCK_SEQPACKET: one JSON message per packet, the row files' descriptors passed with it):

    supervisor -> worker   {"op": "prepare", "version": ..., "config": {...}, "storage": {...}, "tables": [...]}
                           + one descriptor per table, in `tables` order
    worker -> supervisor   {"op": "prepared", "ok": true} or {"op": "prepared", "ok": false, "error": "..."}
    supervisor -> worker   {"op": "commit"} (every worker prepared) or {"op": "abort"}
    worker -> supervisor   {"op": "committed", "version": ...}

A worker prepares by mapping the new rows and running the start-up self-check, off its event loop, while it keeps
serving; it swaps the new version in between batches on commit. The supervisor commits only when every worker has
prepared, so the workers never serve different versions for longer than the commits take to arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from embserve.embeddings import ServingModel
from embserve.embeddings.config import Storage, model_config_from_dict
from embserve.embeddings.shared_rows import SharedRows

__all__ = ["SupervisorChannel", "WorkerChannel", "channel_pair"]

logger = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 20
_MAX_FDS = 4096


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, worker's end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


class SupervisorChannel:
    """The supervisor's end of one worker's channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def prepare(self, rows: SharedRows) -> None:
        tables = [t.name for t in rows.config.tables]
        _send(
            self.sock,
            {
                "op": "prepare",
                "version": rows.version,
                "config": rows.config.model_dump(mode="json"),
                "storage": {name: kind.value for name, kind in rows.storage.items()},
                "tables": tables,
            },
            [rows.fds[name] for name in tables],
        )

    def send(self, op: str) -> None:
        _send(self.sock, {"op": op})

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The worker's next message, or None when it does not answer by `deadline` (or has gone)."""
        timeout = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        try:
            data = self.sock.recv(_MAX_MESSAGE)
        except OSError:
            return None
        return json.loads(data) if data else None

    def close(self) -> None:
        self.sock.close()


class WorkerChannel:
    """A worker's end: prepares, swaps in or drops the versions the supervisor sends.

    Args:
        sock: the worker's end of the channel.
        swap_in: puts a prepared model into service (between batches).
    """

    def __init__(
        self,
        sock: socket.socket,
        swap_in: Callable[[ServingModel], Awaitable[None]],
        *,
        prepare: Callable[[ServingModel], ServingModel] = lambda model: model,
        copy_on_write: bool = False,
    ) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._swap_in = swap_in
        self._after_prepare = prepare
        self._copy_on_write = copy_on_write
        self._prepared: ServingModel | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        except (RuntimeError, ValueError):
            pass
        self._sock.close()

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:  # the supervisor is gone: PR_SET_PDEATHSIG stops this worker
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            return
        task = asyncio.get_running_loop().create_task(self._handle(json.loads(data), fds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "prepare":
            try:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(None, _prepare, message, fds, self._copy_on_write)
                model = await loop.run_in_executor(None, self._after_prepare, model)
            except Exception as err:
                logger.error("could not prepare the new version", extra={"error": f"{type(err).__name__}: {err}"})
                _send(self._sock, {"op": "prepared", "ok": False, "error": f"{type(err).__name__}: {err}"})
                return
            self._prepared = model
            _send(self._sock, {"op": "prepared", "ok": True})
        elif op == "commit" and self._prepared is not None:
            model, self._prepared = self._prepared, None
            await self._swap_in(model)
            _send(self._sock, {"op": "committed", "version": model.version})
        elif op == "abort":
            self._prepared = None


def _prepare(message: dict[str, Any], fds: list[int], copy_on_write: bool) -> ServingModel:
    """The new version over the received descriptors, self-checked; the descriptors are closed (the model keeps its
    own)."""
    try:
        config = model_config_from_dict(message["config"], source="the supervisor's model")
        storage = {name: Storage(kind) for name, kind in message["storage"].items()}
        rows = SharedRows(config, str(message["version"]), storage, dict(zip(message["tables"], fds)))
        model = rows.serving_model(copy_on_write=copy_on_write)
        model.self_check()
        return model
    finally:
        for fd in fds:
            os.close(fd)
