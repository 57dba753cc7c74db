"""Compaction: a base and its delta log folded into a new base; moving a server to it keeps every answered update,
those answered after the compaction included (carried over once, however often the new base is opened)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embserve.client import Client
from embserve.embeddings import LargeEmbeddings, ModelConfig, build_serving_model, load_checkpoint, table_weights
from embserve.embeddings.compact import (
    LOCK_FILE,
    CompactionRunning,
    base_version,
    compact,
    compact_in_place,
    in_place_problem,
)
from embserve.embeddings.config import ServingDType
from embserve.embeddings.delta_log import DeltaLog, RowFormat, default_log_dir, delta_log_path
from embserve.embeddings.errors import CheckpointError
from embserve.embeddings.row_directory import row_file_path, write_row_directory
from embserve.embeddings.row_files import DATA_OFFSET, encode_rows, read_header
from tests.server.test_updates import FEATURES, TABLES, WEIGHTS, _checkpoint, _floats
from tests.support import ServerHandle, make_config, wait_until, write_model_config

Factory = Callable[..., ServerHandle]
BIN = Path(sys.executable).parent / "embserve"


@pytest.fixture
def config() -> ModelConfig:
    return make_config(TABLES, name="fresh")


def _row(value: float, dim: int = 16) -> np.ndarray:
    return np.full((1, dim), value, np.float32)


def test_a_compacted_checkpoint_keeps_every_update_and_carries_later_ones_once(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    first = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    model_file = write_model_config(config, tmp_path / "m.yaml")
    settings = {"model": str(model_file), "checkpoint": str(first), "updates": {"enabled": True}}
    handle = server_factory(build_serving_model(config, checkpoint=first), **settings)
    with Client(handle.address) as client:
        for i in range(1, 4):
            client.update_rows("user", [i], _row(i))
        client.update_rows("author", [7], np.full((1, 8), 0.5, np.float32))
        result = compact(config, first, default_log_dir(first), tmp_path / "b.safetensors")
        assert (result.folded_through, result.rows) == (4, 4)
        for i in range(4, 6):  # answered on the old base after the compaction read its log
            client.update_rows("user", [i], _row(i))
        handle.call(handle.server.reload(str(result.output)))
        served = client.lookup({"user": [[i] for i in range(1, 7)], "author": [[7]] + [[]] * 5})
        assert served.model_version == f"{result.version}+2"  # the two later updates, carried over
    np.testing.assert_array_equal(served["user"][:5], np.arange(1, 6, dtype=np.float32)[:, None] * np.ones(16))
    np.testing.assert_array_equal(served["user"][5], _floats(config)["user"][6].numpy())
    np.testing.assert_array_equal(served["author"][0], np.full(8, 0.5, np.float32))
    # The compacted file itself holds the four folded updates, as the loader reads them.
    module = LargeEmbeddings(config)
    load_checkpoint(module, result.output)
    weights = table_weights(module)
    np.testing.assert_array_equal(weights["user"][1:4].detach().numpy(), np.arange(1, 4)[:, None] * np.ones((1, 16)))
    np.testing.assert_array_equal(weights["user"][4].detach().numpy(), _floats(config)["user"][4].numpy())
    # A restart on the compacted base carries nothing twice.
    again = server_factory(
        build_serving_model(config, checkpoint=result.output), **{**settings, "checkpoint": str(result.output)}
    )
    with Client(again.address) as client:
        assert client.metadata().version == f"{result.version}+2"
        np.testing.assert_array_equal(client.lookup({"user": [[5]]})["user"][0], _row(5)[0])


def test_a_compacted_row_directory_serves_what_the_updated_server_served(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    write_row_directory(config, _floats(config), tmp_path / "rows")
    model = build_serving_model(config, checkpoint=tmp_path / "rows", default_storage="mmap", copy_on_write=True)
    handle = server_factory(model, updates={"enabled": True, "log_dir": str(tmp_path / "log")})
    int8 = encode_rows(torch.full((2, 8), 0.3), ServingDType.INT8)[:, :12]  # scale, bias, 8 codes
    with Client(handle.address) as client:
        client.update_rows("user", [0, 1999], np.ones((2, 16), np.float32) * 0.125)
        client.update_rows("topics", [3, 4], int8.tobytes(), serving=True)
        client.update_rows("hashtags", [5], np.full((1, 12), -2.0, np.float32))
        updated = client.lookup(FEATURES | {"topics": [[3, 4], [4], []]}, weights=WEIGHTS)
    result = compact(config, tmp_path / "rows", tmp_path / "log", tmp_path / "rows-2")
    assert result.folded_through == 3 and result.version.startswith("rows-2-")
    fresh = server_factory(build_serving_model(config, checkpoint=result.output, default_storage="mmap"))
    with Client(fresh.address) as client:
        compacted = client.lookup(FEATURES | {"topics": [[3, 4], [4], []]}, weights=WEIGHTS)
    np.testing.assert_array_equal(compacted.embeddings, updated.embeddings)


def test_compaction_refuses_what_it_cannot_do_in_one_line(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    first = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="no delta log of base"):
        compact(config, first, tmp_path / "nowhere", tmp_path / "b.safetensors")
    handle = server_factory(
        build_serving_model(config, checkpoint=first), checkpoint=str(first), updates={"enabled": True}
    )
    int8 = encode_rows(torch.full((1, 8), 0.3), ServingDType.INT8)[:, :12]
    with Client(handle.address) as client:
        client.update_rows("topics", [3], int8.tobytes(), serving=True)
    with pytest.raises(CheckpointError, match="table 'topics': update 1 holds int8 rows"):
        compact(config, first, default_log_dir(first), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists() and not list(tmp_path.glob(".b.safetensors*"))
    (tmp_path / "c.safetensors").write_bytes(b"")
    model_file = write_model_config(config, tmp_path / "m.yaml")
    proc = subprocess.run(
        [
            str(BIN),
            "compact",
            "--model",
            str(model_file),
            "--checkpoint",
            str(first),
            "--output",
            str(tmp_path / "c.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "exists; compact into a new path" in proc.stderr


def _append(log_dir: Path, base: str, ids: list[int], value: float) -> None:
    """One update of table user in the log of `base`, as a server appends it."""
    log = DeltaLog(delta_log_path(log_dir, base), base)
    try:
        rows = np.full((len(ids), 16), value, "<f4").view(np.uint8)
        log.append("user", "u", RowFormat.FLOAT32, np.array(ids, np.int64), rows)
    finally:
        log.close()


def test_in_place_compaction_keeps_the_path_and_the_rows_and_runs_once(tmp_path: Path, config: ModelConfig) -> None:
    weights = _floats(config)
    checkpoint = _checkpoint(config, weights, tmp_path / "a.safetensors")
    log_dir = default_log_dir(checkpoint)
    log_dir.mkdir()
    old_base = base_version(config, checkpoint)
    _append(log_dir, old_base, [3, 9], 0.25)
    (tmp_path / ".a.safetensors.4242.tmp.safetensors").write_bytes(b"left by a killed compaction")
    with open(log_dir / LOCK_FILE, "w") as held:  # another compaction at work
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CompactionRunning, match="another compaction"):
            compact_in_place(config, checkpoint, log_dir)
    result = compact_in_place(config, checkpoint, log_dir, if_base=old_base)
    assert result is not None and result.output == checkpoint and result.version != old_base
    assert base_version(config, checkpoint) == result.version and (result.folded_through, result.rows) == (1, 2)
    module = LargeEmbeddings(config)
    load_checkpoint(module, checkpoint)
    expected = weights["user"].numpy().copy()
    expected[[3, 9]] = 0.25
    np.testing.assert_array_equal(table_weights(module)["user"].detach().numpy(), expected)
    assert compact_in_place(config, checkpoint, log_dir, if_base=old_base) is None  # folded already: nothing done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.updates"]


def test_in_place_compaction_of_a_linked_row_directory_swaps_the_link(tmp_path: Path, config: ModelConfig) -> None:
    weights = _floats(config)
    write_row_directory(config, weights, tmp_path / "rows-1")
    link = tmp_path / "rows"
    link.symlink_to("rows-1")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    old_base = base_version(config, link)
    _append(log_dir, old_base, [1999], -1.5)
    result = compact_in_place(config, link, log_dir)
    assert result is not None and link.is_symlink() and link.resolve().parent == tmp_path
    assert link.resolve().name.startswith("rows.") and result.version.startswith(f"{link.resolve().name}-")
    assert (tmp_path / "rows-1").is_dir()  # the earlier base stays for the servers still on it
    header = read_header(row_file_path(link, "user"))
    stored = np.fromfile(row_file_path(link, "user"), np.uint8, offset=DATA_OFFSET).reshape(2000, header.row_bytes)
    expected = weights["user"].numpy().copy()
    expected[1999] = -1.5
    np.testing.assert_array_equal(stored[:, :64].copy().view("<f4"), expected)
    assert "symbolic link" in str(in_place_problem(tmp_path / "rows-1")) and in_place_problem(link) is None
    assert ".safetensors file" in str(in_place_problem(tmp_path / "w.pt"))
    (tmp_path / "file-link.safetensors").symlink_to(_checkpoint(config, weights, tmp_path / "w.safetensors"))
    assert "point the checkpoint at the file itself" in str(in_place_problem(tmp_path / "file-link.safetensors"))


def test_a_checkpoint_replaced_during_an_in_place_compaction_is_kept(
    tmp_path: Path, config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embserve.embeddings.compact as compaction

    checkpoint = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    log_dir = default_log_dir(checkpoint)
    log_dir.mkdir()
    _append(log_dir, base_version(config, checkpoint), [3], 0.25)
    fold = compaction._compact_file
    published = _checkpoint(config, _floats(config, seed=7), tmp_path / "new.safetensors").read_bytes()

    def fold_while_a_trainer_publishes(*args: Any) -> tuple[int, int]:
        done = fold(*args)
        checkpoint.with_name("publish.tmp").write_bytes(published)
        os.replace(checkpoint.with_name("publish.tmp"), checkpoint)
        return done

    monkeypatch.setattr(compaction, "_compact_file", fold_while_a_trainer_publishes)
    with pytest.raises(CheckpointError, match="changed while it was compacted; nothing was replaced"):
        compact_in_place(config, checkpoint, log_dir)
    assert checkpoint.read_bytes() == published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.updates", "new.safetensors"]


def _compacting_server(
    tmp_path: Path, server_factory: Factory, config: ModelConfig, after: int
) -> tuple[ServerHandle, Path, dict[str, Any]]:
    """A server on `a.safetensors` (seed-0 weights) with updates on and `compact_after_bytes=after`; the settings,
    for a restart."""
    checkpoint = _checkpoint(config, _floats(config), tmp_path / "a.safetensors")
    settings = {
        "model": str(write_model_config(config, tmp_path / "m.yaml")),
        "checkpoint": str(checkpoint),
        "updates": {"enabled": True, "compact_after_bytes": after},
    }
    return server_factory(build_serving_model(config, checkpoint=checkpoint), **settings), checkpoint, settings


def _held_fold(tmp_path: Path) -> Path:
    """`embserve` whose compaction, once it has folded the log, says so (a file) and waits for another file."""
    script = tmp_path / "held_fold.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "import embserve.embeddings.compact as compaction\n"
        "fold = compaction._compact_file\n"
        "def held(*args):\n"
        "    done = fold(*args)\n"
        "    pathlib.Path(sys.argv[1]).touch()\n"
        "    while not pathlib.Path(sys.argv[2]).exists():\n"
        "        time.sleep(0.01)\n"
        "    return done\n"
        "compaction._compact_file = held\n"
        "from embserve.client.cli import main\n"
        "sys.exit(main(sys.argv[3:]))\n"
    )
    return script


def test_the_server_compacts_its_log_in_the_background_and_serves_the_new_base(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    weights = _floats(config)
    handle, checkpoint, settings = _compacting_server(tmp_path, server_factory, config, 4096)
    old_base = handle.server.updater.base
    expected = weights["user"].numpy().copy()
    compactor = handle.server.compactor
    assert compactor is not None
    folded, go_on = tmp_path / "folded", tmp_path / "go-on"
    compactor.program = [sys.executable, str(_held_fold(tmp_path)), str(folded), str(go_on)]
    with Client(handle.address) as client:
        client.update_rows("user", list(range(100)), np.full((100, 16), 0.5, np.float32))  # 6.4 kB: over the mark
        expected[:100] = 0.5
        wait_until(folded.exists, 60, "the fold to read the log")
        for i in (150, 151):  # answered after the fold read the log: carried over into the new base's log
            client.update_rows("user", [i], _row(i))
            expected[i] = i
        go_on.touch()
        wait_until(lambda: handle.metric("embserve_compactions_total", {"outcome": "ok"}) == 1, 120, "a compaction")
        wait_until(lambda: handle.server.updater.base != old_base, 30, "the reload of the compacted base")
        served = client.lookup({"user": [[i] for i in range(2000)]})
        new_base = handle.server.updater.base
        assert served.model_version == f"{new_base}+2" and new_base == base_version(config, checkpoint)
        client.update_rows("user", [1999], _row(-3))  # the new base's log takes updates
        expected[1999] = -3
    np.testing.assert_array_equal(served["user"][:1999], expected[:1999])
    assert handle.metric("embserve_update_log_bytes") < 4096
    assert handle.metric("embserve_compactions_total", {"outcome": "failed"}) == 0
    handle.stop()
    # A restart on the same path serves the compacted base and the updates after it.
    again = server_factory(build_serving_model(config, checkpoint=checkpoint), **settings)
    with Client(again.address) as client:
        restarted = client.lookup({"user": [[i] for i in range(2000)]})
    assert restarted.model_version.split("+")[0] == new_base
    np.testing.assert_array_equal(restarted["user"], expected)


def test_background_compaction_settings_are_checked(tmp_path: Path, config: ModelConfig) -> None:
    from embserve.server.config import ServerConfig
    from embserve.server.startup import StartupError, check_startup

    with pytest.raises(ValueError, match="must be below updates.max_log_bytes"):
        ServerConfig.model_validate({"updates": {"compact_after_bytes": 10, "max_log_bytes": 10}})
    with pytest.raises(ValueError, match="needs a checkpoint"):
        ServerConfig.model_validate({"updates": {"compact_after_bytes": 10}})
    with pytest.raises(ValueError, match="model_version do not go together"):
        ServerConfig.model_validate(
            {"checkpoint": "a.safetensors", "model_version": "v", "updates": {"compact_after_bytes": 10}}
        )
    write_row_directory(config, _floats(config), tmp_path / "rows")
    settings = ServerConfig.model_validate(
        {
            "model": str(write_model_config(config, tmp_path / "m.yaml")),
            "checkpoint": str(tmp_path / "rows"),
            "port": 0,
            "metrics_port": None,
            "updates": {"enabled": True, "compact_after_bytes": 10},
        }
    )
    with pytest.raises(StartupError, match="--compact-after-bytes with --checkpoint .*symbolic link to it"):
        check_startup(settings)


def test_a_failed_background_compaction_is_counted_and_the_old_base_keeps_serving(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    handle, checkpoint, _ = _compacting_server(tmp_path, server_factory, config, 64)
    before = checkpoint.read_bytes()
    base = handle.server.updater.base
    int8 = encode_rows(torch.full((1, 8), 0.3), ServingDType.INT8)[:, :12]  # a float checkpoint cannot hold it
    with Client(handle.address) as client:
        client.update_rows("topics", [3], int8.tobytes(), serving=True)
        wait_until(lambda: handle.metric("embserve_compactions_total", {"outcome": "failed"}) == 1, 120, "a failure")
        client.update_rows("user", [1], _row(1))  # within the minute after a failure: no second try
        served = client.lookup({"user": [[1]]})
    assert served.model_version == f"{base}+2" and handle.server.compactor is not None
    np.testing.assert_array_equal(served["user"][0], _row(1)[0])
    assert not handle.server.compactor.running and checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.updates", "m.yaml"]


def test_a_stop_during_a_background_compaction_ends_it_and_leaves_the_checkpoint(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    handle, checkpoint, _ = _compacting_server(tmp_path, server_factory, config, 64)
    before = checkpoint.read_bytes()
    compactor = handle.server.compactor
    assert compactor is not None
    with Client(handle.address) as client:
        client.update_rows("user", [1], _row(1))
    wait_until(lambda: compactor._child is not None, 30, "the compaction's child process")
    child = compactor._child
    handle.stop()
    assert child.returncode is not None and not compactor.running
    assert handle.metric("embserve_compactions_total", {"outcome": "ok"}) == 0
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.updates", "m.yaml"]


def test_a_base_compacted_by_another_process_is_reloaded_and_another_checkpoint_is_left_to_the_operator(
    tmp_path: Path, server_factory: Factory, config: ModelConfig
) -> None:
    handle, checkpoint, _ = _compacting_server(tmp_path, server_factory, config, 64)
    old_base = handle.server.updater.base
    log_dir = default_log_dir(checkpoint)
    with open(log_dir / LOCK_FILE, "w") as held:  # the server's compaction waits: another process holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with Client(handle.address) as client:
            client.update_rows("user", [1], _row(1))
    folded = compact_in_place(config, checkpoint, log_dir)  # the other process (an operator, another replica)
    assert folded is not None
    handle.server.compactor._not_before = 0.0  # no minute's wait before the next try
    with Client(handle.address) as client:
        client.update_rows("user", [2], _row(2))  # the server's fold finds the path folded already, and reloads
        wait_until(lambda: handle.server.updater.base == folded.version, 60, "the reload of the other's compaction")
        served = client.lookup({"user": [[1], [2]]})
        assert served.model_version == f"{folded.version}+1"  # update 2, carried over
        np.testing.assert_array_equal(served["user"], np.concatenate([_row(1), _row(2)]))
        assert handle.metric("embserve_compactions_total", {"outcome": "other_base"}) == 1
        # A checkpoint that is not a compaction of the served base is the operator's to serve (SIGHUP).
        _checkpoint(config, _floats(config, seed=9), checkpoint)
        client.update_rows("user", [3], _row(3))
        wait_until(lambda: handle.metric("embserve_compactions_total", {"outcome": "other_base"}) == 2, 60, "a look")
        assert client.lookup({"user": [[3]]}).model_version == f"{folded.version}+2"
    assert handle.server.updater.base == folded.version != old_base
