"""Compaction: a base checkpoint plus its delta log folded into a new base, written atomically.

A row directory compacts into a row directory: each table's rows copied from its row file with the updated rows
written over them, in the stored encoding (exact for every serving dtype). A checkpoint file compacts into a
safetensors file of float weights: float32 updates are written as the loader would read them; updates sent as
stored rows are decoded when the table stores fp32 or fp16, and refused for int8/int4 rows (a float checkpoint
cannot hold them exactly: compact a row directory instead).

The new base records the log it was folded from and how far (`compacted-from.json` in a row directory, the
`embserve.compacted_from` metadata of a safetensors file), so the record travels with it when it is renamed into
place. When a server opens the new base's log, updates the old log gained after that point (answered while the
compaction ran, or by servers still on the old base) are carried over into the new log first (`carry_over`), so
that moving to the compacted base loses no answered update.

`compact_in_place` compacts the base a server's `--checkpoint` names and puts the new base at that same path, so a
reload or a restart serves it: a safetensors file is replaced (renamed over), a row directory is written beside
the directory a symbolic link points to and the link is swapped. One compaction of a log runs at a time (an
exclusive lock in the log's folder), and a compaction that finds the path already holding another base than the
one it was asked to fold does nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, ServingDType
from .delta_log import DeltaLog, DeltaRecord, RowFormat, delta_log_path
from .errors import CheckpointError
from .row_directory import MODEL_FILE, is_row_directory, row_directory_version, row_file_path
from .row_files import DATA_OFFSET, RowFileWriter, encode_rows, read_header
from .state_keys import match_tables
from .weights import checkpoint_digest, checkpoint_version, read_state_dict

__all__ = [
    "Compaction",
    "base_version",
    "carry_over",
    "compact",
    "CompactionRunning",
    "compact_in_place",
    "compacted_from",
    "in_place_problem",
]

_CHUNK_ROWS_BYTES = 64 << 20
_CARRIED = "carried:"
FOLDED_FILE = "compacted-from.json"
FOLDED_KEY = "embserve.compacted_from"
LOCK_FILE = "compact.lock"


class CompactionRunning(CheckpointError):
    """Another process is compacting the same logs."""


@dataclasses.dataclass(frozen=True)
class Compaction:
    """A compacted base: where it is, its version, and what it folded."""

    output: Path
    version: str
    folded_base: str
    folded_through: int
    rows: int


def base_version(config: ModelConfig, checkpoint: str | Path) -> str:
    """The version a server reports for `checkpoint` before any update (the name of its delta log)."""
    if is_row_directory(checkpoint):
        return row_directory_version(config, checkpoint)
    return checkpoint_version(checkpoint, checkpoint_digest(checkpoint))


def _records(log: DeltaLog) -> Iterator[DeltaRecord]:
    offset = log.data_start
    while True:
        batch = list(log.read(offset, limit_bytes=64 << 20))
        if not batch:
            return
        yield from batch
        offset = batch[-1].end


def _stored(config: ModelConfig, record: DeltaRecord, dtype: ServingDType) -> np.ndarray:
    """A record's rows in `dtype`'s stored layout (uint8 [n, row_bytes])."""
    if record.row_format is RowFormat.FLOAT32:
        return encode_rows(torch.from_numpy(np.array(record.rows).view("<f4")), dtype)
    return np.array(record.rows)


def _compact_rows(
    config: ModelConfig, directory: Path, log: DeltaLog, output: Path, source: str, folded: dict[str, object]
) -> tuple[int, int]:
    latest: dict[str, dict[int, np.ndarray]] = {t.name: {} for t in config.tables}
    through = rows = 0
    for record in _records(log):
        table = config.tables[[t.name for t in config.tables].index(record.table)]
        stored = _stored(config, record, table.effective_serving_dtype)
        for i, row in zip(record.ids.tolist(), stored):
            latest[record.table][i] = row
        through, rows = record.sequence, rows + len(record.ids)
    output.mkdir()
    for table in config.tables:
        base = row_file_path(directory, table.name)
        header = read_header(base)
        width = header.row_bytes
        data = np.memmap(base, dtype=np.uint8, mode="r", offset=DATA_OFFSET, shape=(header.num_embeddings, width))
        updated = latest[table.name]
        ids = np.array(sorted(updated), dtype=np.int64)
        step = max(1, _CHUNK_ROWS_BYTES // width)
        with RowFileWriter(
            row_file_path(output, table.name),
            table=table.name,
            num_embeddings=table.num_embeddings,
            embedding_dim=table.embedding_dim,
            serving_dtype=header.serving_dtype,
            source=source,
        ) as writer:
            for start in range(0, header.num_embeddings, step):
                chunk = np.array(data[start : start + step])
                lo, hi = np.searchsorted(ids, [start, start + len(chunk)])
                for i in ids[lo:hi].tolist():
                    row = updated[i]
                    chunk[i - start, : len(row)] = row[:width]
                if chunk.any():
                    writer.write(start, chunk)
            writer.finish()
        del data
    shutil.copyfile(directory / MODEL_FILE, output / MODEL_FILE)
    (output / FOLDED_FILE).write_text(json.dumps({**folded, "through": through}))
    for name in (MODEL_FILE, FOLDED_FILE):  # the row files sync themselves
        _fsync(output / name)
    _fsync(output)
    return through, rows


def _float_rows(config: ModelConfig, record: DeltaRecord) -> torch.Tensor:
    table = next(t for t in config.tables if t.name == record.table)
    if record.row_format is RowFormat.FLOAT32:
        return torch.from_numpy(np.array(record.rows).view("<f4"))
    width, dim = record.rows.shape[1], table.embedding_dim
    if table.effective_serving_dtype in (ServingDType.INT8, ServingDType.INT4) and width not in (4 * dim, 2 * dim):
        raise CheckpointError(
            f"table {table.name!r}: update {record.sequence} holds {table.effective_serving_dtype.value} rows, which a "
            "float checkpoint cannot hold exactly; compact a row directory instead (embserve export --storage)"
        )
    kind = "<f4" if width == 4 * dim else "<f2"
    return torch.from_numpy(np.array(record.rows).view(kind).astype(np.float32))


def _compact_file(
    config: ModelConfig, checkpoint: Path, log: DeltaLog, output: Path, folded: dict[str, object]
) -> tuple[int, int]:
    """The checkpoint's state dict with the log's rows written into its tables, saved as safetensors: every key
    and dtype as the checkpoint has them (the loader converts them as it converted the original)."""
    from safetensors.torch import load_file, save_file

    if checkpoint.suffix == ".safetensors":
        state = load_file(str(checkpoint))
    else:
        state = read_state_dict(checkpoint)[0]
    keys = match_tables(config, {k: tuple(v.shape) for k, v in state.items()}, checkpoint)
    through = rows = 0
    with torch.no_grad():
        for record in _records(log):
            target = state[keys[record.table]]
            target[torch.from_numpy(np.array(record.ids))] = _float_rows(config, record).to(target.dtype)
            through, rows = record.sequence, rows + len(record.ids)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(output), metadata={FOLDED_KEY: json.dumps({**folded, "through": through})})
    _fsync(output)
    return through, rows


def compact(
    config: ModelConfig,
    checkpoint: str | Path,
    log_dir: str | Path,
    output: str | Path,
    *,
    replace: bool = False,
    unchanged: Callable[[], None] | None = None,
) -> Compaction:
    """Folds the delta log of `checkpoint`'s base (in `log_dir`) into a new base at `output` (a row directory for a
    row directory, else a safetensors file), written under a temporary name, synced and renamed, with what it
    folded. `replace`: a file at `output` (the checkpoint itself, say) is replaced; otherwise it is refused.
    `unchanged`: called just before the rename, raises to drop the output (the checkpoint changed meanwhile).

    Raises:
        CheckpointError: no log for the base, an output that exists, or updates a float checkpoint cannot hold.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    base = base_version(config, checkpoint)
    path = delta_log_path(log_dir, base)
    if not path.is_file():
        raise CheckpointError(f"no delta log of base {base!r} in {str(log_dir)!r} (looked for {path.name})")
    if output.exists() and not (replace and output.is_file()):
        raise CheckpointError(f"{str(output)!r} exists; compact into a new path")
    if not output.parent.is_dir():
        raise CheckpointError(f"cannot write {str(output)!r}: folder {str(output.parent)!r} does not exist")
    if not is_row_directory(checkpoint) and output.suffix != ".safetensors":
        raise CheckpointError(f"{str(output)!r}: a checkpoint file compacts into a .safetensors file")
    log = DeltaLog(path, base, fsync=False)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp{output.suffix}")
    folded: dict[str, object] = {"log": str(path.resolve()), "base": base}
    try:
        if is_row_directory(checkpoint):
            through, rows = _compact_rows(config, checkpoint, log, tmp, f"{base}+{log.sequence}", folded)
        else:
            through, rows = _compact_file(config, checkpoint, log, tmp, folded)
        if unchanged is not None:
            unchanged()
        os.replace(tmp, output)
        _fsync(output.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        log.close()
    return Compaction(output, base_version(config, output), base, through, rows)


def in_place_problem(checkpoint: str | Path) -> str | None:
    """Why `compact_in_place` cannot compact `checkpoint`, or None when it can."""
    path = Path(checkpoint)
    if path.is_symlink() and is_row_directory(path):
        return None
    if path.is_symlink():
        return "a symbolic link to a file is not replaced in place: point the checkpoint at the file itself"
    if is_row_directory(path):
        return (
            "a row directory is not replaced in place: point the checkpoint at a symbolic link to it (the compaction "
            "writes a new directory beside it and swaps the link)"
        )
    if path.is_file() and path.suffix == ".safetensors":
        return None
    return "only a .safetensors file, or a symbolic link to a row directory, is compacted in place"


def compact_in_place(
    config: ModelConfig, checkpoint: str | Path, log_dir: str | Path, *, if_base: str | None = None
) -> Compaction | None:
    """Compacts `checkpoint`'s base into a new base at the same path (see the module): a safetensors file replaced,
    or, for a symbolic link to a row directory, a new directory beside the one it points to and the link swapped.
    The earlier base's directory and log stay (servers still on them, and the carry-over, read them).

    Args:
        if_base: compact only if `checkpoint` still holds this base; None (nothing done) when it holds another
            (someone compacted it meanwhile).

    Raises:
        CompactionRunning: another compaction of the logs in `log_dir` is running.
        CheckpointError: a checkpoint that cannot be compacted in place, or any failure of `compact` (the
            checkpoint is then as it was).
    """
    checkpoint, log_dir = Path(checkpoint), Path(log_dir)
    problem = in_place_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{str(checkpoint)!r}: {problem}")
    if not log_dir.is_dir():
        raise CheckpointError(f"no delta logs in {str(log_dir)!r}: not a folder")
    fd = os.open(log_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionRunning(f"another compaction of the logs in {str(log_dir)!r} is running") from None
        _remove_stale(checkpoint)
        before = _identity(checkpoint)
        if if_base is not None and base_version(config, checkpoint) != if_base:
            return None

        def unchanged() -> None:
            if _identity(checkpoint) != before:
                raise CheckpointError(f"{str(checkpoint)!r} changed while it was compacted; nothing was replaced")

        if not checkpoint.is_symlink():
            return compact(config, checkpoint, log_dir, checkpoint, replace=True, unchanged=unchanged)
        target = checkpoint.resolve()
        output = _beside(target.parent, checkpoint.name)
        result = compact(config, checkpoint, log_dir, output)
        link = checkpoint.with_name(f".{checkpoint.name}.{os.getpid()}.link")
        try:
            unchanged()
            link.unlink(missing_ok=True)
            os.symlink(output.name if output.parent == checkpoint.parent.resolve() else str(output), link)
            os.replace(link, checkpoint)
        except BaseException:
            link.unlink(missing_ok=True)
            shutil.rmtree(output, ignore_errors=True)
            raise
        _fsync(checkpoint.parent)
        return dataclasses.replace(result, output=checkpoint)
    finally:
        os.close(fd)  # releases the lock


def _identity(checkpoint: Path) -> object:
    """What changes when someone replaces or rewrites the checkpoint: a file's inode, size and time; for a link to a
    row directory, where it points and the same of each of the directory's files."""

    def stat(path: Path) -> tuple[int, int, int, int]:
        st = path.stat()
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    if not checkpoint.is_symlink():
        return stat(checkpoint)
    return (os.readlink(checkpoint), [(f.name, stat(f)) for f in sorted(checkpoint.resolve().iterdir())])


def _remove_stale(checkpoint: Path) -> None:
    """Removes what an in-place compaction of `checkpoint` that was killed left (its temporary output and link);
    called under the lock, so no compaction is writing them."""
    if checkpoint.is_symlink():
        for tmp in checkpoint.resolve().parent.glob(f".{checkpoint.name}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        for link in checkpoint.parent.glob(f".{checkpoint.name}.*.link"):
            link.unlink(missing_ok=True)
    else:
        for tmp in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp{checkpoint.suffix}"):
            tmp.unlink(missing_ok=True)


def _beside(folder: Path, name: str) -> Path:
    """A new directory name in `folder`: `<name>.<UTC time>` (and a count, if taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output, n = folder / f"{name}.{stamp}", 1
    while output.exists() or output.is_symlink():
        output, n = folder / f"{name}.{stamp}.{n}", n + 1
    return output


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compacted_from(checkpoint: str | Path) -> dict[str, object] | None:
    """What a compacted base folded (the old log, its base, the last update folded), or None for another base."""
    path = Path(checkpoint)
    if path.is_dir():
        folded = path / FOLDED_FILE
        return dict(json.loads(folded.read_text())) if folded.is_file() else None
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(FOLDED_KEY)
    return dict(json.loads(text)) if text else None


def carry_over(log: DeltaLog, checkpoint: str | Path | None) -> int:
    """Copies into `log` the updates that the log `checkpoint` was compacted from gained after the compaction (see
    the module), once each, even when several processes open it at once; returns how many were carried."""
    info = compacted_from(checkpoint) if checkpoint is not None else None
    if info is None:
        return 0
    old_path = Path(str(info["log"]))
    if not old_path.is_file():
        return 0
    through = int(str(info["through"]))
    old = DeltaLog(old_path, str(info["base"]), fsync=False)
    try:

        def pending(done: int) -> list[tuple[str, str, RowFormat, np.ndarray, np.ndarray]]:
            later = [r for r in _records(old) if r.sequence > max(done, through)]
            return [(r.table, f"{_CARRIED}{r.sequence}:{r.update_id}", r.row_format, r.ids, r.rows) for r in later]

        return log.append_after(_carried_through, pending)
    finally:
        old.close()


def _carried_through(records: Iterator[DeltaRecord]) -> int:
    """The last old-log sequence already carried into a log (0: none)."""
    done = 0
    for r in records:
        if r.update_id.startswith(_CARRIED):
            done = max(done, int(r.update_id[len(_CARRIED) :].split(":", 1)[0]))
    return done
