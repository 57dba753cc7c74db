"""The delta log: records read back as written, in order, across processes' handles; a half-written record is
never read and is cut off by the next writer; a log of another base is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from embserve.embeddings.delta_log import DeltaLog, RowFormat, delta_log_path
from embserve.embeddings.errors import CheckpointError


def _append(log: DeltaLog, n: int, value: int) -> None:
    ids = np.arange(n, dtype=np.int64) * 3
    rows = np.full((n, 8), value, dtype=np.uint8)
    log.append("user", f"u{value}", RowFormat.SERVING, ids, rows)


def test_records_read_back_in_order_with_their_content(tmp_path: Path) -> None:
    log = DeltaLog(delta_log_path(tmp_path, "base-1"), "base-1")
    for value in (1, 2, 3):
        _append(log, value, value)
    records = list(log.read())
    assert [r.sequence for r in records] == [1, 2, 3]
    assert [r.update_id for r in records] == ["u1", "u2", "u3"]
    for r in records:
        assert r.table == "user" and r.row_format is RowFormat.SERVING
        np.testing.assert_array_equal(r.ids, np.arange(r.sequence) * 3)
        assert (r.rows == r.sequence).all() and r.rows.shape == (r.sequence, 8)
    assert list(log.read(records[1].end))[0].sequence == 3


def test_a_second_handle_sees_appends_and_continues_the_sequence(tmp_path: Path) -> None:
    path = delta_log_path(tmp_path, "b")
    first, second = DeltaLog(path, "b"), DeltaLog(path, "b")
    _append(first, 2, 1)
    _append(second, 2, 2)  # the other handle's record is found under the lock: sequence 2, not 1
    _append(first, 2, 3)
    assert [r.sequence for r in DeltaLog(path, "b").read()] == [1, 2, 3]


def test_a_half_written_record_is_never_read_and_is_cut_off_by_the_next_writer(tmp_path: Path) -> None:
    path = delta_log_path(tmp_path, "b")
    log = DeltaLog(path, "b")
    _append(log, 4, 1)
    whole = path.stat().st_size
    _append(log, 4, 2)
    with open(path, "r+b") as f:  # a writer killed in the middle of its record
        f.truncate(path.stat().st_size - 5)
    reader = DeltaLog(path, "b")  # opening repairs the tail
    assert [r.sequence for r in reader.read()] == [1]
    assert path.stat().st_size == whole
    _append(reader, 1, 9)
    assert [(r.sequence, int(r.rows[0, 0])) for r in DeltaLog(path, "b").read()] == [(1, 1), (2, 9)]


def test_a_damaged_record_stops_reading_there(tmp_path: Path) -> None:
    path = delta_log_path(tmp_path, "b")
    log = DeltaLog(path, "b")
    for value in (1, 2, 3):
        _append(log, 2, value)
    second = list(log.read())[0].end
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"\xff", second + 20)  # a byte of record 2's payload: its checksum no longer matches
    os.close(fd)
    assert [r.sequence for r in log.read()] == [1]


def test_a_log_of_another_base_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.deltas"
    DeltaLog(path, "base-a")
    with pytest.raises(CheckpointError, match="base-a.*not over 'base-b'"):
        DeltaLog(path, "base-b")
    path.write_bytes(b"not a log at all")
    with pytest.raises(CheckpointError, match="not a delta log"):
        DeltaLog(path, "base-a")
