"""Row directories: a model's tables as row files (`<table>.safetensors`, see `row_files`), beside the model YAML.

`embserve export --storage mmap` and `embserve convert --storage mmap` write one; `embserve serve --checkpoint
DIR` serves it, each table in its storage. A directory's version is `<directory name>-<digest>`, the digest taken
over the row files' recorded digests, so it is known from their headers alone, without reading any row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import LargeEmbeddingsConfig, ModelConfig, ServingDType, Storage
from .errors import CheckpointError
from .row_files import RowFileHeader, RowFileWriter, encode_rows, read_header, verify_row_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_FILE",
    "check_row_directory",
    "is_row_directory",
    "row_directory_version",
    "row_file_path",
    "verify_row_directory",
    "write_row_directory",
]

MODEL_FILE = "model.yaml"
_CHUNK_BYTES = 64 << 20  # float rows converted per step


def row_file_path(directory: str | Path, table: str) -> Path:
    """Where a row directory keeps table `table`'s rows."""
    return Path(directory) / f"{table}.safetensors"


def is_row_directory(path: str | Path) -> bool:
    return Path(path).is_dir()


def _headers(config: LargeEmbeddingsConfig, directory: Path) -> Iterator[tuple[str, RowFileHeader]]:
    for table in config.tables:
        path = row_file_path(directory, table.name)
        if not path.is_file():
            raise CheckpointError(f"table {table.name!r}: no row file {str(path)!r} in {str(directory)!r}")
        yield table.name, read_header(path)


def check_row_directory(
    config: LargeEmbeddingsConfig, directory: str | Path, serving_dtypes: Mapping[str, ServingDType]
) -> dict[str, RowFileHeader]:
    """Checks, from the headers and sizes alone, that a directory holds a complete row file for every table, with
    its rows, dim and serving dtype. Torch-free.

    Raises:
        CheckpointError: naming the table and the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"row directory {str(directory)!r} does not exist")
    headers = dict(_headers(config, directory))
    for table in config.tables:
        h = headers[table.name]
        expected = (table.name, table.num_embeddings, table.embedding_dim, serving_dtypes[table.name])
        got = (h.table, h.num_embeddings, h.embedding_dim, h.serving_dtype)
        if got != expected:
            raise CheckpointError(
                f"table {table.name!r}: row file {str(row_file_path(directory, table.name))!r} holds {got[0]!r} "
                f"{got[1]} x {got[2]} {got[3].value}, the model says {expected[1]} x {expected[2]} "
                f"{expected[3].value}"
            )
    return headers


def row_directory_version(config: LargeEmbeddingsConfig, directory: str | Path) -> str:
    """`<directory name>-<digest>`: the digest of the tables' recorded digests, in config order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name, header in _headers(config, directory):
        h.update(f"{name}:{header.digest};".encode())
    return f"{directory.resolve().name}-{h.hexdigest()[:12]}"


def verify_row_directory(config: LargeEmbeddingsConfig, directory: str | Path) -> list[RowFileHeader]:
    """Reads every row of every table and checks it against its recorded digest.

    Raises:
        CheckpointError: naming the first table whose rows do not match.
    """
    directory = Path(directory)
    return [verify_row_file(row_file_path(directory, t.name)) for t in config.tables]


def write_row_directory(
    config: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    directory: str | Path,
    *,
    source: str = "",
    storage: Storage | None = None,
) -> str:
    """Writes every table's float weights (`[rows, dim]`) as row files in its serving dtype, and the model YAML
    (with `storage` set on every table when given); returns the directory's version.

    Raises:
        CheckpointError: the directory cannot be written.
    """
    from .convert import write_model_yaml

    directory = Path(directory)
    if not directory.parent.is_dir():
        raise CheckpointError(f"cannot write {str(directory)!r}: folder {str(directory.parent)!r} does not exist")
    directory.mkdir(exist_ok=True)
    for table in config.tables:
        tensor = weights[table.name]
        dtype = table.effective_serving_dtype
        with RowFileWriter(
            row_file_path(directory, table.name),
            table=table.name,
            num_embeddings=table.num_embeddings,
            embedding_dim=table.embedding_dim,
            serving_dtype=dtype,
            source=source,
        ) as writer:
            step = max(1, _CHUNK_BYTES // max(1, table.embedding_dim * 4))
            for start in range(0, table.num_embeddings, step):
                writer.write(start, encode_rows(tensor[start : start + step], dtype))
            writer.finish()
    if storage is not None:
        config = config.model_copy(
            update={"tables": [t.model_copy(update={"storage": storage}) for t in config.tables]}
        )
    write_model_yaml(config, directory / MODEL_FILE)
    return row_directory_version(config, directory)
