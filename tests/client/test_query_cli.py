"""`embserve query`: help text, feature parsing, and `--metadata` with the server's limits, as text and JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import pytest

from embserve.client.cli import add_query_args, main
from embserve.embeddings import ServingModel
from tests.conftest import ServerHandle


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
    for line in ("max_batch_size", "512"), ("max_request_examples", "1,234"), ("max_request_ids", "56,789"), (
        "max_stream_outstanding", "17"
    ), ("max_message_bytes", ""):
        assert any(line[0] in x and line[1] in x for x in text.splitlines()), (line, text)
    assert "hashtags" in text

    assert main(["query", "--address", server.address, "--metadata", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "small" and info["keys"] == list(small_serving.keys)
    assert (info["max_batch_size"], info["max_request_examples"], info["max_request_ids"]) == (512, 1234, 56789)
    assert info["max_stream_outstanding"] == 17 and info["max_message_bytes"] > 0
    assert {t["name"]: t["num_embeddings"] for t in info["tables"]}["user"] == 1000
