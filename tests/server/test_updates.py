"""Row updates while serving (UpdateRows): what is served afterwards equals a model built with the new rows, for
every engine and storage; no lookup sees a torn row or half an update; bad updates are refused whole; read-only
servers, permissions and the stream bound; durability across restarts and reloads."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from embserve.client import Client, InvalidRequest, Overloaded, PermissionDenied, RowUpdate, ServerError
from embserve.embeddings import (
    LargeEmbeddings,
    ModelConfig,
    ServingModel,
    build_serving_model,
    init_weights,
    save_checkpoint,
    table_weights,
)
from embserve.embeddings.row_directory import row_file_path, write_row_directory
from embserve.v1 import embserve_pb2 as pb
from embserve.v1 import embserve_pb2_grpc as pb_grpc
from tests.reference import assert_pooled_close, pool
from tests.support import ServerHandle, make_config, write_model_config

Factory = Callable[..., ServerHandle]
TABLES = [
    {"name": "user", "num_embeddings": 2000, "embedding_dim": 16},
    {"name": "author", "num_embeddings": 500, "embedding_dim": 8, "data_type": "fp16"},
    {"name": "topics", "num_embeddings": 300, "embedding_dim": 8, "serving_dtype": "int8"},
    {"name": "hashtags", "num_embeddings": 300, "embedding_dim": 12, "weighted": True},
]
FEATURES = {
    "user": [[1, 1999], [7], [3, 4, 5]],
    "author": [[2], [], [499, 2]],
    "topics": [[0, 9], [9], []],
    "hashtags": [[5, 6], [299], [5]],
}
WEIGHTS = {"hashtags": [[0.5, 2.0], [1.5], [1.0]]}
# (table, ids) of the updates every engine test applies, in order: the second rewrites a row of the first
UPDATES = [("user", [1, 7, 5]), ("author", [2, 499]), ("topics", [9, 0]), ("hashtags", [299, 6]), ("user", [7])]


@pytest.fixture
def config() -> ModelConfig:
    return make_config(TABLES, name="fresh")


def _floats(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    module = LargeEmbeddings(config)
    init_weights(module, seed)
    return {k: v.detach().clone() for k, v in table_weights(module).items()}


def _new_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.uniform(-0.5, 0.5, size=(n, dim)).astype(np.float32)


def _checkpoint(config: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> Path:
    module = LargeEmbeddings(config)
    with torch.no_grad():
        for name, tensor in table_weights(module).items():
            tensor.copy_(weights[name])
    save_checkpoint(module, path)
    return path


def _served(config: ModelConfig, kind: str, tmp_path: Path, weights: dict[str, torch.Tensor]) -> ServingModel:
    """The model under test: `kind` is engine-storage."""
    if kind == "eager":
        return build_serving_model(
            config, checkpoint=_checkpoint(config, weights, tmp_path / "w.safetensors"), engine="eager"
        )
    if kind == "fused-file":
        return build_serving_model(config, checkpoint=_checkpoint(config, weights, tmp_path / "w.safetensors"))
    write_row_directory(config, weights, tmp_path / "rows")
    storage = kind.removeprefix("fused-")
    return build_serving_model(config, checkpoint=tmp_path / "rows", default_storage=storage, copy_on_write=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["fused-file", "fused-memory", "fused-mmap", "eager"])
def test_lookups_after_updates_equal_a_model_built_with_the_new_rows(
    kind: str, tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    weights = _floats(config)
    model = _served(config, kind, tmp_path, weights)
    row_file = row_file_path(tmp_path / "rows", "user")
    digest = _sha(row_file) if kind == "fused-mmap" else ""
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    rng = np.random.default_rng(1)
    expected = {k: v.float().clone() for k, v in weights.items()}
    with Client(handle.address) as client:
        for i, (table, ids) in enumerate(UPDATES, 1):
            rows = _new_rows(rng, len(ids), expected[table].shape[1])
            result = client.update_rows(table, ids, rows, update_id=f"u{i}")
            assert (result.sequence, result.rows, result.update_id) == (i, len(ids), f"u{i}")
            assert result.model_version == f"{model.version}+{i}"
            expected[table][ids] = torch.from_numpy(rows)
        served = client.lookup(FEATURES, weights=WEIGHTS)
        assert served.model_version == f"{model.version}+{len(UPDATES)}"
        assert client.metadata().version == served.model_version
    assert handle.metric("embserve_update_rows_total") == sum(len(ids) for _, ids in UPDATES)
    # Bit for bit what the same engine computes from a checkpoint holding the new rows (fp16 rounding, int8
    # quantization and all).
    rebuilt = build_serving_model(
        config,
        checkpoint=_checkpoint(
            config, {k: v.to(weights[k].dtype) for k, v in expected.items()}, tmp_path / "new.safetensors"
        ),
        engine="eager" if kind == "eager" else "fused",
    )
    handle2 = server_factory(rebuilt)
    with Client(handle2.address) as client:
        reference = client.lookup(FEATURES, weights=WEIGHTS)
    np.testing.assert_array_equal(served.embeddings, reference.embeddings)
    # And the float tables against numpy (the int8 table's quantization aside).
    keys = [k for k in served.keys if k != "topics"]
    names = list(FEATURES)
    lengths = np.array([[len(bag) for bag in FEATURES[k]] for k in names], np.int32)
    values = np.array([i for k in names for bag in FEATURES[k] for i in bag])
    w = np.array([1.0] * (lengths[:3].sum()) + [x for bag in WEIGHTS["hashtags"] for x in bag], np.float32)
    tables = {k: expected[k].numpy() for k in expected}
    want = pool(tables, names, lengths, values, w, keys, weighted_keys={"hashtags"})
    got = np.concatenate([served[k] for k in keys], axis=1)
    assert_pooled_close({t.name: t.embedding_dim for t in config.tables}, {"author"}, keys, got, want)
    if digest:
        assert _sha(row_file) == digest, "an mmap table's row file must not change: updated pages are private"


def test_no_lookup_sees_a_torn_row_or_half_an_update(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    """Each update sets rows 10 and 11 of `user` to the constant k. Every answer must show each row whole (its first
    state or one update's), both rows from the same update, and a caller's successive answers never go back."""
    model = build_serving_model(config)
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    updates, done = 150, threading.Event()
    errors: list[str] = []
    with Client(handle.address) as client:
        first = client.lookup({"user": [[10], [11]]})["user"].copy()

    def state(rows: np.ndarray, row: int) -> float | None:
        """0 for the row's first state, k for update k's, None for anything else (a torn row)."""
        if (rows[row] == first[row]).all():
            return 0.0
        return float(rows[row, 0]) if (rows[row] == rows[row, 0]).all() and rows[row, 0] >= 1 else None

    def read() -> None:
        with Client(handle.address) as client:
            last = 0.0
            while not done.is_set():
                rows = client.lookup({"user": [[10], [11]]})["user"]
                a, b = state(rows, 0), state(rows, 1)
                if a is None or b is None:
                    errors.append(f"torn row: {rows.tolist()}")
                elif a != b:
                    errors.append(f"half an update: rows from updates {a} and {b}")
                elif a < last:
                    errors.append(f"went back from update {last} to {a}")
                else:
                    last = a

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    with Client(handle.address) as client:
        outcomes = client.update_many(
            RowUpdate("user", [10, 11], np.full((2, 16), k, np.float32), update_id=str(k))
            for k in range(1, updates + 1)
        )
    done.set()
    for t in readers:
        t.join(30)
    assert [getattr(o, "sequence", None) for o in outcomes] == list(range(1, updates + 1))
    assert not errors, errors[:5]
    with Client(handle.address) as client:
        assert client.lookup({"user": [[10], [11]]})["user"][:, 0].tolist() == [updates, updates]


def test_bad_updates_are_refused_with_the_problem_named_and_nothing_applied(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    model = build_serving_model(config)
    handle = server_factory(
        model, updates={"enabled": True, "log_dir": str(tmp_path / "log"), "max_rows_per_message": 4}
    )
    ones = np.ones((1, 16), np.float32)
    bad: list[tuple[RowUpdate, str]] = [
        (RowUpdate("nope", [1], ones), "unknown table 'nope'"),
        (RowUpdate("user", [2000], ones), "id 2000 is outside its rows"),
        (RowUpdate("user", [-1], ones), "id -1 is outside its rows"),
        (RowUpdate("user", [3, 3], np.ones((2, 16), np.float32)), "id 3 appears more than once"),
        (RowUpdate("user", [1], np.ones((1, 15), np.float32)), "need 64 bytes of float32 values"),
        (
            RowUpdate("user", [1, 2], np.array([[1.0] * 16, [np.inf] * 16], np.float32)),
            "row 1 of the update has non-finite",
        ),
        (
            RowUpdate("user", list(range(5)), np.ones((5, 16), np.float32)),
            "5 rows in one update, over the server's limit of 4",
        ),
        (RowUpdate("user", [], np.ones((0, 16), np.float32)), "at least one id"),
        (RowUpdate("author", [1], np.ones(8, np.float16).tobytes() + b"x", serving=True), "need 16 bytes of fp16 rows"),
    ]
    with Client(handle.address) as client:
        before = client.lookup(FEATURES, weights=WEIGHTS)
        outcomes = client.update_many([u for u, _ in bad])
        for (update, message), outcome in zip(bad, outcomes):
            assert isinstance(outcome, InvalidRequest), (update.table, outcome)
            assert message in str(outcome)
            assert f"table {update.table!r}" in str(outcome) or update.table == "nope"
        after = client.lookup(FEATURES, weights=WEIGHTS)
        assert after.model_version == before.model_version == model.version
        np.testing.assert_array_equal(after.embeddings, before.embeddings)
        # A good update after the bad ones is the first in the log.
        assert client.update_rows("user", [1], ones).sequence == 1


def test_serving_format_rows_are_stored_as_sent(tmp_path: Path, server_factory: Factory, config: ModelConfig) -> None:
    model = build_serving_model(config)
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    halves = np.array([[0.5, -1.25, 3.0, 0.0, 1e-3, 2.0, -2.0, 7.0]], np.float16)
    with Client(handle.address) as client:
        client.update_rows("author", [4], halves.tobytes(), serving=True)
        got = client.lookup({"author": [[4]]})["author"]
    np.testing.assert_array_equal(got, halves.astype(np.float32))


@pytest.mark.parametrize("nice", [0, 10])
def test_updates_are_checked_and_logged_on_a_thread_below_the_lookups_priority(
    tmp_path: Path, server_factory: Factory, config: ModelConfig, nice: int
) -> None:
    """The thread that checks, encodes and logs updates runs `nice` steps nicer than the server (Linux)."""
    if sys.platform != "linux":
        pytest.skip("per-thread niceness is Linux's")
    model = build_serving_model(config)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log"), "nice": nice})
    with Client(handle.address) as client:
        client.update_rows("user", [3], np.ones((1, 16), np.float32))
        np.testing.assert_array_equal(client.lookup({"user": [[3]]})["user"], np.ones((1, 16), np.float32))
    threads = [t for t in threading.enumerate() if t.name.startswith("embserve-updates")]
    assert len(threads) == 1 and threads[0].native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, threads[0].native_id) == min(19, own + nice)


def test_a_read_only_server_refuses_updates(server_factory: Factory, small_serving: ServingModel) -> None:
    handle = server_factory(small_serving)
    with Client(handle.address) as client, pytest.raises(ServerError, match="read-only.*--updates"):
        client.update_rows("user", [1], np.ones((1, 16), np.float32))
    assert handle.metric("embserve_requests_total", {"method": "UpdateRows", "code": "FAILED_PRECONDITION"}) == 1


def test_update_and_lookup_permissions_are_separate(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader *\nwriter UpdateRows\nboth Lookup,UpdateRows\n")
    handle = server_factory(
        build_serving_model(config),
        auth={"tokens_file": str(tokens)},
        updates={"enabled": True, "log_dir": str(tmp_path / "log")},
    )
    row = np.ones((1, 16), np.float32)
    with Client(handle.address, token="reader") as client:
        client.lookup({"user": [[1]]})
        with pytest.raises(PermissionDenied):
            client.update_rows("user", [1], row)
    with Client(handle.address, token="writer") as client:
        assert client.update_rows("user", [1], row).sequence == 1
        with pytest.raises(PermissionDenied):
            client.lookup({"user": [[1]]})
    with Client(handle.address, token="both") as client:
        client.update_rows("user", [2], row)
        np.testing.assert_array_equal(client.lookup({"user": [[1, 2]]})["user"], 2 * row)


def _blocking_stream(address: str, first: pb.RowUpdate) -> tuple[grpc.Channel, Iterator[Any], threading.Event]:
    """An UpdateRows stream that sends one message and then stays open until the event is set."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]
    release = threading.Event()

    def messages() -> Iterator[pb.RowUpdate]:
        yield first
        release.wait(30)

    return channel, stub.UpdateRows(messages()), release


def test_update_streams_are_bounded_and_the_bound_refuses_no_stream_within_it(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    handle = server_factory(
        build_serving_model(config), updates={"enabled": True, "log_dir": str(tmp_path / "log"), "max_streams": 3}
    )
    row = np.ones(16, np.float32).tobytes()
    opened = []
    for i in range(3):  # at the bound: every stream served
        message = pb.RowUpdate(table="user", ids=np.array([i], np.int64).tobytes(), rows=row, update_id=str(i))
        channel, answers, release = _blocking_stream(handle.address, message)
        assert next(answers).sequence == i + 1
        opened.append((channel, answers, release))  # the call lives while its answers are referenced
    with Client(handle.address) as client, pytest.raises(Overloaded, match="3 UpdateRows streams are open"):
        client.update_rows("user", [9], np.ones((1, 16), np.float32))
    for channel, _, release in opened:
        release.set()
        channel.close()
    server = handle.server
    with Client(handle.address) as client:  # the bound is given back when streams end
        assert client.update_rows("user", [9], np.ones((1, 16), np.float32)).sequence == 4
    assert server._updates.open_streams == 0


def test_updates_survive_a_restart_and_follow_their_base_across_reloads(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    first = _checkpoint(config, _floats(config, 0), tmp_path / "a.safetensors")
    second = _checkpoint(config, _floats(config, 5), tmp_path / "b.safetensors")
    model_file = write_model_config(config, tmp_path / "model.yaml")
    settings = {"model": str(model_file), "checkpoint": str(first), "updates": {"enabled": True}}
    row = np.full((1, 16), 0.25, np.float32)
    handle = server_factory(build_serving_model(config, checkpoint=first), **settings)
    with Client(handle.address) as client:
        base = client.metadata().version
        client.update_rows("user", [3], row)
    handle.stop()
    assert (tmp_path / "a.safetensors.updates").is_dir(), "the log lives next to the checkpoint by default"
    restarted = server_factory(build_serving_model(config, checkpoint=first), **settings)
    with Client(restarted.address) as client:
        result = client.lookup({"user": [[3]]})
        assert result.model_version == f"{base}+1"
        np.testing.assert_array_equal(result["user"], row)
        # A reload of the same base replays its log; a reload to another base serves that base as written.
        restarted.call(restarted.server.reload(str(first)))
        np.testing.assert_array_equal(client.lookup({"user": [[3]]})["user"], row)
        assert client.metadata().version == f"{base}+1"
        restarted.call(restarted.server.reload(str(second)))
        other = client.lookup({"user": [[3]]})
        assert "+" not in other.model_version
        np.testing.assert_array_equal(other["user"], _floats(config, 5)["user"][3:4].numpy())
        assert client.update_rows("user", [3], 2 * row).model_version == f"{other.model_version}+1"


def test_the_async_client_updates_and_a_bad_update_in_a_stream_is_raised_after_the_good_ones(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    import asyncio

    from embserve.client import AsyncClient

    handle = server_factory(build_serving_model(config), updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    row = np.full((1, 16), 0.75, np.float32)

    async def run() -> None:
        async with AsyncClient(handle.address) as client:
            result = await client.update_rows("user", [5], row, update_id="a")
            assert (result.sequence, result.update_id) == (1, "a")
            served = await client.lookup({"user": [[5]]})
            np.testing.assert_array_equal(served["user"], row)

    asyncio.run(run())
    with Client(handle.address) as client:
        updates = [RowUpdate("user", [6], row), RowUpdate("user", [0.5], row), RowUpdate("user", [7], row)]
        with pytest.raises(InvalidRequest, match="ids must be a 1-d array of integers"):
            client.update_many(updates)
        # The update before the bad one was sent and applied; nothing after it was sent.
        got = client.lookup({"user": [[6], [7]]})["user"]
        np.testing.assert_array_equal(got[0], row[0])
        assert not (got[1] == row[0]).all()
        assert client.metadata().version.endswith("+2")


def test_a_start_replays_the_whole_log_before_it_serves(
    tmp_path: Path, server_factory: Factory, config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embserve.server import updater

    monkeypatch.setattr(updater, "_REPLAY_BYTES", 1)  # one record per read: the replay must read to the end
    settings = {"updates": {"enabled": True, "log_dir": str(tmp_path / "log")}}
    handle = server_factory(build_serving_model(config), **settings)
    with Client(handle.address) as client:
        for i in range(1, 6):
            client.update_rows("user", [i], np.full((1, 16), i, np.float32))
    handle.stop()
    restarted = server_factory(build_serving_model(config), **settings)
    assert restarted.server.model.version.endswith("+5")  # before any call: replayed during the start
    with Client(restarted.address) as client:
        np.testing.assert_array_equal(client.lookup({"user": [[5]]})["user"][0], np.full(16, 5, np.float32))


def test_the_delta_log_is_bounded_and_the_bound_refuses_no_update_within_it(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    row = np.ones((1, 16), np.float32)
    handle = server_factory(
        build_serving_model(config),
        updates={"enabled": True, "log_dir": str(tmp_path / "log"), "max_log_bytes": 1000},
    )
    accepted = 0
    with Client(handle.address) as client:
        outcomes = client.update_many(RowUpdate("user", [i], row * i) for i in range(1, 30))
        for outcome in outcomes:
            if isinstance(outcome, Overloaded):
                break
            assert not isinstance(outcome, Exception), outcome
            accepted += 1
        assert accepted >= 5  # everything under the bound was taken
        refused = outcomes[accepted]
        assert isinstance(refused, Overloaded) and "max_log_bytes 1000" in str(refused)
        assert all(isinstance(o, Overloaded) for o in outcomes[accepted:])  # and nothing after it
        assert client.metadata().version.endswith(f"+{accepted}")
        refused_row = client.lookup({"user": [[accepted + 1]]})["user"][0]
        assert not (refused_row == row[0] * (accepted + 1)).any()  # the refused update was not applied
    log = next((tmp_path / "log").glob("*.deltas"))
    assert log.stat().st_size <= 1000
