"""Server processes, for the benchmarks and the tests alike: start a command, follow its JSON log, read its
memory and metrics, stop it.

    with ServerProcess(embserve_command(model_yaml, "--workers", "2"), "embserve") as server:
        server.wait_ready()                       # the first "serving" line: address, metrics port
        server.log.wait("serving", count=2)       # every worker's
        server.rss_bytes(), server.metrics()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "LogReader",
    "ServerProcess",
    "children",
    "embserve_command",
    "metrics_text",
    "noop_command",
    "pss_bytes",
    "rss_bytes",
]


def embserve_command(model_path: Path | str, *extra: str) -> list[str]:
    """`python -m embserve.server` for a model YAML, on free ports (gRPC and metrics)."""
    return [
        sys.executable,
        "-m",
        "embserve.server",
        "--model",
        str(model_path),
        "--port",
        "0",
        "--metrics-port",
        "0",
        *extra,
    ]


def noop_command(output_dim: int) -> list[str]:
    return [sys.executable, "-m", "embserve.benchmarks.noop_server", "--port", "0", "--output-dim", str(output_dim)]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with pages shared by N processes counted 1/N each."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line for process {pid}")


def children(pid: int) -> list[int]:
    """The direct children of a process (the workers of `--workers N`)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    """The Prometheus exposition text of a metrics endpoint."""
    return str(urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode())


class LogReader:
    """Collects a process's JSON log lines from a background thread (other lines are kept as text)."""

    def __init__(self, stream: IO[str], keep: int = 10_000) -> None:
        self.entries: list[dict[str, object]] = []
        self.lines: list[str] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._ended = threading.Event()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._lock:
                    self.lines = (self.lines + [line])[-self._keep :]
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    with self._lock:
                        self.entries.append(entry)
        except ValueError:  # the stream was closed under us
            pass
        finally:
            self._ended.set()

    def wait(self, msg: str, count: int = 1, timeout: float = 120) -> list[dict[str, object]]:
        """The first `count` entries whose `msg` is `msg`; raises if the log ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.entries if e.get("msg") == msg]
            if len(found) >= count:
                return found
            if self._ended.is_set():
                break
            time.sleep(0.05)
        with self._lock:
            tail = "".join(self.lines[-20:])
        raise RuntimeError(f"no {count} x {msg!r} in the log; last lines:\n{tail}")


class ServerProcess:
    """Starts a server command, follows its log, and stops it with SIGTERM (SIGKILL when it does not stop)."""

    def __init__(self, command: list[str], name: str) -> None:
        self.name = name
        self.command = command
        self.proc: subprocess.Popen[str] | None = None
        self.log: LogReader | None = None
        self.address = ""
        self.metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def popen(self) -> subprocess.Popen[str]:
        """The running process (once started)."""
        assert self.proc is not None, "not started"
        return self.proc

    @property
    def logs(self) -> LogReader:
        """Its log lines (once started)."""
        assert self.log is not None, "not started"
        return self.log

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        self.log = LogReader(self.proc.stderr)

    def wait_ready(self, timeout: float = 300) -> dict[str, object]:
        """Waits for the first `serving` line and takes the address and metrics port from it."""
        assert self.log is not None, "not started"
        try:
            entry = self.log.wait("serving", timeout=timeout)[0]
        except RuntimeError as err:
            raise RuntimeError(f"{self.name} did not start: {err}") from None
        self.address = str(entry["address"])
        port = entry.get("metrics_port")
        self.metrics_port = int(str(port)) if port is not None else None
        return entry

    def metrics(self) -> dict[str, float]:
        """Current metric samples by name (labels folded into the name), from the Prometheus endpoint."""
        if self.metrics_port is None:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(metrics_text(self.metrics_port)):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
