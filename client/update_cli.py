"""`embserve update`: push row deltas to a running server (UpdateRows).

    embserve update --address 127.0.0.1:50051 deltas/          # every *.safetensors file in it, in name order
    embserve update --address 127.0.0.1:50051 step-1200.safetensors --token "$WRITER_TOKEN"

A delta file is a safetensors file holding, for each table it updates, `<table>.ids` (integers `[n]`, row
numbers) and `<table>.rows` (float32 or float16 `[n, embedding_dim]`: the rows' new values, converted by the server
to the table's serving type). A training job writes one with, for example, the ids torchrec's `ModelDeltaTracker`
reports (`get_unique_ids()`) and the trained module's current rows for them (docs/client.md). Each table's rows go
in messages of at most `--rows-per-message` rows over one stream; the server applies them in order. One line per
file; the first refused update stops the command with its reason (exit 1); a file that cannot be read exits 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import EmbserveError
from .sync import Client
from .updates import RowUpdate

__all__ = ["read_delta", "update_command"]

DEFAULT_ROWS_PER_MESSAGE = 4096


class DeltaFileError(ValueError):
    """A delta file that cannot be read or does not hold `<table>.ids` / `<table>.rows` pairs."""


def read_delta(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each table's (ids, float32 rows) in a delta file; `DeltaFileError` naming the file and tensor at fault."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as err:
        raise DeltaFileError(f"{path}: not a readable safetensors file ({err})") from None
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in sorted(tensors):
        table, _, kind = name.rpartition(".")
        if kind not in ("ids", "rows") or not table:
            raise DeltaFileError(f"{path}: tensor {name!r} is neither '<table>.ids' nor '<table>.rows'")
        if kind == "rows":
            continue
        if f"{table}.rows" not in tensors:
            raise DeltaFileError(f"{path}: {table}.ids has no {table}.rows")
        ids, rows = tensors[name], tensors[f"{table}.rows"]
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DeltaFileError(f"{path}: {name} must be a 1-d integer tensor, got {ids.dtype} {list(ids.shape)}")
        if rows.ndim != 2 or rows.shape[0] != ids.shape[0] or rows.dtype not in (np.float32, np.float16):
            raise DeltaFileError(
                f"{path}: {table}.rows must be float32 or float16 [{ids.shape[0]}, dim], got {rows.dtype} "
                f"{list(rows.shape)}"
            )
        tables[table] = (ids.astype(np.int64), rows.astype(np.float32))
    for name in tensors:
        table = name.rpartition(".")[0]
        if name.endswith(".rows") and table not in tables:
            raise DeltaFileError(f"{path}: {name} has no {table}.ids")
    if not tables:
        raise DeltaFileError(f"{path}: no '<table>.ids' / '<table>.rows' tensors")
    return tables


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise DeltaFileError(f"{p}: no *.safetensors delta files in it")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DeltaFileError(f"{p}: no such file or directory")
    return files


def _messages(path: Path, tables: dict[str, tuple[np.ndarray, np.ndarray]], per_message: int) -> Iterator[RowUpdate]:
    for table, (ids, rows) in tables.items():
        for start in range(0, len(ids), per_message):
            part = slice(start, start + per_message)
            yield RowUpdate(table, ids[part], rows[part], update_id=f"{path.name}:{table}:{start}")


def update_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Push row deltas (safetensors files of `<table>.ids` and `<table>.rows`) to a running server."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="delta files, or folders of *.safetensors files")
    parser.add_argument("--address", default="127.0.0.1:50051", metavar="HOST:PORT", help="the server")
    parser.add_argument("--token", help="bearer token of a writer (its tokens-file line names UpdateRows)")
    parser.add_argument(
        "--rows-per-message",
        type=int,
        default=DEFAULT_ROWS_PER_MESSAGE,
        help=f"rows per update message (default: {DEFAULT_ROWS_PER_MESSAGE}; the server bounds it too)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each file's updates")
    return run_update


def run_update(args: argparse.Namespace) -> int:
    if args.rows_per_message < 1:
        print(f"embserve update: --rows-per-message must be >= 1, got {args.rows_per_message}")
        return 2
    try:
        files = _files(args.paths)
        deltas = [(path, read_delta(path)) for path in files]
    except DeltaFileError as err:
        print(f"embserve update: {err}")
        return 2
    with Client(args.address, token=args.token, timeout=args.timeout) as client:
        for path, tables in deltas:
            try:
                outcomes = client.update_many(_messages(path, tables, args.rows_per_message))
            except EmbserveError as err:
                print(f"embserve update: {path}: {err}")
                return 1
            refused = next((o for o in outcomes if isinstance(o, EmbserveError)), None)
            applied = [o for o in outcomes if not isinstance(o, EmbserveError)]
            rows = sum(o.rows for o in applied)
            version = applied[-1].model_version if applied else "unchanged"
            print(f"{path}: {len(tables)} tables, {rows:,} rows applied, serving {version}")
            if refused is not None:
                print(f"embserve update: {path}: an update was refused: {refused}")
                return 1
    return 0
