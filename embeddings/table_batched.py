"""The fused engine over row files: one fbgemm table-batched kernel per collection, reading each table where it is
stored.

The seed's module pools one collection of unweighted tables and one of weighted tables; here each collection is one
`IntNBitTableBatchedEmbeddingBagsCodegen` (the kernel torchrec's quantized inference collection runs), built without
weights of its own. On the CPU its host buffer is a `HostRegion` in which each table is its row file mapped in place
(`mmap` storage) or shared memory filled from it (`memory`); the kernel computes exactly what torchrec's collection
computes from the same rows. On CUDA each table goes to device memory (`memory`) or to fbgemm's managed caching
(`managed`: rows in host memory, a cache of `cache_load_factor` of them on the device), filled from its row file.

Before each batch `check_files` compares each mapped file with what was mapped (size, identity, modification
time): a file truncated or rewritten in place while served fails the batch naming the table, instead of the
process dying of SIGBUS when the kernel touches a page past the file's end.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import mmap
import os
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .config import EmbeddingBagConfig, ModelConfig, ServingDType, Storage
from .errors import CheckpointError, StorageFailed
from .host_region import PAGE_SIZE, HostRegion, page_round
from .row_files import DATA_OFFSET, ROW_ALIGNMENT, RowFileHeader, read_header

__all__ = ["TableBatchedEmbeddings", "TableStore"]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_LOAD_FACTOR = 0.2
PREFETCH_THREADS = 16  # pages read from disk at once while mapped tables are cold (16 measured best on this machine)
COLD_FAULTS = 16  # a batch that took more major page faults than this keeps the read-ahead on
_FILL_ROWS_BYTES = 64 << 20  # rows copied to a device per step


@dataclasses.dataclass
class TableStore:
    """Where one table's rows are served from."""

    name: str
    storage: Storage
    header: RowFileHeader
    path: Path
    fd: int = -1  # the row file, open; kept while it is mapped, to check it
    mapped: bool = False  # read in place (mmap storage, or memory shared by the supervisor) rather than copied
    region: HostRegion | None = None  # CPU: the collection's host range
    offset: int = 0  # where the table starts in it
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # (device, inode, size, mtime_ns) when mapped
    writable: bool = True  # rows can be written in place (mapped tables: only when mapped copy-on-write)

    @property
    def data_bytes(self) -> int:
        return self.header.data_bytes

    def resident_bytes(self) -> int:
        """Bytes of the table in memory now: all of a `memory` table, the pages of an `mmap` table in the page
        cache."""
        if self.mapped and self.region is not None:
            return self.region.resident_bytes(self.offset, self.data_bytes)
        return self.data_bytes

    def disk_bytes(self) -> int:
        """Bytes the row file takes on disk (a sparse file's holes take none; a memory file is not on disk)."""
        try:
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return 0

    def check(self) -> None:
        """`StorageFailed` when a mapped file is no longer what was mapped."""
        if self.fd < 0 or not self.mapped:
            return
        st = os.fstat(self.fd)
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if now == self.identity:
            return
        if st.st_size < self.identity[2]:
            what = f"was truncated to {st.st_size} bytes (it had {self.identity[2]})"
        else:
            what = "was rewritten in place"
        raise StorageFailed(
            f"table {self.name!r}: its row file {str(self.path)!r} {what} while served; replace row files by "
            "writing a new one and renaming it over the old, then reload"
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _sparse_type(dtype: ServingDType) -> object:
    from fbgemm_gpu.split_embedding_configs import SparseType

    return {
        ServingDType.FP32: SparseType.FP32,
        ServingDType.FP16: SparseType.FP16,
        ServingDType.INT8: SparseType.INT8,
        ServingDType.INT4: SparseType.INT4,
    }[dtype]


RowSource = Path | int
"""A row file: its path, or an open descriptor of it (a memory file handed from the supervisor to a worker)."""


def _open_table(
    table: EmbeddingBagConfig, source: RowSource, serving_dtype: ServingDType, storage: Storage, mapped: bool
) -> TableStore:
    """Opens a table's row file and checks its header against the table."""
    if isinstance(source, int):
        path, fd = Path(f"<shared rows of {table.name}>"), os.dup(source)
    else:
        path = Path(source)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"table {table.name!r}: cannot open row file {str(path)!r}: {err.strerror}") from None
    try:
        header = read_header(path, fd)
        expected = (table.name, table.num_embeddings, table.embedding_dim, serving_dtype)
        got = (header.table, header.num_embeddings, header.embedding_dim, header.serving_dtype)
        if got != expected:
            raise CheckpointError(
                f"table {table.name!r}: row file {str(path)!r} holds {got[0]!r} {got[1]} x {got[2]} {got[3].value}, "
                f"the model config says {expected[1]} x {expected[2]} {expected[3].value}"
            )
    except BaseException:
        os.close(fd)
        raise
    mapped = mapped or storage is Storage.MMAP
    return TableStore(table.name, storage, header, path, fd=fd, mapped=mapped, writable=not mapped)


