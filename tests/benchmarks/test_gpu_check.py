"""The GPU check: refuses clearly without CUDA, and its benchmark harness measures both engines (here on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embserve.benchmarks.gpu_check import bench_engine
from embserve.embeddings import ModelConfig, build_serving_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on hosts without CUDA")
def test_without_cuda_it_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embserve.benchmarks.gpu_check", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device on this host"), proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_bench_engine_measures_both_paths(small_config: ModelConfig, engine: str) -> None:
    model = build_serving_model(small_config, engine=engine)
    r = bench_engine(model, 64, iterations=3, warmup=1)
    assert (r.engine, r.device, r.batch_size, r.iterations) == (engine, "cpu", 64, 3)
    assert r.ids_per_example == len(model.keys)
    assert r.forward_examples_per_s > 0 and r.executor_examples_per_s > 0
    assert 0 < r.executor_p50_ms <= r.executor_p99_ms
