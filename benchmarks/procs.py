"""Server processes for the benchmarks: embserve itself and the no-op transport ceiling, each its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["ServerProcess", "embserve_command", "noop_command"]


def embserve_command(model_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "embserve.server", "--model", str(model_path),
        "--port", "0", "--metrics-port", "0", *extra,
    ]


def noop_command(output_dim: int) -> list[str]:
    return [sys.executable, "-m", "embserve.benchmarks.noop_server", "--port", "0", "--output-dim", str(output_dim)]


class ServerProcess:
    """Starts a server command, waits for its `serving` log line, and stops it with SIGTERM."""

    def __init__(self, command: list[str], name: str) -> None:
        self.name = name
        self.command = command
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.metrics_port: int | None = None
        self.log_tail: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {''.join(self.log_tail[-20:])}")
            self.log_tail.append(line)
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("msg") == "serving":
                self.address = entry["address"]
                self.metrics_port = entry.get("metrics_port")
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise TimeoutError(f"{self.name} did not start in {timeout}s")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_tail = (self.log_tail + [line])[-50:]

    def metrics(self) -> dict[str, float]:
        """Current metric samples by name (labels folded into the name), from the Prometheus endpoint."""
        if self.metrics_port is None:
            return {}
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