class TableBatchedEmbeddings(nn.Module):
    """Pooled embeddings of the seed's two collections (unweighted tables, then weighted ones, each in config order)
    from row files, each table in its storage.

    Args:
        config: the tables.
        sources: each table's row file (a path, or an open descriptor, which is duplicated).
        serving_dtypes: each table's serving dtype (what its row file must hold).
        storage: each table's storage.
        device: `cpu`, or a CUDA device.
        cache_load_factor: for `managed` tables, the share of their rows the device cache holds.
        map_memory: map `memory` tables from their sources too, rather than copy them: the sources are memory
            already (the supervisor's memory files, shared by its workers).
        copy_on_write: map files private and writable, so that rows can be updated in place (`row_updates`): a
            page written becomes this process's own copy, the others stay shared; otherwise read-only.
    """

    def __init__(
        self,
        config: ModelConfig,
        sources: Mapping[str, RowSource],
        *,
        serving_dtypes: Mapping[str, ServingDType],
        storage: Mapping[str, Storage],
        device: torch.device,
        cache_load_factor: float = DEFAULT_CACHE_LOAD_FACTOR,
        map_memory: bool = False,
        copy_on_write: bool = False,
    ) -> None:
        super().__init__()
        self.copy_on_write = copy_on_write
        self.device = device
        self.groups = [[t for t in config.tables if not t.weighted], [t for t in config.tables if t.weighted]]
        self.groups = [g for g in self.groups if g]
        self.weighted = [g[0].weighted for g in self.groups]
        self.stores: dict[str, TableStore] = {}
        self.kernels = nn.ModuleList()
        try:
            for group in self.groups:
                stores = []
                for t in group:
                    stores.append(_open_table(t, sources[t.name], serving_dtypes[t.name], storage[t.name], map_memory))
                    self.stores[t.name] = stores[-1]
                if device.type == "cpu":
                    kernel = self._host_kernel(group, stores)
                else:
                    kernel = self._device_kernel(group, stores, cache_load_factor)
                self.kernels.append(kernel)
        except BaseException:
            self.close()
            raise
        self.keys = [t.name for group in self.groups for t in group]
        self.dims = [t.embedding_dim for group in self.groups for t in group]
        self.surgery_cut_point = nn.Identity()
        mapped = [[self.stores[t.name] if self.stores[t.name].mapped else None for t in g] for g in self.groups]
        self._prefetcher = _Prefetcher(mapped) if device.type == "cpu" and any(any(g) for g in mapped) else None

    def _kernel(
        self,
        group: Sequence[EmbeddingBagConfig],
        stores: Sequence[TableStore],
        locations: Sequence[object],
        **kwargs: object,
    ) -> Any:  # fbgemm's IntNBitTableBatchedEmbeddingBagsCodegen (fbgemm is untyped)
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        specs = [
            (t.name, t.num_embeddings, t.embedding_dim, _sparse_type(s.header.serving_dtype), location)
            for t, s, location in zip(group, stores, locations)
        ]
        return IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=specs,
            pooling_mode=PoolingMode.SUM,
            device=self.device,
            output_dtype=SparseType.FP32,
            row_alignment=ROW_ALIGNMENT,
            **kwargs,
        )

    def _host_kernel(self, group: Sequence[EmbeddingBagConfig], stores: Sequence[TableStore]) -> Any:
        """A kernel whose host buffer is a region holding each table in place."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

        for s in stores:
            if s.storage is Storage.MANAGED:
                raise CheckpointError(f"table {s.name!r}: managed storage needs a CUDA device; use memory or mmap")
        offsets, total = [], 0
        for s in stores:
            offsets.append(total)
            total += page_round(s.data_bytes)
        region = HostRegion(total)
        for s, offset in zip(stores, offsets):
            s.region, s.offset = region, offset
            if s.mapped:
                st = os.fstat(s.fd)
                s.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                region.map_file(offset, s.data_bytes, s.fd, DATA_OFFSET, copy_on_write=self.copy_on_write)
                s.writable = self.copy_on_write
                region.advise(offset, s.data_bytes, mmap.MADV_RANDOM)  # rows are read one at a time
            else:
                _read_rows(s.fd, s.path, region.map_memory(offset, s.data_bytes))
                s.close()  # copied: nothing to keep open
        kernel = self._kernel(group, stores, [EmbeddingLocation.HOST] * len(stores))
        # The kernel reads table t at weights_host + weights_offsets[t]: the region, built above, instead of a
        # buffer of its own (which it allocates only when asked to initialize its weights).
        kernel.weights_physical_offsets = offsets
        kernel.host_size = region.size
        kernel.weight_initialized = True
        kernel.initialize_logical_weights_placements_and_offsets()
        kernel.weights_host = region.tensor()
        return kernel

    def _device_kernel(
        self, group: Sequence[EmbeddingBagConfig], stores: Sequence[TableStore], cache_load_factor: float
    ) -> Any:
        """A CUDA kernel: `memory` tables in device memory, `managed` ones in fbgemm's managed caching (host memory
        with a device cache), each filled from its row file."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

        for s in stores:
            if s.storage is Storage.MMAP:
                raise CheckpointError(
                    f"table {s.name!r}: mmap storage serves from the CPU; on CUDA use memory or managed"
                )
        locations = [
            EmbeddingLocation.MANAGED_CACHING if s.storage is Storage.MANAGED else EmbeddingLocation.DEVICE
            for s in stores
        ]
        kernel = self._kernel(group, stores, locations, cache_load_factor=cache_load_factor)
        kernel.initialize_weights()
        for (weights, _, _), s in zip(kernel.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0), stores):
            _fill_device(s.fd, weights)
            s.close()
        if any(s.storage is Storage.MANAGED for s in stores):
            kernel.reset_cache_states()
        return kernel

    def check_files(self) -> None:
        """`StorageFailed` naming the table when a mapped row file is no longer what was mapped."""
        for store in self.stores.values():
            store.check()

    def close(self) -> None:
        """Closes the mapped files (the mappings themselves go with the kernels)."""
        for store in self.stores.values():
            store.close()
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools every bag; `features` holds every key, unweighted tables first, each collection in config order."""
        parts = features.split([len(g) for g in self.groups]) if len(self.groups) > 1 else [features]
        faults = self._prefetcher.before(parts) if self._prefetcher is not None else 0
        outputs = []
        for kernel, part, weighted in zip(self.kernels, parts, self.weighted):
            indices = part.values()
            offsets = part.offsets()
            if indices.device.type == "cpu":
                offsets = offsets.type(dtype=indices.dtype)
            else:
                indices, offsets = indices.int(), offsets.int()
            outputs.append(
                kernel(indices=indices, offsets=offsets, per_sample_weights=part.weights() if weighted else None)
            )
        if self._prefetcher is not None:
            self._prefetcher.after(faults)
        values = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return self.surgery_cut_point(KeyedTensor(keys=self.keys, length_per_key=self.dims, values=values))


class _Prefetcher:
    """Reads the pages of a batch's rows of mapped tables on many threads before the kernel does, while those pages
    are not resident: a page fault that reads the disk blocks its thread, so the kernel, which reads rows one after
    another, would wait for each; here the disk serves `threads` at once. It runs only while batches take major page
    faults (read from disk): with the page cache warm it costs two `getrusage` calls per batch.

    Args:
        groups: per collection, each table's store (None for tables not mapped).
        threads: pages read at once.
    """

    def __init__(self, groups: Sequence[Sequence[TableStore | None]], threads: int = PREFETCH_THREADS) -> None:
        self._groups = groups
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._views: dict[int, np.ndarray] = {}  # region id -> numpy view of the region
        self.cold = True  # the pages are not known to be resident: read ahead until a batch takes no major faults

    def before(self, parts: Sequence[KeyedJaggedTensor]) -> int:
        if self.cold:
            self._read_ahead(parts)
        return resource.getrusage(resource.RUSAGE_SELF).ru_majflt

    def after(self, faults_before: int) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults_before
        self.cold = faults > COLD_FAULTS

    def _read_ahead(self, parts: Sequence[KeyedJaggedTensor]) -> None:
        by_region: dict[int, list[np.ndarray]] = {}
        regions: dict[int, HostRegion] = {}
        for stores, part in zip(self._groups, parts):
            if not any(stores):
                continue
            lengths = part.length_per_key()
            values = part.values().numpy()
            start = 0
            for store, n in zip(stores, lengths):
                if store is not None and store.region is not None and n:
                    ids = values[start : start + n]
                    by_region.setdefault(id(store.region), []).append(store.offset + ids * store.header.row_bytes)
                    regions[id(store.region)] = store.region
                start += n
        if not by_region:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="embserve-prefetch")
        jobs = []
        for key, offsets in by_region.items():
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = np.frombuffer(regions[key].tensor().numpy(), dtype=np.uint8)
            pages = np.unique(np.concatenate(offsets) // PAGE_SIZE) * PAGE_SIZE
            for chunk in np.array_split(pages, min(self._threads, max(1, pages.size // 8))):
                jobs.append(self._pool.submit(_touch, view, chunk))
        for job in jobs:
            job.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _touch(view: np.ndarray, offsets: np.ndarray) -> int:
    """Reads one byte of each page (numpy lets go of the GIL while it gathers, so threads fault at once)."""
    return int(view[offsets].max()) if offsets.size else 0


def _read_rows(fd: int, path: Path, target: memoryview) -> None:
    """Reads a row file's rows into `target` (sized to them)."""
    done = 0
    while done < len(target):
        n = os.preadv(fd, [target[done : done + (256 << 20)]], DATA_OFFSET + done)
        if n <= 0:
            raise CheckpointError(f"row file {str(path)!r} ended before its rows did")
        done += n


def _fill_device(fd: int, weights: torch.Tensor) -> None:
    """Copies a row file's rows into a device (or managed) tensor `[rows, row_bytes]`, a slice at a time."""
    rows, width = weights.shape
    step = max(1, _FILL_ROWS_BYTES // max(1, width))
    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: torch wants a writable buffer
    try:
        source = torch.frombuffer(mapped, dtype=torch.uint8, offset=DATA_OFFSET, count=rows * width).view(rows, width)
        for start in range(0, rows, step):
            weights[start : start + step].copy_(source[start : start + step], non_blocking=False)
        del source
    finally:
        mapped.close()
