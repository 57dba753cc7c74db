"""Weights for `LargeEmbeddings`: deterministic initialisation, and checkpoints that never unpickle code.

Checkpoints are plain state dicts: a safetensors file (`.safetensors`), or a torch file read with
`torch.load(..., weights_only=True)`. Keys are the seed's (`ebc.embedding_bags.<table>.weight`); a checkpoint of a
whole seed model, whose keys carry a prefix (`model.large_embeddings.ebc...`), loads too.

A checkpoint's version, what clients see, is `<file stem>-<digest>`: the file name without its suffix and the first
12 hex digits of the SHA-256 of its bytes (`checkpoint_version`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .large_embeddings import LargeEmbeddings
from .state_keys import MAX_HEADER_BYTES, check_checkpoint, match_tables

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_digest",
    "checkpoint_version",
    "init_weights",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
    "table_weights",
]


def table_weights(model: LargeEmbeddings) -> dict[str, torch.nn.Parameter]:
    """The weight parameter of every table, by table name."""
    out: dict[str, torch.nn.Parameter] = {}
    for ebc in (model.ebc, model.weighted_ebc):
        if ebc is not None:
            for name, bag in ebc.embedding_bags.items():
                out[name] = bag.weight
    return out


@torch.no_grad()
def init_weights(model: LargeEmbeddings, seed: int = 0) -> None:
    """Fills every table from `seed` with torchrec's default init, U(-sqrt(1/rows), sqrt(1/rows)).

    Each table draws from its own generator, seeded from `seed` and the table's name, so a table's weights do not
    change when other tables are added or reordered.
    """
    for name, weight in table_weights(model).items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = math.sqrt(1.0 / weight.shape[0])
        values = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        weight.copy_(values)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict and the content digest of the same bytes: the file is read once, so a file replaced
    during loading can never pair one version's weights with another's digest."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            data = _read_whole(path)
            return _safetensors_views(data, path), hashlib.sha256(data.numpy().data).hexdigest()[:12]
        raw = path.read_bytes()  # a torch file: BytesIO shares `bytes` without a copy
        digest = hashlib.sha256(raw).hexdigest()[:12]
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # any parse failure of an untrusted file is reported, never propagated raw
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    return state, digest


_READ_CHUNK = 16 << 20


def _read_whole(path: Path) -> torch.Tensor:
    """The file's bytes (uint8), read in chunks into memory that is not zeroed first: the interpreter lock is
    free during each read, and no long call takes it."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = torch.empty(size, dtype=torch.uint8)
        view, done = data.numpy().data, 0
        while done < size and (n := f.readinto(view[done : done + _READ_CHUNK])):
            done += n
    if done != size:
        raise CheckpointError(f"checkpoint {str(path)!r} changed size while it was read")
    return data


def _safetensors_views(data: torch.Tensor, path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of its bytes (`data`, read whole): no copy, and no long call that
    holds the interpreter lock, so that a server keeps answering while a reload reads its weights. The header is
    checked as the safetensors library checks it: integer shapes and offsets, each tensor's bytes matching its
    shape and dtype, the tensors laid end to end over the whole data, no name twice, string metadata."""
    size = data.numel()
    length = int.from_bytes(data[:8].numpy().tobytes(), "little") if size >= 8 else -1
    if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a safetensors file (no header)")

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(data[8 : 8 + length].numpy().tobytes(), object_pairs_hook=no_repeats)
    except ValueError as err:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header is not a mapping")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its metadata is not a mapping of strings")
    base, spans = 8 + length, []
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not all(type(x) is int and x >= 0 for x in [*shape, *offsets]) or len(offsets) != 2:
                raise TypeError
        except (KeyError, TypeError):
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: tensor {name!r} has no valid dtype, shape and offsets"
            ) from None
        start, end = offsets
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: tensor {name!r} has {end - start} bytes for shape {shape}"
            )
        spans.append((start, end, name, dtype, shape))
    spans.sort(key=lambda span: span[:2])
    ends = [0] + [end for _, end, *_ in spans]
    for (start, _, name, *_), previous_end in zip(spans, ends):
        if start != previous_end:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: tensor {name!r} does not follow the one before"
            )
    if ends[-1] != size - base:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or damaged: its tensors take {ends[-1]} bytes and its data has "
            f"{size - base}"
        )
    state = {}
    for start, end, name, dtype, shape in spans:
        raw = data[base + start : base + end]
        if (base + start) % dtype.itemsize:  # not aligned for its type: a copy that is
            raw = raw.clone()
        state[name] = raw.view(dtype).view(shape)
    return state


@torch.no_grad()
def load_checkpoint(model: LargeEmbeddings, path: str | Path) -> str:
    """Copies every table's weights from a checkpoint and returns the digest of the bytes it read (the model
    version); a missing table or a shape mismatch is a `CheckpointError`."""
    path = Path(path)
    state, digest = read_state_dict(path)
    keys = match_tables(model.config, {k: tuple(v.shape) for k, v in state.items()}, path)
    for name, weight in table_weights(model).items():
        tensor = state[keys[name]]
        if not tensor.is_floating_point():
            raise CheckpointError(f"table {name!r}: checkpoint dtype {tensor.dtype} is not a float type")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"table {name!r}: checkpoint has non-finite weights")
        weight.copy_(tensor)
    return digest


def save_checkpoint(model: LargeEmbeddings, path: str | Path) -> None:
    """Writes the tables as a state dict: safetensors for a `.safetensors` path, a torch file otherwise.

    Raises:
        CheckpointError: the file cannot be written (its folder does not exist, no permission, disk full).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: folder {str(path.parent)!r} does not exist")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            torch.save(state, str(path))
    except Exception as err:  # safetensors and torch report write failures in types of their own
        lines = str(err).strip().splitlines()
        raise CheckpointError(
            f"cannot write checkpoint {str(path)!r}: {type(err).__name__}: {lines[0] if lines else ''}"
        ) from None


def checkpoint_digest(path: str | Path) -> str:
    """A short content digest of a checkpoint file, as `load_checkpoint` returns it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def checkpoint_version(path: str | Path, digest: str) -> str:
    """The model version clients see for a checkpoint file with content digest `digest`: `<file stem>-<digest>`
    (`ranker.safetensors` -> `ranker-3f2a9c81b0de`). The server reports it unless `--model-version` says otherwise."""
    return f"{Path(path).stem}-{digest}"
