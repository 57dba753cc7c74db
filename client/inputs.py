"""The forms callers hold their features in, normalised to one jagged layout, checked, and split into chunks.

Accepted forms:
- `{key: [[id, ...], ...]}`: per-example id lists; per-id weights as a parallel `weights={key: [[w, ...], ...]}`;
- `{key: (lengths, values)}` or `{key: (lengths, values, weights)}`: numpy arrays (no per-example Python);
- a torchrec `KeyedJaggedTensor` (when torch is installed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np

from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, pack_features

from .errors import InvalidRequest

__all__ = ["FeatureArrays", "Features", "IdLists", "KeyedJaggedLike", "SparseInput", "Weights", "to_sparse_input"]

IdLists: TypeAlias = Sequence[Sequence[int]]
"""One key's examples as id lists: `[[42], [7, 9], []]`."""
FeatureArrays: TypeAlias = "tuple[Any, ...]"
"""One key as arrays: `(lengths, values)` or `(lengths, values, weights)`, numpy arrays or sequences."""
Weights: TypeAlias = Mapping[str, Sequence[Sequence[float]]]
"""Per-id weights for features given as id lists, in the same shape: `{key: [[w, ...], ...]}`."""


class KeyedJaggedLike(Protocol):
    """What the client reads of a torchrec `KeyedJaggedTensor` (without importing torch)."""

    def keys(self) -> list[str]: ...
    def lengths(self) -> Any: ...
    def values(self) -> Any: ...
    def weights_or_none(self) -> Any: ...
    def stride(self) -> int: ...


Features: TypeAlias = "Mapping[str, IdLists | FeatureArrays] | KeyedJaggedLike"
"""The features of one request: id lists or arrays per key, or a `KeyedJaggedTensor`."""


