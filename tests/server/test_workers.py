"""`--workers N` and replicas as real processes: one port shared by workers that share the weights' memory,
round-robin over replica processes, rolling reload, replacement of a dead worker, clean shutdown."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from embserve.benchmarks.procs import ServerProcess, metrics_text, pss_bytes
from embserve.client import Client
from tests.support import wait_until

BIN = Path(sys.executable).parent / "embserve"


PROCESS_OVERHEAD_BYTES = 150 << 20  # one server process without its weights: interpreter, torch, gRPC


def _metric(port: int, name: str) -> float:
    text = metrics_text(port)
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _supervisor_reloads(server: ServerProcess) -> list[dict[str, object]]:
    """The supervisor's `reloaded` log lines (they say whether the reload was in place; the workers' do not)."""
    return [e for e in server.logs.wait("reloaded", timeout=120) if "in_place" in e]


def _reloads_reached(server: ServerProcess, count: int) -> bool:
    return len(_supervisor_reloads(server)) >= count


def _lookups_ok(port: int) -> float:
    """Lookups answered OK by one server process, over either transport."""
    return sum(_metric(port, f'embserve_requests_total{{code="OK",method="{m}"}}') for m in ("Lookup", "LookupStream"))


@pytest.mark.slow
def test_workers_share_port_and_weights_reload_and_recover(tmp_path: Path) -> None:
    model = tmp_path / "big.yaml"
    model.write_text(
        yaml.safe_dump(
            {
                "name": "big",
                "tables": [
                    {"name": "a", "num_embeddings": 1_000_000, "embedding_dim": 64},
                    {"name": "b", "num_embeddings": 500_000, "embedding_dim": 64},
                ],
            }
        )
    )
    from embserve.embeddings import LargeEmbeddings, init_weights, load_model_config, save_checkpoint

    ckpt = tmp_path / "weights.safetensors"
    lm = LargeEmbeddings(load_model_config(model))
    init_weights(lm, 5)
    save_checkpoint(lm, ckpt)
    with ServerProcess(
        [
            str(BIN),
            "serve",
            "--workers",
            "2",
            "--model",
            str(model),
            "--checkpoint",
            str(ckpt),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--grace-period",
            "5",
        ],
        "embserve --workers 2",
    ) as server:
        assert server.log is not None and server.proc is not None
        log = server.log
        workers = log.wait("serving", 2)
        address = str(log.wait("workers serving")[0]["address"])
        assert {w["address"] for w in workers} == {address}  # one port
        for _ in range(30):  # a fresh connection per client: the kernel spreads them over the workers
            with Client(address) as client:
                first = client.lookup({"a": [[1, 2]], "b": [[3]]})
        calls = [_lookups_ok(int(str(w["metrics_port"]))) for w in workers]
        assert sum(calls) == 30 and min(calls) > 0, calls

        # Memory: the weights (384 MiB of fp32) are shared, not copied per worker. PSS splits shared pages between
        # the processes that map them, so the total counts one copy once; a fixed budget of one copy plus each
        # process's own overhead (interpreter, torch, gRPC) leaves no room for a second copy.
        with Client(address) as client:
            weight_bytes = sum(t.weight_bytes for t in client.metadata().tables)
        assert weight_bytes == 1_500_000 * 64 * 4
        pids = [server.pid] + [int(str(w["pid"])) for w in workers]
        total_pss = sum(pss_bytes(p) for p in pids)
        budget = weight_bytes + len(pids) * PROCESS_OVERHEAD_BYTES
        assert total_pss < budget, (total_pss >> 20, budget >> 20)

        # A worker killed is replaced.
        os.kill(int(str(workers[0]["pid"])), signal.SIGKILL)
        log.wait("serving", 3)
        # SIGHUP: new weights, new workers, no failed call.
        init_weights(lm, 6)
        save_checkpoint(lm, tmp_path / "next.safetensors")
        (tmp_path / "next.safetensors").replace(ckpt)
        server.signal(signal.SIGHUP)
        wait_until(functools.partial(_reloads_reached, server, 1), timeout=120, what="the reload")
        reloaded = _supervisor_reloads(server)[0]  # once every worker serves it
        with Client(address) as client:
            second = client.lookup({"a": [[1, 2]], "b": [[3]]})
        assert second.model_version == reloaded["version"] != first.model_version
        assert not np.array_equal(first.embeddings, second.embeddings)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_client_round_robin_over_replica_processes() -> None:
    replicas = [
        ServerProcess(
            [str(BIN), "serve", "--model", "twhin_local", "--port", "0", "--metrics-port", "0"], f"replica {i}"
        )
        for i in range(2)
    ]
    try:
        for r in replicas:
            r.start()
        serving = [r.wait_ready() for r in replicas]
        with Client([str(s["address"]) for s in serving]) as client:
            results = [client.lookup({"user": [[7]], "tweet": [[8]]}) for _ in range(40)]
        assert all(np.array_equal(r.embeddings, results[0].embeddings) for r in results)
        calls = [_lookups_ok(int(str(s["metrics_port"]))) for s in serving]
        assert sum(calls) == 40 and min(calls) >= 10, calls
    finally:
        for r in replicas:
            r.stop()


@pytest.mark.slow
def test_each_worker_holds_its_share_of_the_byte_bounds(tmp_path: Path) -> None:
    from embserve.server.bounds import Bounds
    from embserve.server.config import ServerConfig

    mib = 1 << 20
    flags = {
        "--max-queue-bytes": 96 * mib,
        "--max-pending-response-bytes": 64 * mib,
        "--max-pending-response-bytes-per-connection": 48 * mib,
        "--max-receive-bytes": 40 * mib,
    }
    args = [str(BIN), "serve", "--workers", "2", "--model", "twhin_local", "--port", "0", "--no-metrics"]
    args += [str(x) for item in flags.items() for x in item]
    expected = Bounds.of(
        ServerConfig.model_validate(
            {
                "batching": {"max_queue_bytes": 96 * mib},
                "limits": {
                    "max_pending_response_bytes": 64 * mib,
                    "max_pending_response_bytes_per_connection": 48 * mib,
                    "max_receive_bytes": 40 * mib,
                },
            }
        )
    ).share(2)
    with ServerProcess(args, "embserve --workers 2") as server:
        address = str(server.logs.wait("workers serving")[0]["address"])
        reported = set()
        for _ in range(8):  # a fresh connection each: the kernel spreads them over both workers
            with Client(address) as client:
                info = client.metadata()
            reported.add(
                (
                    info.max_queue_bytes,
                    info.max_pending_response_bytes,
                    info.max_pending_response_bytes_per_connection,
                    info.max_receive_bytes,
                )
            )
    assert reported == {
        (
            expected.max_queue_bytes,
            expected.max_pending_response_bytes,
            expected.max_pending_response_bytes_per_connection,
            expected.max_receive_bytes,
        )
    }
    assert expected.max_queue_bytes == 48 * mib and expected.max_pending_response_bytes_per_connection == 32 * mib


@pytest.mark.slow
def test_reload_never_resets_a_new_connection(tmp_path: Path) -> None:
    """Four callers open a new connection for every call while the supervisor reloads five times: every call is
    answered. (The workers take each new version in place: no listener is ever closed, so no connection queued on
    one is reset.)"""
    import threading

    import grpc

    from embserve.embeddings import LargeEmbeddings, init_weights, load_model_config, save_checkpoint
    from embserve.v1 import embserve_pb2 as pb
    from embserve.v1.wire import method_path

    config = load_model_config("twhin_local")
    ckpt = tmp_path / "weights.safetensors"

    def write(seed: int) -> None:
        module = LargeEmbeddings(config)
        init_weights(module, seed)
        save_checkpoint(module, tmp_path / "next.safetensors")
        (tmp_path / "next.safetensors").replace(ckpt)

    write(0)
    args = [
        str(BIN),
        "serve",
        "--workers",
        "2",
        "--model",
        "twhin_local",
        "--checkpoint",
        str(ckpt),
        "--port",
        "0",
        "--no-metrics",
        "--grace-period",
        "2",
    ]
    request = pb.LookupRequest(
        features=pb.SparseFeatures(
            keys=["user"], batch_size=1, lengths=(1).to_bytes(4, "little"), values=(3).to_bytes(8, "little")
        )
    )
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()
    with ServerProcess(args, "embserve --workers 2") as server:
        address = str(server.logs.wait("workers serving")[0]["address"])

        def caller() -> None:
            while not stop.is_set():
                with grpc.insecure_channel(address) as channel:
                    call = channel.unary_unary(
                        method_path("Lookup"), pb.LookupRequest.SerializeToString, pb.LookupResponse.FromString
                    )
                    try:
                        call(request, timeout=10)
                        answered[0] += 1
                    except grpc.RpcError as err:
                        failures.append(f"{err.code().name}: {err.details()}")

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for n in range(1, 6):
                write(n)
                server.signal(signal.SIGHUP)
                # The supervisor's line (each worker logs "reloaded" too, without `in_place`).
                wait_until(functools.partial(_reloads_reached, server, n), timeout=120, what=f"reload {n}")
                reloaded = _supervisor_reloads(server)[-1]
                assert reloaded.get("in_place") is True
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        with Client(address) as client:
            assert client.lookup({"user": [[3]]}).model_version == reloaded["version"]
    assert not failures, failures[:5]
    assert answered[0] > 100
