"""`embserve query`: help text, feature and weight parsing, and `--metadata` with the server's limits, as text and
JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import pytest

from embserve.client.cli import add_query_args, main
from embserve.embeddings import ServingModel
from tests.support import ServerHandle


def test_every_flag_says_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_query_args(parser)
    flags = [a for a in parser._actions if a.option_strings != ["-h", "--help"]]
    assert flags
    for action in flags:
        assert action.help and "(default:" in action.help, action.option_strings
    helps = {a.option_strings[0]: a.help or "" for a in flags}
    assert "seconds" in helps["--timeout"] and "digits" in helps["--precision"]


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("hashtags=1,,2", ["'hashtags'", "example 0", "id 1 is empty"]),
        ("hashtags=1,2|3,", ["'hashtags'", "example 1", "id 1 is empty"]),
        ("hashtags=,1", ["'hashtags'", "id 0 is empty"]),
        ("hashtags=1|x", ["'hashtags'", "example 1", "'x' is not an integer id"]),
        ("hashtags", ["is not KEY=IDS"]),
    ],
)
def test_malformed_features_are_refused_before_any_call(
    spec: str, needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # No server listens on port 1: a refusal that tried to call would report Unavailable instead.
    assert main(["query", "--address", "127.0.0.1:1", "--feature", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for needle in needles:
        assert needle in err, err


def test_empty_examples_are_empty_bags(
    server_factory: Callable[..., ServerHandle], small_serving: ServingModel, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(small_serving)
    assert main(["query", "--address", server.address, "--feature", "hashtags=1,2||3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["embeddings"]["hashtags"]
    assert len(rows) == 3 and not any(rows[1]) and any(rows[0]) and any(rows[2])


def test_metadata_prints_the_limits_as_text_and_json(
    server_factory: Callable[..., ServerHandle], small_serving: ServingModel, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(
        small_serving,
        limits={"max_request_examples": 1234, "max_request_ids": 56789, "max_stream_outstanding": 17},
        batching={"max_batch_size": 512},
    )
    assert main(["query", "--address", server.address, "--metadata"]) == 0
    text = capsys.readouterr().out
    for line in (
        ("max_batch_size", "512"),
        ("max_request_examples", "1,234"),
        ("max_request_ids", "56,789"),
        ("max_stream_outstanding", "17"),
        ("max_message_bytes", ""),
    ):
        assert any(line[0] in x and line[1] in x for x in text.splitlines()), (line, text)
    assert "hashtags" in text

    assert main(["query", "--address", server.address, "--metadata", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "small" and info["keys"] == list(small_serving.keys)
    assert (info["max_batch_size"], info["max_request_examples"], info["max_request_ids"]) == (512, 1234, 56789)
    assert info["max_stream_outstanding"] == 17 and info["max_message_bytes"] > 0
    assert {t["name"]: t["num_embeddings"] for t in info["tables"]}["user"] == 1000


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--feature", "hashtags=1,2|3", "--weight", "hashtags=0.5,2"],
            ["'hashtags' has 1 examples, its --feature has 2"],
        ),
        (["--feature", "hashtags=1,2|3", "--weight", "hashtags=0.5|1"], ["'hashtags', example 0: 1 weights for 2 ids"]),
        (
            ["--feature", "hashtags=1,2|3", "--weight", "hashtags=0.5,2|x"],
            ["'hashtags', example 1: weight 0 ('x') is not a number"],
        ),
        (["--feature", "hashtags=1", "--weight", "topics=1"], ["key 'topics' has no --feature"]),
        (["--feature", "hashtags=1", "--weight", "hashtags=1", "--weight", "hashtags=2"], ["'hashtags' given twice"]),
        (["--feature", "hashtags=1", "--weight", "hashtags"], ["is not KEY=WEIGHTS"]),
    ],
    ids=["examples", "ids", "number", "no-feature", "twice", "no-equals"],
)
def test_malformed_weights_are_refused_before_any_call(
    args: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", "--address", "127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embserve query: --weight"), err
    for needle in needles:
        assert needle in err, err


def test_weights_from_the_command_line_and_keys_left_out_are_zero_columns(
    server_factory: Callable[..., ServerHandle],
    small_serving: ServingModel,
    small_tables: dict[str, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = server_factory(small_serving)
    args = [
        "query",
        "--address",
        server.address,
        "--json",
        "--feature",
        "hashtags=1,2||3",
        "--weight",
        "hashtags=0.5,2||-1.5",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    table = small_tables["hashtags"].astype(np.float64)
    expected = [0.5 * table[1] + 2 * table[2], np.zeros(table.shape[1]), -1.5 * table[3]]
    np.testing.assert_allclose(out["embeddings"]["hashtags"], expected, rtol=1e-6, atol=1e-6)
    # Keys left out of the request are empty bags: every other table answers zeros.
    assert set(out["embeddings"]) == set(small_serving.keys)
    for key in set(small_serving.keys) - {"hashtags"}:
        assert not np.any(out["embeddings"][key]), key