@dataclasses.dataclass(frozen=True)
class SparseInput:
    """Features in KJT layout: `lengths` int32 `[len(keys), batch_size]`, `values` int64, `weights` float32."""

    keys: tuple[str, ...]
    batch_size: int
    lengths: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None

    @property
    def wire_bytes(self) -> int:
        return 4 * self.lengths.size + 8 * self.values.size + (4 * self.weights.size if self.weights is not None else 0)

    def to_proto(self, output_dtype: OutputDType | str, request_id: str = "") -> pb.LookupRequest:
        try:
            dtype = OutputDType.parse(output_dtype)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        return pb.LookupRequest(
            features=pack_features(self.keys, self.batch_size, self.lengths, self.values, self.weights),
            output_dtype=dtype.wire,
            request_id=request_id,
        )

    def chunks(self, max_examples: int, max_bytes: int) -> list[SparseInput]:
        """Splits on example boundaries so each chunk has at most `max_examples` examples and about `max_bytes`."""
        per_example = max(1, self.wire_bytes // max(1, self.batch_size))
        step = max(1, min(max_examples, max_bytes // per_example))
        if self.batch_size <= step:
            return [self]
        key_starts = np.concatenate([[0], np.cumsum(self.lengths.sum(axis=1, dtype=np.int64))])
        within = np.zeros((len(self.keys), self.batch_size + 1), dtype=np.int64)
        np.cumsum(self.lengths, axis=1, out=within[:, 1:])
        out = []
        for a in range(0, self.batch_size, step):
            b = min(a + step, self.batch_size)
            spans = [
                (int(key_starts[k] + within[k, a]), int(key_starts[k] + within[k, b])) for k in range(len(self.keys))
            ]
            values = np.concatenate([self.values[s:e] for s, e in spans]) if spans else self.values[:0]
            weights = None
            if self.weights is not None:
                weights = np.concatenate([self.weights[s:e] for s, e in spans]) if spans else self.weights[:0]
            out.append(SparseInput(self.keys, b - a, np.ascontiguousarray(self.lengths[:, a:b]), values, weights))
        return out


def _check(inp: SparseInput) -> SparseInput:
    if inp.batch_size <= 0:
        raise InvalidRequest(f"batch_size must be > 0, got {inp.batch_size}")
    if len(set(inp.keys)) != len(inp.keys):
        raise InvalidRequest(f"duplicate key in {list(inp.keys)}")
    if inp.lengths.size and int(inp.lengths.min()) < 0:
        i = int(np.flatnonzero(inp.lengths.reshape(-1) < 0)[0])
        raise InvalidRequest(f"negative length at lengths[{i}] (key {inp.keys[i // inp.batch_size]!r})")
    total = int(inp.lengths.sum())
    if total != inp.values.size:
        raise InvalidRequest(f"sum(lengths) = {total} but there are {inp.values.size} ids")
    if inp.values.size and int(inp.values.min()) < 0:
        i = int(np.flatnonzero(inp.values < 0)[0])
        # Which key and example the id belongs to: values hold every example of keys[0], then of keys[1], ...
        ends = np.cumsum(inp.lengths.reshape(-1), dtype=np.int64)
        slot = int(np.searchsorted(ends, i, side="right"))
        key, example = inp.keys[slot // inp.batch_size], slot % inp.batch_size
        raise InvalidRequest(
            f"key {key!r}: negative id {int(inp.values[i])} in example {example} (values[{i}]); ids must be >= 0"
        )
    if inp.weights is not None:
        if inp.weights.size != inp.values.size:
            raise InvalidRequest(f"{inp.weights.size} weights for {inp.values.size} ids")
        if not np.isfinite(inp.weights).all():
            raise InvalidRequest(f"non-finite weight at weights[{int(np.flatnonzero(~np.isfinite(inp.weights))[0])}]")
    return inp


def _int_array(x: Any, dtype: str, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InvalidRequest(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not (
        np.issubdtype(arr.dtype, np.integer) or (dtype == "<f4" and np.issubdtype(arr.dtype, np.number))
    ):
        raise InvalidRequest(f"{what} must hold {'numbers' if dtype == '<f4' else 'integers'}, got {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _from_kjt(kjt: Any) -> SparseInput:
    keys = tuple(kjt.keys())
    lengths = kjt.lengths().detach().cpu().numpy().astype("<i4")
    stride = kjt.stride()
    weights = kjt.weights_or_none()
    return SparseInput(
        keys,
        int(stride),
        lengths.reshape(len(keys), stride),
        kjt.values().detach().cpu().numpy().astype("<i8"),
        None if weights is None else weights.detach().cpu().numpy().astype("<f4"),
    )


def to_sparse_input(
    features: Features, *, weights: Weights | None = None, batch_size: int | None = None
) -> SparseInput:
    """Normalises and checks one of the accepted feature forms (see the module docstring).

    Raises:
        InvalidRequest: naming the key and problem (inconsistent batch sizes, negative ids, ...).
    """
    if hasattr(features, "lengths") and hasattr(features, "values") and callable(features.keys):
        if weights is not None:
            raise InvalidRequest("pass weights inside the KeyedJaggedTensor, not as weights=")
        return _check(_from_kjt(features))
    if not isinstance(features, Mapping):
        raise InvalidRequest(f"features must be a dict or a KeyedJaggedTensor, got {type(features).__name__}")
    keys = tuple(features)
    for k in keys:
        if not isinstance(k, str):
            raise InvalidRequest(f"feature keys must be strings, got {k!r}")
    if weights is not None and set(weights) - set(keys):
        raise InvalidRequest(f"weights given for keys not in features: {sorted(set(weights) - set(keys))}")
    lengths_list: list[np.ndarray] = []
    values_list: list[np.ndarray] = []
    weights_list: list[np.ndarray | None] = []
    for key in keys:
        spec = features[key]
        if isinstance(spec, tuple):
            if weights is not None and key in weights:
                raise InvalidRequest(f"key {key!r}: put array weights in the tuple (lengths, values, weights)")
            if len(spec) not in (2, 3):
                raise InvalidRequest(f"key {key!r}: expected (lengths, values[, weights]), got {len(spec)} items")
            lengths = _int_array(spec[0], "<i4", f"key {key!r} lengths")
            values = _int_array(spec[1], "<i8", f"key {key!r} values")
            w = _int_array(spec[2], "<f4", f"key {key!r} weights") if len(spec) == 3 else None
        else:
            bags = list(spec)
            lengths = np.fromiter((len(b) for b in bags), dtype="<i4", count=len(bags))
            try:
                values = np.fromiter((i for b in bags for i in b), dtype="<i8", count=int(lengths.sum()))
            except (TypeError, ValueError, OverflowError) as err:
                raise InvalidRequest(f"key {key!r}: ids must be integers: {err}") from None
            w = None
            if weights is not None and key in weights:
                wbags = list(weights[key])
                if [len(b) for b in wbags] != lengths.tolist():
                    raise InvalidRequest(f"key {key!r}: weights lists do not match the id lists' lengths")
                w = np.fromiter((x for b in wbags for x in b), dtype="<f4", count=int(lengths.sum()))
        if w is not None and w.size != values.size:
            raise InvalidRequest(f"key {key!r}: {w.size} weights for {values.size} ids")
        lengths_list.append(lengths)
        values_list.append(values)
        weights_list.append(w)
    sizes = {len(x) for x in lengths_list}
    if len(sizes) > 1:
        raise InvalidRequest(
            "keys disagree on the batch size: " + ", ".join(f"{k}={len(x)}" for k, x in zip(keys, lengths_list))
        )
    inferred = sizes.pop() if sizes else None
    if batch_size is not None and inferred is not None and batch_size != inferred:
        raise InvalidRequest(f"batch_size={batch_size} but the features hold {inferred} examples")
    size = batch_size if batch_size is not None else inferred
    if size is None:
        raise InvalidRequest("no features given: pass batch_size to look up empty bags")
    all_weights = None
    if any(w is not None for w in weights_list):
        all_weights = np.concatenate(
            [w if w is not None else np.ones(v.size, "<f4") for w, v in zip(weights_list, values_list)]
        )
    lengths_2d = np.stack(lengths_list) if lengths_list else np.zeros((0, size), "<i4")
    values_all = np.concatenate(values_list) if values_list else np.zeros(0, "<i8")
    return _check(SparseInput(keys, size, lengths_2d, values_all, all_weights))
