"""The client install needs only grpcio, protobuf and numpy: install it into a fresh venv and call a server."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embserve.client import Client
from embserve.embeddings import ServingModel
from tests.support import ServerHandle

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import importlib.util
assert importlib.util.find_spec("torch") is None, "torch must not be installed here"
from embserve.client import Client
with Client(sys.argv[1]) as c:
    r = c.lookup({"user": [[1, 2], [3]], "hashtags": [[4], []]}, weights={"hashtags": [[0.5], []]})
    print(json.dumps({"health": c.health(), "version": r.model_version, "rows": r.embeddings.tolist()}))
"""


@pytest.mark.slow
def test_client_installs_and_works_without_torch(
    tmp_path: Path, server_factory: Callable[..., ServerHandle], small_serving: ServingModel
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("protos", "client", "server", "embeddings", "benchmarks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(src)], check=True, timeout=600)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    assert "torch" not in freeze.lower() and "grpcio" in freeze.lower()

    handle = server_factory(small_serving)
    out = subprocess.run(
        [str(py), "-c", SCRIPT, handle.address], check=True, capture_output=True, text=True, timeout=60
    )
    got = json.loads(out.stdout)
    with Client(handle.address) as client:
        expected = client.lookup({"user": [[1, 2], [3]], "hashtags": [[4], []]}, weights={"hashtags": [[0.5], []]})
    assert got["health"] == "SERVING" and got["version"] == small_serving.version
    np.testing.assert_array_equal(np.array(got["rows"], dtype=np.float32), expected.embeddings)

    query = subprocess.run(
        [str(env_dir / "bin" / "embserve"), "query", "--address", handle.address, "--feature", "user=1,2|3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert query.returncode == 0, query.stderr
    assert "model small" in query.stdout and "2 x 40 float32" in query.stdout
    serve = subprocess.run([str(env_dir / "bin" / "embserve"), "serve"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "embserve[server]" in serve.stderr
