"""docs/weights.md runs as written: every block of the page, in order, in one folder, as a reader would follow it.

- ```bash lines are `embserve` commands, run as written; `embserve serve` gets a free port (`--port 0
  --metrics-port 0`) and is stopped once it serves, after checking that the version it reports (log, metadata,
  responses, metrics) is the one `export`/`convert` printed for that checkpoint.
- ```text blocks are the output of the commands just before them; each line must appear in it (digests aside).
- ```python blocks run in a fresh process after a prelude that defines what a training job holds: `model` and
  `dmp_model`, the seed module of `train.yaml` (trained weights: a seeded init) next to a dense layer.
- ```yaml blocks whose first line is `# <file>` are written to that file.
- `my_model.yaml` and `old_weights.pt` stand for a checkpoint the reader already has.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from embserve.benchmarks.procs import ServerProcess
from embserve.client import Client
from embserve.embeddings import LargeEmbeddings, init_weights, save_checkpoint
from tests.support import make_config, write_model_config

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "weights.md"
BIN = Path(sys.executable).parent / "embserve"
LANGUAGES = ("bash", "python", "yaml", "text")
PRELUDE = """
import torch
from embserve.embeddings import LargeEmbeddings, init_weights, load_model_config


class TrainedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.large_embeddings = LargeEmbeddings(load_model_config("train.yaml"))
        init_weights(self.large_embeddings, 7)
        self.mlp = torch.nn.Linear(40, 1)


model = dmp_model = TrainedModel()
"""
WROTE = re.compile(r"^wrote (\S+) \(version (\S+)\)", re.MULTILINE)
DIGEST = re.compile(r"[0-9a-f]{12}")


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, language, code) for every fenced block of a page, in page order."""
    lines = path.read_text().splitlines()
    out: list[tuple[int, str, str]] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence != "```":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            out.append((i + 1, fence[3:], "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return out


def _reader_files(folder: Path) -> None:
    config = make_config([{"name": "user", "num_embeddings": 50, "embedding_dim": 4}], name="my_model")
    write_model_config(config, folder / "my_model.yaml")
    old = LargeEmbeddings(config)
    init_weights(old, 5)
    save_checkpoint(old, folder / "old_weights.pt")


def _serve(argv: list[str], versions: dict[str, str], where: str) -> None:
    checkpoint = argv[argv.index("--checkpoint") + 1]
    assert checkpoint in versions, f"{where}: {checkpoint} is served before a command on the page writes it"
    with ServerProcess([str(BIN), *argv[1:], "--port", "0", "--metrics-port", "0"], "embserve") as server:
        serving = server.wait_ready(120)
        version = versions[checkpoint]
        assert serving["version"] == version, where
        with Client(server.address, timeout=30) as client:
            assert client.metadata().version == version, where
            assert client.lookup({client.metadata().keys[0]: [[1]]}).model_version == version, where
        assert any(f"version={version}" in name for name in server.metrics()), where


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "<!-- not run" not in PAGE.read_text()  # every block runs
    monkeypatch.chdir(tmp_path)  # the page's relative paths, for `embserve serve` too
    _reader_files(tmp_path)
    versions: dict[str, str] = {}
    last_output = ""
    seen = set()
    for line, language, code in blocks(PAGE):
        where = f"docs/weights.md:{line}"
        assert language in LANGUAGES, f"{where}: a ```{language} block; this test runs {LANGUAGES}"
        seen.add(language)
        if language == "yaml":
            name = re.match(r"# (\S+\.ya?ml)\s*$", code.splitlines()[0])
            assert name, f"{where}: a YAML block names its file on its first line (# file.yaml)"
            (tmp_path / name[1]).write_text(code)
        elif language == "text":
            for expected in code.splitlines():
                pattern = DIGEST.sub("[0-9a-f]{12}", re.escape(expected))
                assert re.search(pattern, last_output), f"{where}: {expected!r} is not in the output:\n{last_output}"
        elif language == "python":
            proc = subprocess.run(
                [sys.executable, "-c", PRELUDE + code], cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stderr:\n{proc.stderr}"
        else:
            last_output = ""
            for command in code.splitlines():
                argv = shlex.split(command, comments=True)
                if not argv:
                    continue
                assert argv[0] == "embserve", f"{where}: {command!r} is not an embserve command"
                if argv[1] == "serve":
                    _serve(argv, versions, where)
                    continue
                proc = subprocess.run([str(BIN), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr}"
                last_output += proc.stdout
                versions.update(dict(WROTE.findall(proc.stdout)))
    assert seen == set(LANGUAGES)
    assert len(versions) >= 4  # export, re-save, and both conversions printed a version
