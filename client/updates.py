"""Row updates from the SDK: the `RowUpdate` messages `Client.update_rows` sends, and what each answer says.

Rows are float32 values `[len(ids), embedding_dim]`, which the server converts to the table's serving type as its
checkpoint loader does; or, with `serving=True`, the table's stored row bytes as they are (fp32/fp16 values, or
the fused engine's int8/int4 layout: fp16 scale and bias, then the codes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from embserve.v1 import embserve_pb2 as pb

from .errors import EmbserveError, InvalidRequest, from_status

__all__ = ["Messages", "RowUpdate", "UpdateResult", "outcome", "update_message"]


@dataclasses.dataclass(frozen=True)
class RowUpdate:
    """Rows of one table to replace: `ids` (int64 row numbers) and `rows` (float32 `[len(ids), dim]`, or the stored
    bytes with `serving=True`)."""

    table: str
    ids: Any
    rows: Any
    update_id: str = ""
    serving: bool = False


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """An applied update: its sequence in the server's delta log, and the version lookups report once it applies
    (`<base>+<sequence>`)."""

    update_id: str
    sequence: int
    model_version: str
    rows: int

    @classmethod
    def from_proto(cls, message: pb.RowUpdateResult) -> UpdateResult:
        """The result, or the server's refusal raised as an `EmbserveError` (nothing of that update applied)."""
        if message.HasField("status") and message.status.code:
            raise from_status(message.status.code, message.status.message)
        return cls(message.update_id, message.sequence, message.model_version, message.rows)


def update_message(update: RowUpdate) -> pb.RowUpdate:
    """The wire message of one update; `InvalidRequest` when ids and rows cannot be encoded."""
    ids = np.asarray(update.ids)
    if ids.size == 0:  # an empty list reads as float64: the server names the problem (no ids)
        ids = ids.astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidRequest(
            f"table {update.table!r}: ids must be a 1-d array of integers, got {ids.dtype} {ids.shape}"
        )
    if update.serving:
        rows = update.rows if isinstance(update.rows, bytes) else np.ascontiguousarray(update.rows).tobytes()
        row_format = pb.ROW_FORMAT_SERVING
    else:
        values = np.asarray(update.rows)
        if values.ndim != 2 or values.shape[0] != len(ids):
            raise InvalidRequest(
                f"table {update.table!r}: rows must be [len(ids), dim] = [{len(ids)}, dim], got {values.shape}"
            )
        rows = np.ascontiguousarray(values, dtype="<f4").tobytes()
        row_format = pb.ROW_FORMAT_FLOAT32
    return pb.RowUpdate(
        update_id=update.update_id,
        table=update.table,
        ids=np.ascontiguousarray(ids, dtype="<i8").tobytes(),
        rows=rows,
        format=row_format,
    )


def outcome(answer: pb.RowUpdateResult) -> UpdateResult | EmbserveError:
    """An answer as its result, or its refusal as the `EmbserveError` it would raise."""
    try:
        return UpdateResult.from_proto(answer)
    except EmbserveError as err:
        return err


class Messages:
    """The wire messages of `updates`, encoded as the stream takes them (an endless iterator streams as it goes);
    an update that cannot be encoded ends the stream and is raised by `check` afterwards."""

    def __init__(self, updates: Iterable[RowUpdate]) -> None:
        self._updates = iter(updates)
        self.sent = 0
        self.error: EmbserveError | None = None

    def __iter__(self) -> Iterator[pb.RowUpdate]:
        for update in self._updates:
            try:
                message = update_message(update)
            except EmbserveError as err:
                self.error = err
                return
            self.sent += 1
            yield message

    def outcomes(self, answers: Iterable[pb.RowUpdateResult]) -> list[UpdateResult | EmbserveError]:
        """The outcome of each update sent, in order."""
        out = [outcome(a) for a in answers]
        if self.error is not None:
            raise self.error
        if len(out) != self.sent:
            raise EmbserveError(
                f"the server answered {len(out)} of {self.sent} updates and ended the stream", "UNKNOWN"
            )
        return out
