"""The delta log: every row update a server applied over its base checkpoint, in order, durable before it is
answered, and replayed over the base at start-up and by every other process serving the same base.

One file per base version (`<log dir>/<base version>.deltas`). It starts with a header naming the base, then holds
records, each framed and checksummed:

    header:  b"EMBDELTA" | u32 length | base version (UTF-8)
    record:  b"RUPD" | u32 payload length | u32 crc32(payload) | payload
    payload: u64 sequence | u8 row format | u16 length | table | u16 length | update id | u32 rows | u32 row bytes
             | rows x int64 ids | rows x row bytes

Writers (any process serving the base) append under an exclusive `flock` of the file, with sequence numbers one
past the last record's; the process then reads what others appended from where it stopped. A record is complete
when its checksum matches: a reader stops at the first incomplete one (a writer may be writing it), and the next
writer cuts off a record a killed writer left half-written, so nothing but whole records is ever read. Torch-free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import CheckpointError

__all__ = ["DeltaLog", "DeltaRecord", "RowFormat", "default_log_dir", "delta_log_path"]

_MAGIC = b"EMBDELTA"
_RECORD = b"RUPD"
_FRAME = struct.Struct("<4sII")  # magic, payload length, crc32
_FIXED = struct.Struct("<QB")  # sequence, row format
_COUNTS = struct.Struct("<II")  # rows, row bytes
SUFFIX = ".deltas"


@enum.unique
class RowFormat(enum.IntEnum):
    """How an update's rows are encoded (the wire's RowFormat numbers)."""

    FLOAT32 = 1  # float32 values, converted to the table's serving type when applied
    SERVING = 2  # the table's stored row bytes, as they are


@dataclasses.dataclass(frozen=True)
class DeltaRecord:
    """One applied update: `rows` is `uint8 [len(ids), row_bytes]` in `row_format`; `start` and `end` are the file
    offsets of the record and of what follows it (where the next read starts)."""

    sequence: int
    table: str
    update_id: str
    row_format: RowFormat
    ids: np.ndarray
    rows: np.ndarray
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.rows.nbytes)


def default_log_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint's delta logs live unless told otherwise: `<checkpoint>.updates`, next to it."""
    path = Path(checkpoint)
    return path.parent / f"{path.name}.updates"


def delta_log_path(log_dir: str | Path, base_version: str) -> Path:
    """The log of updates over base `base_version` in `log_dir`."""
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in base_version)
    return Path(log_dir) / f"{safe}{SUFFIX}"


def _encode(
    sequence: int, table: str, update_id: str, row_format: RowFormat, ids: np.ndarray, rows: np.ndarray
) -> list[memoryview | bytes]:
    """A record as the buffers to write, in order: the frame, the fixed fields, and the ids and rows as they are
    (not copied: the checksum is taken over the parts)."""
    name, uid = table.encode(), update_id.encode()
    head = b"".join(
        (
            _FIXED.pack(sequence, int(row_format)),
            struct.pack("<H", len(name)),
            name,
            struct.pack("<H", len(uid)),
            uid,
            _COUNTS.pack(len(ids), rows.shape[1] if rows.ndim == 2 else 0),
        )
    )
    parts: list[memoryview | bytes] = [
        head,
        np.ascontiguousarray(ids, dtype="<i8").data.cast("B"),
        np.ascontiguousarray(rows, dtype=np.uint8).data.cast("B"),
    ]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [_FRAME.pack(_RECORD, sum(len(x) for x in parts), crc), *parts]


def _write(fd: int, parts: list[memoryview | bytes], offset: int) -> int:
    """Writes a record's parts at `offset`; returns its length (a short write is an `OSError`)."""
    length = sum(len(x) for x in parts)
    written = os.pwritev(fd, parts, offset)
    if written != length:
        os.ftruncate(fd, offset)
        raise OSError(f"short write to the delta log ({written} of {length} bytes)")
    return length


def _decode(payload: bytes, start: int, end: int) -> DeltaRecord:
    sequence, row_format = _FIXED.unpack_from(payload, 0)
    at = _FIXED.size
    (n,) = struct.unpack_from("<H", payload, at)
    table = payload[at + 2 : at + 2 + n].decode()
    at += 2 + n
    (n,) = struct.unpack_from("<H", payload, at)
    update_id = payload[at + 2 : at + 2 + n].decode()
    at += 2 + n
    count, row_bytes = _COUNTS.unpack_from(payload, at)
    at += _COUNTS.size
    ids = np.frombuffer(payload, dtype="<i8", count=count, offset=at)
    at += 8 * count
    rows = np.frombuffer(payload, dtype=np.uint8, count=count * row_bytes, offset=at).reshape(count, row_bytes)
    return DeltaRecord(sequence, table, update_id, RowFormat(row_format), ids, rows, start, end)


