"""gRPC <-> row updater for UpdateRows: row updates over one bidirectional stream, answered in order.

Each RowUpdate message is read, applied (`updater.RowUpdater.apply`: checked, logged, written between batches) and
answered before the next is read, so a stream holds at most one message and HTTP/2 flow control holds a writer
that sends faster than updates apply. A message that is refused is answered with its status (nothing of it
applied) and the stream goes on. Streams open at once are bounded (`updates.max_streams`). A server without
updates (read-only, the default) answers FAILED_PRECONDITION; a draining one answers new messages UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from embserve.embeddings.delta_log import RowFormat
from embserve.embeddings.errors import UpdateRefused
from embserve.v1 import embserve_pb2 as pb

from .decode import ECHO_CHARS, parse_message
from .errors import EmbserveError, status_code_of
from .frontdoor import FrontDoor
from .updater import RowUpdater

__all__ = ["UpdateServicer"]

logger = logging.getLogger(__name__)

METHOD = "UpdateRows"
READ_ONLY = "this server is read-only: row updates are off (start it with --updates)"


def _reply(update_id: str, code: grpc.StatusCode, message: str) -> pb.RowUpdateResult:
    return pb.RowUpdateResult(update_id=update_id, status=pb.Status(code=code.value[0], message=message))


class UpdateServicer:
    """UpdateRows over this process's row updater (None: a read-only server).

    Args:
        door: the server's front door (drain state, metrics).
        updater: applies the updates; None refuses every stream.
        max_streams: UpdateRows streams open at once; beyond it a stream is refused RESOURCE_EXHAUSTED.
    """

    def __init__(self, door: FrontDoor, updater: RowUpdater | None, *, max_streams: int) -> None:
        self._door = door
        self._updater = updater
        self._max_streams = max_streams
        self.open_streams = 0

    async def UpdateRows(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        door = self._door
        if self._updater is None:
            door.count(METHOD, grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, READ_ONLY)
        if self.open_streams >= self._max_streams:
            door.count(METHOD, grpc.StatusCode.RESOURCE_EXHAUSTED)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open_streams} UpdateRows streams are open, the server's max_streams; send updates over "
                "fewer streams",
            )
        self.open_streams += 1
        try:
            door.saw(context.peer())
            async for raw in requests:
                await context.write(await self._one(raw))
        finally:
            self.open_streams -= 1

    async def _one(self, raw: bytes) -> bytes:
        """One message's answer; every outcome is counted under its status code."""
        assert self._updater is not None
        door, start = self._door, time.perf_counter()
        update_id = ""
        try:
            update = parse_message(pb.RowUpdate, raw)
            update_id = update.update_id[:ECHO_CHARS]
            door.check_accepting()
            try:
                row_format = RowFormat(update.format or RowFormat.FLOAT32)
            except ValueError:
                raise UpdateRefused(f"unknown row format {update.format}") from None
            applied = await self._updater.apply(
                update.table[:ECHO_CHARS], update_id, update.ids, update.rows, row_format
            )
        except UpdateRefused as err:
            door.count(METHOD, grpc.StatusCode.INVALID_ARGUMENT, start)
            return _reply(update_id, grpc.StatusCode.INVALID_ARGUMENT, str(err)).SerializeToString()
        except EmbserveError as err:
            door.count(METHOD, status_code_of(err), start)
            return _reply(update_id, status_code_of(err), str(err)).SerializeToString()
        except Exception as err:  # the log could not be written (disk full, I/O error): nothing applied
            logger.error("row update failed", extra={"update_id": update_id, "error": f"{type(err).__name__}: {err}"})
            door.count(METHOD, grpc.StatusCode.INTERNAL, start)
            message = f"the update failed ({type(err).__name__}); the server's log has the error"
            return _reply(update_id, grpc.StatusCode.INTERNAL, message).SerializeToString()
        door.count(METHOD, grpc.StatusCode.OK, start)
        result = pb.RowUpdateResult(
            update_id=update_id, sequence=applied.sequence, model_version=applied.version, rows=applied.rows
        )
        return result.SerializeToString()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {METHOD: grpc.stream_stream_rpc_method_handler(self.UpdateRows)}  # bytes both ways
