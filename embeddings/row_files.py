"""Row files: one table's serving rows on disk, in the layout the fused engine reads them in place.

A row file is a safetensors file holding one tensor, `rows`: `uint8 [num_embeddings, row_bytes]`, each row exactly
as fbgemm's table-batched embedding kernel stores it on the host (`row_bytes` = the row rounded up to 16 bytes;
an int8 or int4 row starts with its fp16 scale and bias, then the quantized values). The header is padded so that
the rows start at byte 4096, page-aligned, and can be memory-mapped and read in place. Its metadata names the
table, rows, dim, serving dtype and row layout, and a content digest computed when the file is written: SHA-256
over the SHA-256 of each 64 KiB of rows, so that a writer hashes only the chunks it wrote into, and no hole of a
sparse file is ever read (holes are hashed as the zeros they read as, without reading them). Files are written to a temporary name and renamed, so a reader never
sees half a file.

Safetensors is the container because any safetensors reader can open it (and map it), its header is JSON that
carries the metadata, and its data section can start page-aligned; one tensor of raw rows keeps fbgemm's layout
(which is not a safetensors dtype) byte for byte. Reading a header is torch-free; encoding rows needs torch.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ServingDType
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_OFFSET",
    "ROW_ALIGNMENT",
    "RowFileHeader",
    "RowFileWriter",
    "encode_rows",
    "read_header",
    "row_bytes",
    "verify_row_file",
]

FORMAT = "embserve-rows"
FORMAT_VERSION = "1"
LAYOUT = "fbgemm-tbe-host"  # qparams (fp16 scale, fp16 bias) first, then the values, padded to ROW_ALIGNMENT
DATA_OFFSET = 4096  # the rows start here: page-aligned
ROW_ALIGNMENT = 16  # as torchrec's quantized inference collection asks fbgemm for
SCALE_BIAS_BYTES = 4
DIGEST_CHUNK = 64 << 10
DIGEST_KIND = "sha256-of-64KiB-chunks"
_BITS = {ServingDType.FP32: 32, ServingDType.FP16: 16, ServingDType.INT8: 8, ServingDType.INT4: 4}


def row_bytes(dim: int, dtype: ServingDType) -> int:
    """Bytes one row of `dim` values takes in `dtype`, padded as the fused engine reads it."""
    if dtype is ServingDType.INT4 and dim % 2:
        raise CheckpointError(f"an int4 table needs an even embedding_dim, got {dim}")
    raw = dim * _BITS[dtype] // 8 + (SCALE_BIAS_BYTES if dtype in (ServingDType.INT8, ServingDType.INT4) else 0)
    return -(-raw // ROW_ALIGNMENT) * ROW_ALIGNMENT


@dataclasses.dataclass(frozen=True)
class RowFileHeader:
    """What a row file says of itself."""

    table: str
    num_embeddings: int
    embedding_dim: int
    serving_dtype: ServingDType
    row_bytes: int
    digest: str
    source: str

    @property
    def data_bytes(self) -> int:
        return self.num_embeddings * self.row_bytes

    @property
    def file_bytes(self) -> int:
        return DATA_OFFSET + self.data_bytes

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": LAYOUT,
            "table": self.table,
            "num_embeddings": str(self.num_embeddings),
            "embedding_dim": str(self.embedding_dim),
            "serving_dtype": self.serving_dtype.value,
            "row_bytes": str(self.row_bytes),
            "row_alignment": str(ROW_ALIGNMENT),
            "digest": self.digest,
            "digest_kind": DIGEST_KIND,
            "source": self.source,
        }


def _header_bytes(header: RowFileHeader) -> bytes:
    body = json.dumps(
        {
            "__metadata__": header.metadata(),
            "rows": {
                "dtype": "U8",
                "shape": [header.num_embeddings, header.row_bytes],
                "data_offsets": [0, header.data_bytes],
            },
        },
        separators=(",", ":"),
    ).encode()
    room = DATA_OFFSET - 8
    if len(body) > room:
        raise CheckpointError(f"table {header.table!r}: row file header of {len(body)} bytes is over {room}")
    return room.to_bytes(8, "little") + body + b" " * (room - len(body))


def read_header(path: str | Path, fd: int | None = None) -> RowFileHeader:
    """The header of a row file, after checking that it is one and that the file holds all its rows (size only: the
    digest is `verify_row_file`'s). Torch-free.

    Args:
        path: the file (for an open one, the name its messages give).
        fd: an open descriptor of the file, read instead of opening `path`.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    path = Path(path)
    try:
        if fd is None:
            with open(path, "rb") as f:
                prefix = f.read(DATA_OFFSET)
                size = os.fstat(f.fileno()).st_size
        else:
            prefix = os.pread(fd, DATA_OFFSET, 0)
            size = os.fstat(fd).st_size
    except OSError as err:
        raise CheckpointError(f"row file {str(path)!r}: cannot read it: {err.strerror}") from None
    if len(prefix) < DATA_OFFSET or int.from_bytes(prefix[:8], "little") != DATA_OFFSET - 8:
        raise CheckpointError(f"row file {str(path)!r} is not an embserve row file (no 4096-byte header)")
    try:
        meta = json.loads(prefix[8:])["__metadata__"]
        if meta.get("format") != FORMAT or meta.get("layout") != LAYOUT:
            raise ValueError(f"format {meta.get('format')!r}, layout {meta.get('layout')!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')!r}, this server reads {FORMAT_VERSION}")
        header = RowFileHeader(
            table=str(meta["table"]),
            num_embeddings=int(meta["num_embeddings"]),
            embedding_dim=int(meta["embedding_dim"]),
            serving_dtype=ServingDType(meta["serving_dtype"]),
            row_bytes=int(meta["row_bytes"]),
            digest=str(meta["digest"]),
            source=str(meta.get("source", "")),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"row file {str(path)!r} has an invalid header: {err}") from None
    if header.row_bytes != row_bytes(header.embedding_dim, header.serving_dtype):
        raise CheckpointError(
            f"row file {str(path)!r}: row_bytes {header.row_bytes} does not match {header.embedding_dim} x "
            f"{header.serving_dtype.value}"
        )
    if size != header.file_bytes:
        what = "truncated" if size < header.file_bytes else "longer than its rows"
        raise CheckpointError(
            f"row file {str(path)!r} of table {header.table!r} is {what}: {size} bytes, its header says "
            f"{header.file_bytes}"
        )
    return header


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)


