"""A model's rows for several processes at once: one row file per table, in memory files or on disk, that every
worker of `--workers N` maps, so that N workers keep one copy of the weights, and a new version reaches running
workers without new processes.

The supervisor prepares them: from a checkpoint file (or the seeded init) each table is encoded once into a memory
file (Linux `memfd`); from a row directory, `mmap` tables are their files on disk and `memory` tables are copied
into memory files. Workers inherit the descriptors when forked, or receive them over a Unix socket on reload, and
build the fused engine over them (`serving_model`): nothing is copied per worker, and the page cache or the memory
files are shared. Row updates written into a memory file are seen by every worker that maps it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import EmbeddingBagConfig, ModelConfig, Storage
from .errors import CheckpointError, StorageFailed
from .large_embeddings import LargeEmbeddings
from .row_directory import is_row_directory, row_directory_version, row_file_path
from .row_files import DATA_OFFSET, RowFileWriter, encode_rows, read_header
from .serving import ServingModel, resolve_storage, serving_model_from_rows
from .weights import checkpoint_version, init_weights, load_checkpoint, table_weights

__all__ = ["SharedRows"]

_COPY_BYTES = 64 << 20
_ENCODE_BYTES = 64 << 20


@dataclasses.dataclass
class SharedRows:
    """One model version's tables as open row files, mapped by every process that serves it.

    Attributes:
        config: the model.
        version: the version its answers name.
        storage: each table's storage.
        fds: each table's open row file (a memory file, or an `mmap` table's file on disk).
        paths: the on-disk row file of `mmap` tables (the others are memory files), for checks and messages.
    """

    config: ModelConfig
    version: str
    storage: dict[str, Storage]
    fds: dict[str, int]
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def prepare(
        cls,
        config: ModelConfig,
        *,
        checkpoint: str | Path | None,
        seed: int = 0,
        default_storage: Storage | str = Storage.MEMORY,
        version: str | None = None,
    ) -> SharedRows:
        """Each table's row file from a checkpoint file, the seeded init, or a row directory (see the module)."""
        storage = resolve_storage(config, default_storage)
        fds: dict[str, int] = {}
        paths: dict[str, Path] = {}
        try:
            if checkpoint is not None and is_row_directory(checkpoint):
                for table in config.tables:
                    path = row_file_path(checkpoint, table.name)
                    if storage[table.name] is Storage.MMAP:
                        fds[table.name] = os.open(path, os.O_RDONLY)
                        paths[table.name] = path
                    else:
                        fds[table.name] = _memory_copy(path, table.name)
                return cls(config, version or row_directory_version(config, checkpoint), storage, fds, paths)
            away = [n for n, kind in storage.items() if kind is not Storage.MEMORY]
            if away:
                raise StorageFailed(f"table {away[0]!r} has storage {storage[away[0]].value}: it needs a row directory")
            model = LargeEmbeddings(config, device="cpu")
            if checkpoint is not None:
                version = version or checkpoint_version(checkpoint, load_checkpoint(model, checkpoint))
            else:
                init_weights(model, seed)
                version = version or f"init-{seed}"
            weights = table_weights(model)
            for table in config.tables:
                fds[table.name] = _memory_rows(weights[table.name], table, version)
                del weights[table.name]  # the float table is freed as soon as it is encoded
            return cls(config, version, storage, fds, paths)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise

    def serving_model(self, fds: Mapping[str, int] | None = None, *, copy_on_write: bool = False) -> ServingModel:
        """The fused engine over these rows, mapped in place (on the CPU); `fds`: descriptors this process received
        for them, instead of the ones it inherited; `copy_on_write`: mapped private and writable (row updates:
        each process writes its own copy of the pages it updates, the rest stay shared)."""
        return serving_model_from_rows(
            self.config,
            dict(fds or self.fds),
            storage=self.storage,
            version=self.version,
            map_memory=True,
            copy_on_write=copy_on_write,
        )

    def check_files(self) -> None:
        """`StorageFailed` naming the table when an on-disk row file was truncated since it was opened."""
        for name, path in self.paths.items():
            try:
                read_header(path, self.fds[name])  # checks the size against the header's
            except CheckpointError as err:
                raise StorageFailed(f"table {name!r}: {err}") from None

    def close(self) -> None:
        """Closes this process's descriptors (the mappings of the processes serving them stay)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _memory_rows(weights: torch.Tensor, table: EmbeddingBagConfig, version: str) -> int:
    """A memory file holding `weights` encoded as `table`'s row file."""
    dtype = table.effective_serving_dtype
    writer = RowFileWriter(
        None,
        table=table.name,
        num_embeddings=table.num_embeddings,
        embedding_dim=table.embedding_dim,
        serving_dtype=dtype,
        source=version,
    )
    try:
        step = max(1, _ENCODE_BYTES // max(1, weights.shape[1] * 4))
        for start in range(0, weights.shape[0], step):
            writer.write(start, encode_rows(weights[start : start + step], dtype))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.fd


def _memory_copy(path: Path, table: str) -> int:
    """A memory file holding a copy of a row file."""
    read_header(path)
    fd = os.memfd_create(f"embserve-{table}", 0)
    try:
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            os.ftruncate(fd, size)
            done = 0
            while done < size:  # in the kernel, without passing through this process
                n = os.copy_file_range(source.fileno(), fd, min(_COPY_BYTES, size - done), done, done)
                if n <= 0:
                    break
                done += n
            if done < size:
                raise StorageFailed(f"table {table!r}: row file {str(path)!r} ended at {done} bytes of {size}")
    except BaseException:
        os.close(fd)
        raise
    if size < DATA_OFFSET:
        os.close(fd)
        raise StorageFailed(f"table {table!r}: row file {str(path)!r} has no rows")
    return fd
