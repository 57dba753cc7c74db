"""Row updates in one server process: the delta log of the served base, appending to it, and applying what every
process appended, in order, between batches.

An update is checked (`row_updates.check_rows`) and encoded off the event loop, on a thread of its own that runs at a
lower scheduling priority (`nice`) so that lookups get the cores first when both want them, appended to the delta log
(durable before it is answered, when the log fsyncs), then applied: its rows are written on the thread that runs the
forwards (`BatchExecutor.between_batches`), so no batch sees half of it, and the version lookups report becomes
`<base>+<sequence>`. A process applies the log's records strictly in order, its own and those other processes of
`--workers N` appended (read every `poll_interval_ms`), so every process serves the same rows for the same
sequence. One update holds the batches for as long as its rows take to copy: `max_rows_per_message` bounds it.

The log belongs to the base it was written over (`<log dir>/<base version>.deltas`): a start or a reload replays
the log of the base it serves before serving it, and a reload to another base starts that base's log (the updates
applied to the old base are not carried over: the new checkpoint is expected to hold them; `embserve compact`
folds a log into a new base).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from embserve.embeddings import ServingModel
from embserve.embeddings.compact import carry_over
from embserve.embeddings.delta_log import DeltaLog, DeltaRecord, RowFormat, default_log_dir, delta_log_path
from embserve.embeddings.errors import UpdateRefused
from embserve.embeddings.row_updates import EncodedRows, RowWriter, check_rows

from .config import UpdatesConfig
from .errors import Overloaded
from .metrics import ServerMetrics

__all__ = ["Applied", "RowUpdater", "UpdatesState", "log_dir_for", "lower_priority", "version_of", "versioned"]

logger = logging.getLogger(__name__)

_REPLAY_BYTES = 64 << 20  # records read at once while replaying or catching up


@dataclasses.dataclass(frozen=True)
class Applied:
    """An applied update: its sequence in the log and the version lookups now report."""

    sequence: int
    version: str
    rows: int


def log_dir_for(config: UpdatesConfig, checkpoint: str | None) -> Path:
    """Where the delta logs live: the configured directory, or `<checkpoint>.updates` beside the checkpoint."""
    if config.log_dir is not None:
        return Path(config.log_dir)
    if checkpoint is None:
        raise ValueError("row updates need --updates-dir when the model has no checkpoint (a seeded init)")
    return default_log_dir(checkpoint)


def version_of(base: str, sequence: int) -> str:
    """The version served after update `sequence` over `base`: `<base>+<sequence>` (the base alone before any)."""
    return f"{base}+{sequence}" if sequence else base


def versioned(model: ServingModel, base: str, sequence: int) -> ServingModel:
    """`model` (the same weights) reporting the version after update `sequence` over `base`."""
    version = version_of(base, sequence)
    return model if model.version == version else dataclasses.replace(model, version=version)


@dataclasses.dataclass
class UpdatesState:
    """One base's updates in this process: the model they are written into, its log, and how far it was read."""

    model: ServingModel
    base: str
    log: DeltaLog
    writer: RowWriter
    offset: int
    sequence: int
    checkpoint: str | None = None  # the base's file or directory

    @classmethod
    def open(cls, model: ServingModel, log_dir: Path, *, fsync: bool, checkpoint: str | None) -> UpdatesState:
        """Opens (or creates) the log of `model`'s base (`checkpoint`'s) and replays it into `model`'s weights
        (blocking; the model must not be serving yet): for a compacted base, after carrying over the updates its old
        log gained since. Returns the state with the model at `<base>+<last sequence>`."""
        base = model.version
        log = DeltaLog(delta_log_path(log_dir, base), base, fsync=fsync)
        state = cls(model, base, log, RowWriter(model), log.data_start, 0, checkpoint)
        try:
            carried = carry_over(
                log, checkpoint
            )  # a compacted base: the updates its old log gained since the compaction
            if carried:
                logger.info("updates carried over from the compacted base's log", extra={"updates": carried})
            started, rows = time.perf_counter(), 0
            while records := state.pending():  # read a bounded batch of records at a time, to the end
                for record in records:
                    state.writer.write(state.encode(record))
                    state.advance(record)
                    rows += len(record.ids)
            if state.sequence:
                logger.info(
                    "delta log replayed",
                    extra={
                        "base": base,
                        "sequence": state.sequence,
                        "rows": rows,
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
        except BaseException:
            log.close()
            raise
        state.model = versioned(model, base, state.sequence)
        return state

    def pending(self) -> list[DeltaRecord]:
        """Records appended since this process last read (up to `_REPLAY_BYTES` of them)."""
        return list(self.log.read(self.offset, limit_bytes=_REPLAY_BYTES))

    def encode(self, record: DeltaRecord) -> EncodedRows:
        try:
            return self.writer.encode(record.table, record.ids, record.rows, record.row_format)
        except UpdateRefused as err:
            raise UpdateRefused(f"delta log {str(self.log.path)!r}, update {record.sequence}: {err}") from None

    def advance(self, record: DeltaRecord) -> None:
        if record.sequence != self.sequence + 1:
            raise UpdateRefused(
                f"delta log {str(self.log.path)!r}: update {record.sequence} follows {self.sequence}; the log is "
                "damaged"
            )
        self.offset, self.sequence = record.end, record.sequence


def lower_priority(nice: int, pid: int | None = None) -> None:
    """Makes process `pid`, by default the calling thread (Linux schedules threads alone), `nice` steps nicer;
    elsewhere nothing changes."""
    if nice and sys.platform == "linux":
        target = threading.get_native_id() if pid is None else pid
        try:
            os.setpriority(os.PRIO_PROCESS, target, os.getpriority(os.PRIO_PROCESS, target) + nice)
        except OSError as err:  # refused by a sandbox: it keeps the server's priority
            logger.warning("could not lower a priority", extra={"pid": target, "error": str(err)})


class _Executor(Protocol):  # what the updater needs of BatchExecutor
    @property
    def model(self) -> ServingModel: ...
    def swap_model(self, model: ServingModel) -> None: ...
    async def between_batches(self, work: Callable[[], float]) -> float: ...


class RowUpdater:
    """Applies row updates in this process, and follows what other processes append.

    Args:
        config: the updates settings.
        state: the served base's updates (`UpdatesState.open`), already replayed.
        executor: runs the writes between two batches (`between_batches`) and serves each new version
            (`swap_model`: the same weights under `<base>+<sequence>`) from the next batch on.
        metrics: rows, bytes, sequence and apply times are reported there.
        log_grew: told the base and its log's bytes after each update applied (the background compaction).
    """

    def __init__(
        self,
        config: UpdatesConfig,
        state: UpdatesState,
        *,
        executor: _Executor,
        metrics: ServerMetrics,
        log_grew: Callable[[str, int], None] | None = None,
    ):
        self.config = config
        self._log_grew = log_grew
        self._state = state
        self._executor = executor
        self._metrics = metrics
        self._lock = asyncio.Lock()  # one catch-up at a time: records are applied in order
        self._appending = asyncio.Lock()  # an update is logged and applied before a rebase moves to another log
        self._follower: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(  # checks, encodes and logs, below the lookups' priority
            1, thread_name_prefix="embserve-updates", initializer=lower_priority, initargs=(config.nice,)
        )
        metrics.update_sequence.set(state.sequence)
        metrics.update_log_bytes.set(state.log.size())

    @property
    def base(self) -> str:
        """The base whose log this process follows."""
        return self._state.base

    def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(self._follow(), name="embserve-updates-follower")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        self._pool.shutdown(wait=True)
        self._state.log.close()

    def check(self, table: str, ids: bytes, rows: bytes, row_format: RowFormat) -> tuple[np.ndarray, np.ndarray]:
        """The update's checked ids and rows; `UpdateRefused` naming the problem."""
        model = self._state.model
        try:
            config = model.table(table)
        except KeyError:
            raise UpdateRefused(f"unknown table {table!r}; the model's tables are {list(model.keys)}") from None
        reason = self._state.writer.writable(table)
        if reason is not None:
            raise UpdateRefused(f"table {table!r} cannot be updated: {reason}")
        return check_rows(
            config,
            model.serving_dtype(table),
            ids,
            rows,
            row_format,
            max_rows=self.config.max_rows_per_message,
        )

    async def apply(self, table: str, update_id: str, ids: bytes, rows: bytes, row_format: RowFormat) -> Applied:
        """Checks, logs and applies one update; returns once this process serves it.

        Raises:
            UpdateRefused: the update does not fit its table; nothing of it was logged or applied.
            Overloaded: the log is at its bound (`max_log_bytes`); nothing of it was logged or applied.
        """
        loop = asyncio.get_running_loop()
        async with self._appending:
            state = self._state

            def prepare() -> tuple[np.ndarray, EncodedRows, DeltaRecord]:  # one thread hop: check, encode, log
                checked_ids, checked_rows = self.check(table, ids, rows, row_format)
                held = state.log.size()
                if held + checked_ids.nbytes + checked_rows.nbytes > self.config.max_log_bytes:
                    raise Overloaded(
                        f"the delta log holds {held} bytes and this update would take it over the server's "
                        f"max_log_bytes {self.config.max_log_bytes}: compact it (embserve compact) and reload"
                    )
                encoded = state.writer.encode(table, checked_ids, checked_rows, row_format)
                return checked_ids, encoded, state.log.append(table, update_id, row_format, checked_ids, checked_rows)

            checked_ids, encoded, record = await loop.run_in_executor(self._pool, prepare)
            await self._catch_up(state, mine=(record, encoded))
        return Applied(record.sequence, version_of(state.base, record.sequence), len(checked_ids))

    async def _follow(self) -> None:
        interval = self.config.poll_interval_ms / 1e3
        while True:
            await asyncio.sleep(interval)
            state = self._state
            if self._appending.locked():  # this process is appending: it applies what precedes its record too
                continue
            try:
                if state.log.size() > state.offset:
                    await self._catch_up(state)
            except Exception as err:  # a damaged log: logged, and retried at the next poll
                logger.error("could not apply the delta log's updates", extra={"error": f"{type(err).__name__}: {err}"})

    async def _catch_up(self, state: UpdatesState, mine: tuple[DeltaRecord, EncodedRows] | None = None) -> None:
        """Applies every record appended since this process last read, in order, each between two batches; `mine`:
        a record this process just appended, already encoded (applied without reading it back when it is next)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while state is self._state:
                if mine is not None and mine[0].sequence <= state.sequence:
                    return
                if mine is not None and mine[0].start == state.offset:
                    await self._write(state, *mine)
                    return
                records = await loop.run_in_executor(self._pool, state.pending)
                if not records:
                    return
                for record in records:
                    if mine is not None and record.sequence == mine[0].sequence:
                        await self._write(state, record, mine[1])
                    elif record.sequence > state.sequence:
                        await self._write(state, record, await loop.run_in_executor(self._pool, state.encode, record))
                if mine is None:
                    return

    async def _write(self, state: UpdatesState, record: DeltaRecord, encoded: EncodedRows) -> None:
        executor = self._executor

        def write() -> float:
            started = time.perf_counter()
            state.writer.write(encoded)
            state.advance(record)
            state.model = versioned(state.model, state.base, state.sequence)
            if executor.model.module is state.model.module:  # still the served model (not swapped by a reload)
                executor.swap_model(state.model)
            return time.perf_counter() - started

        seconds = await executor.between_batches(write)
        self._metrics.update_apply_seconds.observe(seconds)
        self._metrics.update_rows.inc(len(record.ids))
        self._metrics.update_bytes.inc(record.rows.nbytes)
        self._metrics.update_sequence.set(state.sequence)
        log_bytes = state.log.size()
        self._metrics.update_log_bytes.set(log_bytes)
        if self._log_grew is not None and state is self._state:
            self._log_grew(state.base, log_bytes)

    async def rebase(self, state: UpdatesState) -> None:
        """Follows `state` (a new base, already replayed, now swapped in) from now on; the old log is closed. Updates
        its compacted-from log gained since `state` was opened are carried over and applied."""
        async with self._appending:
            async with self._lock:
                old, self._state = self._state, state
            old.log.close()
            if await asyncio.get_running_loop().run_in_executor(None, carry_over, state.log, state.checkpoint):
                await self._catch_up(state)
        self._metrics.update_sequence.set(state.sequence)
        self._metrics.update_log_bytes.set(state.log.size())
