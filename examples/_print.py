"""Shared by the examples: print one lookup as a JSON line (inputs and answer), so a script's output can be read by
people and checked by `tests/test_examples.py`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def print_lookup(
    name: str,
    features: Mapping[str, Sequence[Sequence[int]]],
    weights: Mapping[str, Sequence[Sequence[float]]] | None,
    keys: Sequence[str],
    embeddings: Any,
    version: str = "",
) -> None:
    print(
        json.dumps(
            {
                "example": name,
                "features": {k: [list(map(int, ids)) for ids in v] for k, v in features.items()},
                "weights": {k: [list(map(float, w)) for w in v] for k, v in (weights or {}).items()},
                "keys": list(keys),
                "model_version": version,
                "embeddings": np.asarray(embeddings, dtype=np.float32).tolist(),
            }
        )
    )
