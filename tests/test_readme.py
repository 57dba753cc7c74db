"""Every ```python block in README.md and docs/*.md runs as written against a live server, and so does every
`embserve query` line of the ```bash blocks.

A block that genuinely cannot run here (it needs a training job, a cluster or CUDA) is marked by the line before
its opening fence: `<!-- not run: <reason> -->`. Blocks run in a fresh process, in an empty directory, with the
documented address (`127.0.0.1:50051` / `localhost:50051`) replaced by the test server's. Pages call the quickstart's
server (the built-in `default` model) unless `MODEL_OF_PAGE` names another.

docs/weights.md is a walk-through whose blocks build on each other (train, convert, serve); `tests/test_docs_weights.py`
runs all of its blocks, in order, in one folder. docs/deployment.md's sharded walk-through is run the same way by
`tests/test_docs_deployment.py`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embserve.embeddings import build_serving_model, load_model_config
from tests.support import ServerHandle, make_config, start_server

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGHS = {"docs/weights.md", "docs/deployment.md"}  # run block by block, in order, by their own tests
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in WALKTHROUGHS)]
NOT_RUN = re.compile(r"^<!-- not run: .+ -->$")
DOC_ADDRESSES = ("127.0.0.1:50051", "localhost:50051")
MODEL_OF_PAGE = {"docs/oip.md": "small"}  # its example speaks to the test suite's small model by name
BIN = Path(sys.executable).parent / "embserve"


def code_blocks(path: Path, language: str) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, whether it is marked not run) for each ```language block of a page."""
    lines = path.read_text().splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            previous = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start + 1 : j]), bool(NOT_RUN.match(previous))))
            i = j
        i += 1
    return blocks


def _params(language: str) -> list[object]:
    out: list[object] = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for line, code, skipped in code_blocks(page, language):
            if language == "bash" and "embserve query" not in code:
                continue
            marks = [pytest.mark.skip(reason="marked <!-- not run -->")] if skipped else []
            out.append(pytest.param(rel, code, id=f"{rel}:{line}", marks=marks))
    return out


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str], ServerHandle]]:
    """Servers by model name, started on first use and kept for the module."""
    from embserve.server.config import ServerConfig

    started: dict[str, ServerHandle] = {}
    logs = Path(tempfile.mkdtemp(prefix="embserve-docs-updates-"))

    def get(model: str) -> ServerHandle:
        if model not in started:
            config = make_config() if model == "small" else load_model_config(model)
            serving = build_serving_model(config, engine="fused")
            server_config = ServerConfig.model_validate(
                {
                    "port": 0,
                    "metrics_port": None,
                    "grace_period_s": 1.0,
                    "batching": {"max_queue_wait_ms": 30_000},
                    "updates": {"enabled": True, "log_dir": str(logs / model)},  # docs/client.md's row updates
                }
            )
            started[model] = start_server(server_config, serving)
        return started[model]

    yield get
    for handle in started.values():
        handle.stop()
    shutil.rmtree(logs, ignore_errors=True)


def _localise(code: str, server: ServerHandle) -> str:
    port = server.address.rsplit(":", 1)[1]
    for documented in DOC_ADDRESSES:
        code = code.replace(documented, f"{documented.split(':')[0]}:{port}")
    return code


def test_the_marker_is_rare() -> None:
    """Skipping is for blocks that cannot run here, not for blocks that are merely inconvenient."""
    blocks = [b for page in PAGES for b in code_blocks(page, "python")]
    assert blocks and sum(skipped for _, _, skipped in blocks) <= 5
    assert not any(skipped for _, _, skipped in code_blocks(ROOT / "README.md", "python"))


@pytest.mark.parametrize(("page", "code"), _params("python"))
def test_python_block_runs(page: str, code: str, servers: Callable[[str], ServerHandle], tmp_path: Path) -> None:
    server = servers(MODEL_OF_PAGE.get(page, "default"))
    proc = subprocess.run(
        [sys.executable, "-c", _localise(code, server)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{page} block failed:\n{code}\n--- stderr:\n{proc.stderr}"


@pytest.mark.parametrize(("page", "code"), _params("bash"))
def test_embserve_query_lines_run(page: str, code: str, servers: Callable[[str], ServerHandle], tmp_path: Path) -> None:
    server = servers(MODEL_OF_PAGE.get(page, "default"))
    for line in code.splitlines():
        if "embserve query" not in line:
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0].endswith("embserve") and argv[1] == "query", line
        if "--address" not in argv:
            argv += ["--address", server.address]
        proc = subprocess.run(
            [str(BIN), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0 and proc.stdout, f"{page}: {line}\n{proc.stderr}"
