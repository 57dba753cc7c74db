"""`ServingModel.self_check`: passes for every engine, and names the table that cannot compute."""

from __future__ import annotations

from typing import Any

import pytest

from embserve.embeddings import SelfCheckFailed, ServingModel, build_serving_model
from tests.support import make_config

WEIGHTED_FP16 = [
    {"name": "user", "num_embeddings": 50, "embedding_dim": 8},
    {"name": "tags", "num_embeddings": 30, "embedding_dim": 4, "data_type": "fp16", "weighted": True},
    {"name": "topics", "num_embeddings": 20, "embedding_dim": 4, "weighted": True},
]


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_self_check_passes_for_a_model_that_computes(engine: str) -> None:
    build_serving_model(make_config(WEIGHTED_FP16), engine=engine).self_check()


def _break_tags(model: ServingModel) -> None:
    """Undoes the eager engine's cast of the weights for the fp16 weighted table: every forward touching it fails,
    as it did before that fix."""
    module: Any = model.module
    bag = module.weighted_ebc.embedding_bags["tags"]
    assert bag._forward_pre_hooks, "the eager fp16 weighted table should cast its weights"
    bag._forward_pre_hooks.clear()


def test_self_check_names_the_table_that_cannot_compute() -> None:
    model = build_serving_model(make_config(WEIGHTED_FP16), engine="eager")
    _break_tags(model)
    with pytest.raises(SelfCheckFailed) as info:
        model.self_check()
    message = str(info.value)
    assert message.startswith("self-check failed for table 'tags': RuntimeError: Expected tensor"), message
    assert "\n" not in message


def test_self_check_touches_every_table_with_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_serving_model(make_config(WEIGHTED_FP16), engine="fused")
    seen = []
    forward = ServingModel.forward

    def spy(self: ServingModel, features: object) -> object:
        seen.append(features)
        return forward(self, features)

    monkeypatch.setattr(ServingModel, "forward", spy)
    model.self_check()
    assert len(seen) == 1  # one forward when the model computes
    kjt = seen[0].to_dict()  # type: ignore[attr-defined]
    rows = {"user": 50, "tags": 30, "topics": 20}
    for key in model.keys:
        assert kjt[key].values().tolist() == [0, rows[key] - 1]  # first and last row of every table
        assert kjt[key].weights().tolist() == [0.5, 0.5]


def test_self_check_finds_the_table_whose_ids_fail_on_the_fused_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_serving_model(make_config(WEIGHTED_FP16), engine="fused")
    forward = ServingModel.forward

    def broken(self: ServingModel, features: object) -> object:
        if features["topics"].values().numel():  # type: ignore[index]
            raise RuntimeError("row out of bounds\nC++ context")
        return forward(self, features)

    monkeypatch.setattr(ServingModel, "forward", broken)
    with pytest.raises(SelfCheckFailed) as info:
        model.self_check()
    assert str(info.value) == "self-check failed for table 'topics': RuntimeError: row out of bounds"
