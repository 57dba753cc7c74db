"""The `--workers N` supervisor tells the truth: it exits non-zero when it gives up, its workers die with it, and
replacing workers leaks no descriptors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embserve.benchmarks.procs import ServerProcess
from tests.server.test_workers import BIN

TINY_MODEL = {"name": "tiny", "tables": [{"name": "a", "num_embeddings": 100, "embedding_dim": 8}]}


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: it holds no descriptors or sockets)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Supervisor(ServerProcess):
    """`embserve serve --workers 2` on a tiny model, as a real process, with its JSON log."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        model = tmp_path / "tiny.yaml"
        model.write_text(yaml.safe_dump(TINY_MODEL))
        super().__init__(
            [
                str(BIN),
                "serve",
                "--workers",
                "2",
                "--model",
                str(model),
                "--port",
                "0",
                "--no-metrics",
                "--grace-period",
                "1",
                *flags,
            ],
            "embserve --workers 2",
        )
        self.start()
        assert self.log is not None and self.proc is not None
        self.address = str(self.log.wait("workers serving")[0]["address"])
        self.workers = [int(str(e["pid"])) for e in self.log.wait("serving", 2)]

    def close(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.stop()
        for pid in self.workers:  # stragglers, should a test fail
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for s in started:
        s.close()


@pytest.mark.slow
def test_supervisor_that_gives_up_exits_non_zero(tmp_path: Path, supervisor: list[Supervisor]) -> None:
    sup = Supervisor(tmp_path, "--max-worker-restarts", "1")
    supervisor.append(sup)
    os.kill(sup.workers[0], signal.SIGKILL)  # within the budget: replaced
    replaced = sup.logs.wait("worker replaced")[0]
    os.kill(sup.workers[1], signal.SIGKILL)  # the second death within a minute is one too many
    assert sup.popen.wait(timeout=60) == 1
    assert sup.logs.wait("workers keep dying; giving up")
    assert _wait_gone([int(str(replaced["pid"]))]) == []  # the survivors were stopped, not abandoned


@pytest.mark.slow
def test_worker_replacements_leak_no_descriptors(tmp_path: Path, supervisor: list[Supervisor]) -> None:
    sup = Supervisor(tmp_path)
    supervisor.append(sup)
    before = _fd_count(sup.popen.pid)
    victim = sup.workers[0]
    for n in range(1, 5):
        os.kill(victim, signal.SIGKILL)
        victim = int(str(sup.logs.wait("worker replaced", n)[-1]["pid"]))
        sup.workers.append(victim)
    assert _fd_count(sup.popen.pid) == before
    channel = grpc.insecure_channel(sup.address)
    try:  # still serving
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.popen.wait(timeout=60) == 0


@pytest.mark.slow
def test_killing_the_supervisor_stops_its_workers_and_frees_the_port(
    tmp_path: Path, supervisor: list[Supervisor]
) -> None:
    sup = Supervisor(tmp_path)
    supervisor.append(sup)
    host, port = sup.address.rsplit(":", 1)
    sup.popen.kill()
    sup.popen.wait(30)
    assert _wait_gone(sup.workers) == [], "workers outlived their supervisor"
    channel = grpc.insecure_channel(sup.address)
    try:  # nobody serves the port any more
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    with socket.socket() as s:  # and a new instance (no SO_REUSEPORT) can bind it
        s.bind((host, int(port)))
        s.listen()


# A stand-in supervisor: forks one child and dies by SIGKILL. "armed": the child reports after `_die_with_parent`,
# so only PR_SET_PDEATHSIG can end it; "late": it calls `_die_with_parent` only once its parent is gone, the race
# that the getppid check covers.
_ORPHAN_SCRIPT = """
import os, signal, sys, time
from embserve.server.workers import _die_with_parent
late = sys.argv[1] == "late"
parent = os.getpid()
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # the test reads the parent's output to its end: the child must not hold it open
    os.dup2(null, 2)
    if late:
        os.write(w, b"%d\\n" % os.getpid())
        while os.getppid() == parent:
            time.sleep(0.01)
        _die_with_parent(parent)
    else:
        _die_with_parent(parent)
        os.write(w, b"%d\\n" % os.getpid())
    time.sleep(60)
    os._exit(0)
os.close(w)
sys.stdout.write(os.read(r, 64).decode())
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["armed", "late"])
def test_worker_dies_with_its_supervisor(when: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, when], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    leftover = _wait_gone([child], timeout=20)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert leftover == []