@functools.cache
def _zero_chunk_digest(length: int) -> bytes:
    return hashlib.sha256(_zeros(length)).digest()


def _chunks(data_bytes: int) -> Iterator[tuple[int, int]]:
    for start in range(0, data_bytes, DIGEST_CHUNK):
        yield start, min(DIGEST_CHUNK, data_bytes - start)


def _data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [start, end) that hold data (not holes), by SEEK_DATA / SEEK_HOLE; the whole range where the
    file system cannot say."""
    extents: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            extents.append((data, hole))
            pos = hole
    except OSError as err:
        if err.errno == errno.ENXIO:  # no data after pos
            return extents
        return [(start, end)]
    return extents


def _chunk_digest(fd: int, offset: int, length: int) -> bytes:
    """The SHA-256 of `length` bytes at `offset`; the holes in it are hashed as zeros without being read (reading
    them would fill the page cache with zero pages)."""
    extents = _data_extents(fd, offset, offset + length)
    if not extents:
        return _zero_chunk_digest(length)
    h = hashlib.sha256()
    pos = offset
    for start, end in extents:
        if start > pos:
            h.update(memoryview(_zeros(DIGEST_CHUNK))[: start - pos])
        block = os.pread(fd, end - start, start)
        if len(block) != end - start:
            raise CheckpointError("row file ended before its rows did")
        h.update(block)
        pos = end
    if pos < offset + length:
        h.update(memoryview(_zeros(DIGEST_CHUNK))[: offset + length - pos])
    return h.digest()


def _file_digest(fd: int, data_bytes: int, hashed: Callable[[int], bool] = lambda chunk: True) -> str:
    """SHA-256 over the SHA-256 of each chunk, in order; `hashed(i)` False: chunk i is known to be all holes."""
    total = hashlib.sha256()
    for start, length in _chunks(data_bytes):
        if hashed(start // DIGEST_CHUNK):
            total.update(_chunk_digest(fd, DATA_OFFSET + start, length))
        else:
            total.update(_zero_chunk_digest(length))
    return total.hexdigest()


def verify_row_file(path: str | Path) -> RowFileHeader:
    """Reads every row and checks the digest its header records (holes are not read).

    Raises:
        CheckpointError: naming the file and table when the digest differs.
    """
    path = Path(path)
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = _file_digest(fd, header.data_bytes)
    finally:
        os.close(fd)
    if digest != header.digest:
        raise CheckpointError(
            f"row file {str(path)!r} of table {header.table!r}: its rows do not match the digest in its header "
            "(the file was changed after it was written)"
        )
    return header


class RowFileWriter:
    """Writes one table's row file: rows go to a temporary file, sparse where never written; `finish` records the
    digest and renames it into place.

    Args:
        path: the file to write.
        table, num_embeddings, embedding_dim, serving_dtype: what it holds.
        source: the version of the weights it was written from, for the record.
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        table: str,
        num_embeddings: int,
        embedding_dim: int,
        serving_dtype: ServingDType,
        source: str = "",
    ) -> None:
        self._header = RowFileHeader(
            table, num_embeddings, embedding_dim, serving_dtype, row_bytes(embedding_dim, serving_dtype), "", source
        )
        self.path = Path(path) if path is not None else Path(f"<memory rows of {table}>")
        self._tmp: Path | None = None
        try:
            if path is None:  # a memory file, handed on open (`fd`) rather than renamed into place
                self._fd = os.memfd_create(f"embserve-{table}", 0)
            else:
                if not self.path.parent.is_dir():
                    raise CheckpointError(
                        f"cannot write {str(self.path)!r}: folder {str(self.path.parent)!r} does not exist"
                    )
                self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                self._fd = os.open(self._tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self._header.file_bytes)  # sparse: rows never written are holes
        except OSError as err:
            raise CheckpointError(f"cannot write {str(self.path)!r}: {err.strerror}") from None
        self._written: set[int] = set()  # digest chunks that rows were written into

    @property
    def fd(self) -> int:
        """The file being written (a memory file stays open after `finish`; its owner closes it)."""
        return self._fd

    @property
    def header(self) -> RowFileHeader:
        return self._header

    def write(self, first_row: int, rows: np.ndarray) -> None:
        """Writes encoded rows (`uint8 [n, row_bytes]`, see `encode_rows`) from row `first_row` on."""
        h = self._header
        if rows.ndim != 2 or rows.shape[1] != h.row_bytes or rows.dtype != np.uint8:
            raise ValueError(f"rows must be uint8 [n, {h.row_bytes}], got {rows.dtype} {list(rows.shape)}")
        if first_row < 0 or first_row + rows.shape[0] > h.num_embeddings:
            raise ValueError(f"rows {first_row}..{first_row + rows.shape[0]} are outside 0..{h.num_embeddings}")
        start = first_row * h.row_bytes
        data = np.ascontiguousarray(rows).data
        try:
            os.pwrite(self._fd, data, DATA_OFFSET + start)
        except OSError as err:
            raise CheckpointError(f"cannot write {str(self.path)!r}: {err.strerror}") from None
        end = start + rows.nbytes
        self._written.update(range(start // DIGEST_CHUNK, -(-end // DIGEST_CHUNK)))

    def finish(self) -> RowFileHeader:
        """Computes the digest, writes the header, syncs and renames the file into place."""
        digest = _file_digest(self._fd, self._header.data_bytes, self._written.__contains__)
        self._header = dataclasses.replace(self._header, digest=digest)
        if self._tmp is None:  # a memory file: nothing to sync or rename
            os.pwrite(self._fd, _header_bytes(self._header), 0)
            return self._header
        try:
            os.pwrite(self._fd, _header_bytes(self._header), 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as err:
            self.abort()
            raise CheckpointError(f"cannot write {str(self.path)!r}: {err.strerror}") from None
        return self._header

    def abort(self) -> None:
        """Removes the temporary file (a failed or abandoned write)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> RowFileWriter:
        return self

    def __exit__(self, kind: Any, *exc: object) -> None:
        if kind is not None:
            self.abort()


def encode_rows(rows: torch.Tensor, dtype: ServingDType) -> np.ndarray:
    """Float rows (`[n, dim]`, fp32 or fp16) in the fused engine's host layout: `uint8 [n, row_bytes]`. int8 and
    int4 are quantized row-wise with fbgemm's own operator, as torchrec's quantized inference collection does, so a
    table served from its row file computes exactly what the same table converted in memory does."""
    import torch

    dim = rows.shape[1]
    if dtype is ServingDType.FP32:
        values = rows.to(torch.float32).contiguous().view(torch.uint8)
    elif dtype is ServingDType.FP16:
        values = rows.to(torch.float16).contiguous().view(torch.uint8)
    else:
        quantized = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows.contiguous(), _BITS[dtype])
        values = torch.cat([quantized[:, -SCALE_BIAS_BYTES:], quantized[:, :-SCALE_BIAS_BYTES]], dim=1)
    out = np.zeros((rows.shape[0], row_bytes(dim, dtype)), dtype=np.uint8)
    out[:, : values.shape[1]] = values.numpy()
    return out