class DeltaLog:
    """The delta log of one base version, open for appending and reading.

    Args:
        path: the log file; created (with its header) when missing.
        base_version: the version of the checkpoint the updates apply over; an existing log of another base is
            refused.
        fsync: make each append durable (fsync) before `append` returns.
        max_record_bytes: the largest record a reader accepts (a larger length is a damaged record).
    """

    def __init__(self, path: str | Path, base_version: str, *, fsync: bool = True, max_record_bytes: int = 1 << 30):
        self.path = Path(path)
        self.base_version = base_version
        self._fsync = fsync
        self._max_record = max_record_bytes
        self._lock = threading.Lock()  # flock is per open file: threads of this process take this first
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            with self._locked():
                if os.fstat(self._fd).st_size == 0:
                    base = base_version.encode()
                    os.pwrite(self._fd, _MAGIC + struct.pack("<I", len(base)) + base, 0)
                    os.fsync(self._fd)
                    if created:
                        _fsync_dir(self.path.parent)
                self.data_start = self._check_header()
                self._end, self._sequence = self._scan(self.data_start, 0, repair=True)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def sequence(self) -> int:
        """The sequence of the last record this process knows of (0: none)."""
        return self._sequence

    def _check_header(self) -> int:
        head = os.pread(self._fd, 12, 0)
        if len(head) < 12 or head[:8] != _MAGIC:
            raise CheckpointError(f"delta log {str(self.path)!r} is not a delta log (bad header)")
        (n,) = struct.unpack_from("<I", head, 8)
        base = os.pread(self._fd, n, 12).decode(errors="replace")
        if base != self.base_version:
            raise CheckpointError(
                f"delta log {str(self.path)!r} holds updates over base {base!r}, not over {self.base_version!r}"
            )
        return 12 + int(n)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _scan(self, offset: int, sequence: int, *, repair: bool) -> tuple[int, int]:
        """The end of the last whole record from `offset` on, and its sequence; with `repair` (the lock held),
        cuts off what follows it (a record a killed writer left half-written)."""
        for record in self.read(offset):
            offset, sequence = record.end, record.sequence
        if repair and os.fstat(self._fd).st_size > offset:
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        return offset, sequence

    def append(
        self, table: str, update_id: str, row_format: RowFormat, ids: np.ndarray, rows: np.ndarray
    ) -> DeltaRecord:
        """Appends one update as the next sequence number (durable when the log fsyncs) and returns its record."""
        with self._locked():
            self._end, self._sequence = self._scan(self._end, self._sequence, repair=True)
            sequence = self._sequence + 1
            start = self._end
            self._end += _write(self._fd, _encode(sequence, table, update_id, row_format, ids, rows), start)
            if self._fsync:
                os.fdatasync(self._fd)
            self._sequence = sequence
            return DeltaRecord(sequence, table, update_id, row_format, ids, rows, start, self._end)

    def append_after(
        self,
        scan: Callable[[Iterator[DeltaRecord]], int],
        make: Callable[[int], list[tuple[str, str, RowFormat, np.ndarray, np.ndarray]]],
    ) -> int:
        """Under the lock: `scan` reads the whole log and returns a number, `make` turns it into updates (table,
        update id, format, ids, rows), appended in order and made durable together; returns how many. What another
        process appended in between is seen by `scan`, so two processes never append the same updates."""
        with self._locked():
            self._end, self._sequence = self._scan(self._end, self._sequence, repair=True)
            entries = make(scan(self.read()))
            for table, update_id, row_format, ids, rows in entries:
                parts = _encode(self._sequence + 1, table, update_id, row_format, ids, rows)
                self._end += _write(self._fd, parts, self._end)
                self._sequence += 1
            if entries:
                os.fdatasync(self._fd)
            return len(entries)

    def read(self, offset: int | None = None, *, limit_bytes: int | None = None) -> Iterator[DeltaRecord]:
        """The whole records from `offset` (by default the first) on, in order; stops at the first incomplete or
        damaged one, or once `limit_bytes` of records were read."""
        offset = self.data_start if offset is None else offset
        taken = 0
        while limit_bytes is None or taken < limit_bytes:
            frame = os.pread(self._fd, _FRAME.size, offset)
            if len(frame) < _FRAME.size:
                return
            magic, length, crc = _FRAME.unpack(frame)
            if magic != _RECORD or length > self._max_record:
                return
            payload = os.pread(self._fd, length, offset + _FRAME.size)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            start, offset = offset, offset + _FRAME.size + length
            taken += _FRAME.size + length
            yield _decode(payload, start, offset)

    def size(self) -> int:
        """The file's size now (other processes may have appended since this process last read)."""
        return int(os.fstat(self._fd).st_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
