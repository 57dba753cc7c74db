"""Background compaction: once the served base's delta log holds `--compact-after-bytes`, it is folded into a new
base at the checkpoint's own path and the server reloads it.

The fold runs in a child process (`embserve compact --in-place --if-base <base>`), `--updates-nice` steps nicer
than the server and on one intra-op thread, so that the lookups keep their cores and the server's memory and
interpreter are not shared with it. One compaction of a log runs at a time, whichever process of `--workers N` (or
of several servers on one checkpoint) sees the log grow first: the others find its lock taken (a lock of the log
folder the server holds while its child runs, so they start no child), or, later, the path holding a newer base,
and do nothing. Lookups and updates go on meanwhile: the updates answered during the fold go
to the old log and are carried over when the new base loads (`carry_over`).

After a fold the server reloads: a single server itself, a worker by asking its supervisor (SIGHUP), which moves
every worker. A process that finds the path holding a compaction of its base that another process made reloads too
(a worker leaves that to the worker that folded); a path holding some other checkpoint is left to the operator (a
SIGHUP serves it). A base is folded or found folded once: its log growing further starts nothing more. A failed fold
is logged and counted, and tried again at the first update a minute later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from embserve.embeddings.compact import compacted_from
from embserve.embeddings.compact_cli import EXIT_OTHER_BASE, EXIT_RUNNING

from .config import ServerConfig
from .metrics import ServerMetrics
from .updater import lower_priority

__all__ = ["Compactor"]

logger = logging.getLogger(__name__)

SERVER_LOCK_FILE = "compact.server.lock"  # held by the server whose child folds (the child takes `LOCK_FILE`)
RETRY_S = 60.0  # after a fold that failed or found another running, the next try waits this long
_OUTPUT_TAIL = 4096  # bytes of the child's output kept for the log
_STOP_WAIT_S = 10.0


class Compactor:
    """Starts a background compaction when the log it is told about holds `compact_after_bytes`.

    Args:
        config: the server's settings (model, checkpoint, updates).
        log_dir: where the delta logs live.
        reload: called with the base just folded (True: by this process; False: by another process, the path
            holding a compaction of it): serves the checkpoint's new content, if this process still serves that base.
        metrics: `embserve_compactions_total{outcome}`.
    """

    program = [sys.executable, "-m", "embserve.client.cli"]  # the `embserve` command the child runs

    def __init__(
        self,
        config: ServerConfig,
        log_dir: Path,
        *,
        reload: Callable[[str, bool], Awaitable[object]],
        metrics: ServerMetrics,
    ) -> None:
        self._config = config
        self._after = config.updates.compact_after_bytes
        self._log_dir = log_dir
        self._reload = reload
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._not_before = 0.0
        self._closed = False
        self._folded: collections.deque[str] = collections.deque(maxlen=8)  # bases folded or found folded

    @property
    def running(self) -> bool:
        return self._task is not None

    def log_grew(self, base: str, log_bytes: int) -> None:
        """Called on the event loop after each update applied over `base`, whose log now holds `log_bytes`."""
        if not self._after or log_bytes < self._after or self._task is not None or self._closed:
            return
        if base in self._folded:  # its reload is on its way (or was left to the operator)
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._not_before:
            return
        self._task = loop.create_task(self._run(base, log_bytes), name="embserve-compaction")

    async def close(self) -> None:
        """Stops a fold in progress (its temporary output is removed; the checkpoint stays as it was)."""
        self._closed = True
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _STOP_WAIT_S)
            except asyncio.TimeoutError:
                if child is not None and child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def _run(self, base: str, log_bytes: int) -> None:
        outcome: str | None = "failed"
        try:
            outcome = await self._fold(base, log_bytes)
        except Exception as err:
            logger.error("compaction failed", extra={"base": base, "error": f"{type(err).__name__}: {err}"})
        finally:
            self._task = None
            if outcome not in ("ok", "other_base"):  # those bases are not tried again (`_folded`)
                self._not_before = asyncio.get_running_loop().time() + RETRY_S
        if outcome is not None:
            self._metrics.compactions.labels(outcome).inc()

    async def _fold(self, base: str, log_bytes: int) -> str | None:
        """Runs one fold; its outcome (None: not run, another process folding, or this server stopping)."""
        lock = self._claim()
        if lock is None:
            return None
        try:
            return await self._fold_holding(base, log_bytes)
        finally:
            os.close(lock)  # releases it

    async def _fold_holding(self, base: str, log_bytes: int) -> str | None:
        config = self._config
        assert config.checkpoint is not None  # the settings refuse compaction without one
        command = [*self.program, "compact", "--model", config.model]
        command += ["--checkpoint", config.checkpoint, "--updates-dir", str(self._log_dir)]
        command += ["--in-place", "--if-base", base]
        logger.info("compacting the delta log", extra={"base": base, "log_bytes": log_bytes})
        started = time.perf_counter()
        child = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._child = child
        lower_priority(config.updates.nice, child.pid)
        if self._closed:  # the server stopped while the child started
            child.terminate()
        tail = b""
        assert child.stdout is not None
        while chunk := await child.stdout.read(1 << 16):
            tail = (tail + chunk)[-_OUTPUT_TAIL:]
        code = await child.wait()
        self._child = None
        said = tail.decode(errors="replace").strip()
        if self._closed:
            logger.info("compaction stopped with the server", extra={"base": base, "exit_code": code})
            return None
        if code == EXIT_RUNNING:
            return None
        if code == EXIT_OTHER_BASE:
            self._folded.append(base)
            folded = await asyncio.to_thread(compacted_from, config.checkpoint)
            if folded is not None and folded.get("base") == base:
                logger.info("another process compacted the served base", extra={"base": base})
                await self._reload(base, False)
            else:
                logger.warning(
                    "the checkpoint holds another base than the served one, not a compaction of it: not reloaded "
                    "(SIGHUP serves it)",
                    extra={"base": base},
                )
            return "other_base"
        if code != 0:
            logger.error("compaction failed", extra={"base": base, "exit_code": code, "output": said})
            return "failed"
        logger.info(
            "compacted the delta log",
            extra={"base": base, "seconds": round(time.perf_counter() - started, 3), "output": said},
        )
        self._folded.append(base)
        await self._reload(base, True)
        return "ok"

    def _claim(self) -> int | None:
        """The server's lock of the log folder (its descriptor), or None when another server holds it (its child
        is folding these logs)."""
        fd = os.open(self._log_dir / SERVER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd
