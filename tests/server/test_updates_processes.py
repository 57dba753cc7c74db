"""Row updates across real server processes: a SIGKILL during a stream of updates loses none that were answered
and invents none; the workers of `--workers 2` serve each other's updates, and keep them across an in-place
reload of the same base."""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embserve.benchmarks.procs import ServerProcess
from embserve.client import Client, EmbserveError
from embserve.embeddings import LargeEmbeddings, init_weights, save_checkpoint, table_weights
from tests.support import make_config, wait_until, write_model_config

BIN = Path(sys.executable).parent / "embserve"
TABLES = [
    {"name": "user", "num_embeddings": 5000, "embedding_dim": 16},
    {"name": "author", "num_embeddings": 500, "embedding_dim": 8, "data_type": "fp16"},
]


def _files(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    config = make_config(TABLES, name="fresh")
    module = LargeEmbeddings(config)
    init_weights(module, 2)
    save_checkpoint(module, tmp_path / "w.safetensors")
    base = {k: v.detach().float().numpy().copy() for k, v in table_weights(module).items()}
    return write_model_config(config, tmp_path / "m.yaml"), tmp_path / "w.safetensors", base


def _serve(model: Path, checkpoint: Path, *extra: str) -> ServerProcess:
    command = [str(BIN), "serve", "--model", str(model), "--checkpoint", str(checkpoint), "--updates"]
    command += ["--port", "0", "--metrics-port", "0", "--grace-period", "2", *extra]
    return ServerProcess(command, "embserve --updates")


def _row(i: int) -> np.ndarray:
    return np.full((1, 16), float(i), np.float32)


@pytest.mark.slow
def test_a_killed_server_restarts_with_exactly_the_answered_updates(tmp_path: Path) -> None:
    model, checkpoint, base = _files(tmp_path)
    answered: list[int] = []
    sent: list[int] = []
    stop = threading.Event()
    with _serve(model, checkpoint) as server:
        server.wait_ready()
        address = server.address

        def send() -> None:
            with Client(address, retry=None) as client:
                for i in range(1, 5000):
                    if stop.is_set():
                        return
                    sent.append(i)
                    try:
                        client.update_rows("user", [i], _row(i), update_id=str(i))
                    except EmbserveError:
                        return  # the server is gone
                    answered.append(i)

        writer = threading.Thread(target=send)
        writer.start()
        wait_until(lambda: len(answered) >= 60, timeout=60, what="60 answered updates")
        server.signal(signal.SIGKILL)
        writer.join(30)
        stop.set()
    in_flight = set(sent) - set(answered)
    assert len(in_flight) <= 1
    with _serve(model, checkpoint) as server:
        server.wait_ready()
        client = Client(server.address)
        ids = list(range(1, max(sent) + 40))
        rows = client.lookup({"user": [[i] for i in ids]})["user"]
        version = client.metadata().version
        client.close()
    for i, got in zip(ids, rows):
        if i in answered:
            np.testing.assert_array_equal(got, _row(i)[0], err_msg=f"answered update {i} lost")
        elif i in in_flight:  # sent, its answer lost in the crash: applied or not, never anything else
            assert (got == _row(i)[0]).all() or (got == base["user"][i]).all()
        else:
            np.testing.assert_array_equal(got, base["user"][i], err_msg=f"row {i} changed without an update")
    applied = len(answered) + sum(1 for i, got in zip(ids, rows) if i in in_flight and (got == _row(i)[0]).all())
    assert version.endswith(f"+{applied}")


@pytest.mark.slow
def test_workers_serve_each_others_updates_and_keep_them_across_a_reload(tmp_path: Path) -> None:
    model, checkpoint, base = _files(tmp_path)
    with _serve(model, checkpoint, "--workers", "2") as server:
        server.logs.wait("serving", 2)
        address = str(server.logs.wait("workers serving")[0]["address"])

        def everywhere(check: np.ndarray, row: int) -> bool:
            """Fresh connections land on both workers: all of them must serve `check` for the row."""
            for _ in range(12):
                with Client(address) as client:
                    if not (client.lookup({"user": [[row]]})["user"][0] == check).all():
                        return False
            return True

        for i in range(1, 9):  # updates sent to whichever worker each fresh connection reaches
            with Client(address) as client:
                assert client.update_rows("user", [i], _row(i)).sequence == i
        for i in range(1, 9):
            wait_until(functools.partial(everywhere, _row(i)[0], i), timeout=10, what=f"update {i} in every worker")
        server.signal(signal.SIGHUP)  # the same checkpoint again: the log of its base is replayed
        server.logs.wait("reloaded", 2, timeout=120)
        wait_until(lambda: everywhere(_row(8)[0], 8), timeout=10, what="updates kept across the reload")
        with Client(address) as client:
            assert client.update_rows("user", [9], _row(9)).sequence == 9
        wait_until(lambda: everywhere(_row(9)[0], 9), timeout=10, what="an update after the reload")
        with Client(address) as client:
            np.testing.assert_array_equal(client.lookup({"user": [[10]]})["user"][0], base["user"][10])


@pytest.mark.slow
def test_workers_compact_the_log_in_the_background_and_all_move_to_the_new_base(tmp_path: Path) -> None:
    model, checkpoint, base = _files(tmp_path)
    with _serve(model, checkpoint, "--workers", "2", "--compact-after-bytes", "4096") as server:
        server.logs.wait("serving", 2)
        address = str(server.logs.wait("workers serving")[0]["address"])
        with Client(address) as client:
            old = client.metadata().version
            client.update_rows("user", list(range(100)), np.full((100, 16), 0.5, np.float32))  # over the mark
        server.logs.wait("compacted the delta log", timeout=120)
        reloads = server.logs.wait("reloaded", 3, timeout=120)  # the supervisor and both workers
        new = str(next(e for e in reloads if "in_place" in e)["version"])  # the supervisor's
        assert new.split("-")[0] == old.split("-")[0] and new != old.split("+")[0]

        def everywhere() -> bool:
            """Fresh connections land on both workers: all of them serve the new base with the update in it."""
            for _ in range(12):
                with Client(address) as client:
                    served = client.lookup({"user": [[5], [150]]})
                    if served.model_version != new or not (served["user"][0] == 0.5).all():
                        return False
            return True

        wait_until(everywhere, timeout=30, what="the compacted base in every worker")
        with Client(address) as client:
            assert client.update_rows("user", [150], _row(150)).sequence == 1  # the new base's log
            np.testing.assert_array_equal(client.lookup({"user": [[151]]})["user"][0], base["user"][151])
        time.sleep(1.0)  # time for a second fold or reload to show, were one started
        for msg in ("compacting the delta log", "compacted the delta log"):  # one child: the others' lock taken
            assert len([e for e in server.logs.entries if e.get("msg") == msg]) == 1, msg
        assert len([e for e in server.logs.entries if e.get("msg") == "reloaded"]) == 3
