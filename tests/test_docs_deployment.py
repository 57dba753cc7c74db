"""docs/deployment.md's sharded walk-through runs as written: every block of its "A sharded deployment" section, in
order, in one folder, as a reader would follow it.

- ```yaml blocks whose first line is `# <file>` are written to that file.
- ```bash lines are `embserve` commands, run as written, or `make cluster ARGS="..."`, started as the Makefile's
  recipe runs it and left running (until the end) once its router routes.
- ```text blocks are the output of the commands just before them; each line must appear in it (digests aside).
- ```python blocks run in a fresh process.

The documented ports (the router on 50051, shard K on 50052 + K) are replaced by free ones; blocks marked
`<!-- not run: ... -->` (the Kubernetes commands) are skipped.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "deployment.md"
SECTION = "## A sharded deployment"
BIN = Path(sys.executable).parent / "embserve"
NOT_RUN = re.compile(r"^<!-- not run: .+ -->$")
DOC_PORTS = (50051, 50052, 50053)
CLUSTER_RECIPE = "$(BIN)/python -m embserve.benchmarks.cluster --host $(HOST) --port $(PORT) $(ARGS)"


def section_blocks() -> list[tuple[int, str, str, bool]]:
    """(line, language, code, marked not run) for every fenced block of the section, in page order."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    out = []
    i = start
    while i < end:
        fence = lines[i].strip()
        if fence.startswith("```") and fence != "```":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            previous = next((lines[k].strip() for k in range(i - 1, start, -1) if lines[k].strip()), "")
            out.append((i + 1, fence[3:], "\n".join(lines[i + 1 : j]), bool(NOT_RUN.match(previous))))
            i = j
        i += 1
    return out


def _free_ports(n: int) -> list[int]:
    """`n` consecutive free ports on loopback."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class ClusterCommand:
    """`make cluster` as its recipe runs it, followed until its router routes."""

    def __init__(self, args: str, port: int, cwd: Path) -> None:
        command = [sys.executable, "-m", "embserve.benchmarks.cluster", "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(
            [*command, *shlex.split(args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.routing = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            if line.startswith("router routing on"):
                self.routing.set()

    def wait(self, timeout: float = 300) -> None:
        if not self.routing.wait(timeout):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"make cluster did not start:\n{''.join(self.out)}\n{err[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


def test_make_cluster_runs_the_cluster_module() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^cluster: .*\n\t(.+)$", makefile, flags=re.M)
    assert recipe and recipe[1] == CLUSTER_RECIPE
    assert re.search(r"^PORT \?= 50051$", makefile, flags=re.M)  # the router's port the page documents


@pytest.mark.slow
def test_the_sharded_walk_through_runs_as_written(tmp_path: Path) -> None:
    ports = _free_ports(len(DOC_PORTS))

    def localise(text: str) -> str:
        for documented, port in zip(DOC_PORTS, ports):
            text = text.replace(f"127.0.0.1:{documented}", f"127.0.0.1:{port}")
        return text

    cluster: ClusterCommand | None = None
    last_output = ""
    ran = set()
    try:
        for line, language, code, skipped in section_blocks():
            where = f"docs/deployment.md:{line}"
            if skipped:
                continue
            ran.add(language)
            if language == "yaml":
                name = re.match(r"# (\S+\.ya?ml)\s*$", code.splitlines()[0])
                assert name, f"{where}: a YAML block names its file on its first line (# file.yaml)"
                (tmp_path / name[1]).write_text(code)
            elif language == "text":
                for expected in code.splitlines():
                    pattern = re.escape(expected).replace("sha256:", "sha256:[0-9a-f]{64}")
                    assert re.search(pattern, last_output), f"{where}: {expected!r} not in:\n{last_output}"
            elif language == "python":
                proc = subprocess.run(
                    [sys.executable, "-c", localise(code)], cwd=tmp_path, capture_output=True, text=True, timeout=300
                )
                assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stderr:\n{proc.stderr}"
            else:
                assert language == "bash", f"{where}: a ```{language} block"
                last_output = ""
                for command in code.splitlines():
                    argv = shlex.split(command, comments=True)
                    if not argv:
                        continue
                    if argv[:2] == ["make", "cluster"]:
                        assert cluster is None, f"{where}: a second cluster"
                        assert len(argv) == 3 and argv[2].startswith("ARGS="), f"{where}: {command}"
                        cluster = ClusterCommand(argv[2].removeprefix("ARGS="), ports[0], tmp_path)
                        cluster.wait()
                        continue
                    assert argv[0] == "embserve", f"{where}: {command!r} is not an embserve command"
                    argv = shlex.split(localise(command), comments=True)
                    proc = subprocess.run(
                        [str(BIN), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
                    )
                    assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr}"
                    last_output += proc.stdout
        assert ran == {"yaml", "bash", "text", "python"}
        assert cluster is not None, "the page starts no cluster"
        addresses = "".join(cluster.out)
        for k, port in enumerate(ports[1:]):
            assert f"shard {k} serving on 127.0.0.1:{port}" in addresses
    finally:
        if cluster is not None:
            assert cluster.stop() == 0
