"""Where each table's weights are in a state dict, and the check that a checkpoint file holds every table with its
shape, read from the file's header alone. Torch-free for safetensors files, so that `embserve serve` finds a
wrong checkpoint in a fraction of a second, before it imports torch or builds anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import LargeEmbeddingsConfig
from .errors import CheckpointError

__all__ = ["check_checkpoint", "match_tables", "safetensors_header", "state_key"]

# A safetensors header larger than this is not a header (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def state_key(config: LargeEmbeddingsConfig, table: str) -> str:
    """The seed's state-dict key of a table's weights."""
    weighted = {t.name for t in config.tables if t.weighted}
    return f"{'weighted_ebc' if table in weighted else 'ebc'}.embedding_bags.{table}.weight"


def _find(state: Mapping[str, Any], key: str) -> str | None:
    """The key under which `state` holds `key`, exactly or behind a prefix."""
    if key in state:
        return key
    suffix = "." + key
    matches = [k for k in state if k.endswith(suffix)]
    if len(matches) > 1:
        raise CheckpointError(f"checkpoint has several tensors for {key!r}: {matches}")
    return matches[0] if matches else None


def match_tables(config: LargeEmbeddingsConfig, shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, str]:
    """Which state key holds each table, after checking that every table is there with its config's shape."""
    known = {t.name for t in config.tables}
    strays = sorted(
        k.split("embedding_bags.", 1)[1].rsplit(".", 1)[0]
        for k in shapes
        if "embedding_bags." in k and k.split("embedding_bags.", 1)[1].rsplit(".", 1)[0] not in known
    )
    if strays:
        raise CheckpointError(f"checkpoint {str(path)!r} has tables the model does not: {strays}")
    found: dict[str, str] = {}
    for table in config.tables:
        key = _find(shapes, state_key(config, table.name)) or _find(shapes, f"embedding_bags.{table.name}.weight")
        if key is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no weights for table {table.name!r}")
        expected = (table.num_embeddings, table.embedding_dim)
        if tuple(shapes[key]) != expected:
            raise CheckpointError(
                f"checkpoint {str(path)!r}, table {table.name!r}: checkpoint shape {tuple(shapes[key])} != "
                f"config shape {expected} (num_embeddings, embedding_dim)"
            )
        found[table.name] = key
    return found


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes from a safetensors file's header, after checking that the header is one and that the
    file holds every tensor's bytes (a truncated file is refused here, without reading the data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: not a safetensors file (no header)")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header is not a mapping")
    data = size - 8 - length
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: tensor {name!r} has no valid shape and offsets"
            ) from None
        if end > data:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is truncated: tensor {name!r} ends at byte {end} of the data, which has "
                f"{data}"
            )
        shapes[name] = shape
    return shapes


def check_checkpoint(config: LargeEmbeddingsConfig, path: str | Path) -> None:
    """Checks, without loading the weights, that a checkpoint file is readable and holds every table of `config`
    with its shape: the check `load_checkpoint` makes, cheap enough to run before the model is built. Reads a
    safetensors file's header only; a torch file's metadata through `torch.load(mmap=True)`.

    Raises:
        CheckpointError: naming the file, and the table where one is missing or misshapen.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        shapes = safetensors_header(path)
    else:
        shapes = _torch_file_shapes(path)
    match_tables(config, shapes, path)


def _torch_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        # mmap: only the tensors' metadata is read, not their bytes; weights_only: no code is run.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any parse failure of an untrusted file is reported, never propagated raw
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}
