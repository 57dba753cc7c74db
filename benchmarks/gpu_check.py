"""The GPU check (`make gpu-check`): on a CUDA host, run the CUDA tests and a short benchmark of both engines, and
write one JSON report.

    python -m embserve.benchmarks.gpu_check [--out benchmarks/results/gpu_check.json] [--batch-sizes 256,1024,4096]

The benchmark measures, for the `fused` and `eager` engines at each batch size:
- `forward`: the model alone on inputs already on the device (examples/s, and ms per batch);
- `executor`: what the server does per batch through `BatchExecutor` on the device: assembly, pinned host memory and
  non-blocking copies on a side stream, forward, copy back and response framing, one batch at a time (latency
  p50/p99) and with two batches in flight (examples/s), as the server runs on CUDA.

On a host without CUDA it prints one line saying so and exits 2; nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EngineResult", "bench_engine", "main"]

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ("tests/server/test_device.py",)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
DEFAULT_BATCH_SIZES = (256, 1024, 4096)
EXIT_NO_CUDA = 2


@dataclasses.dataclass(frozen=True)
class EngineResult:
    """One engine at one batch size."""

    engine: str
    device: str
    batch_size: int
    ids_per_example: int
    forward_examples_per_s: float
    forward_ms: float
    executor_examples_per_s: float
    executor_p50_ms: float
    executor_p99_ms: float
    iterations: int


def _requests(model: Any, batch_size: int, ids_per_bag: int, seed: int) -> list[Any]:
    """Four requests that together make one batch of `batch_size` examples, every key with `ids_per_bag` ids."""
    from embserve.server.request import SparseRequest

    rng = np.random.default_rng(seed)
    rows = np.array([t.num_embeddings for t in sorted(model.config.tables, key=lambda t: model.keys.index(t.name))])
    keys = len(model.keys)
    sizes = [batch_size // 4] * 3 + [batch_size - 3 * (batch_size // 4)]
    out = []
    for size in sizes:
        lengths = np.full((keys, size), ids_per_bag, dtype=np.int32)
        values = np.concatenate([rng.integers(0, rows[k], size * ids_per_bag) for k in range(keys)]).astype(np.int64)
        out.append(
            SparseRequest(
                batch_size=size,
                key_index=np.arange(keys),
                lengths=lengths,
                values=values,
                weights=None,
                ids_per_key=lengths.sum(axis=1, dtype=np.int64),
            )
        )
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_engine(
    model: Any, batch_size: int, *, iterations: int = 50, warmup: int = 5, ids_per_bag: int = 1
) -> EngineResult:
    """Times one served model at one batch size (see the module docstring for what is measured)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embserve.server.assembler import assemble
    from embserve.server.executor import BatchExecutor

    requests = _requests(model, batch_size, ids_per_bag, seed=batch_size)
    batch = assemble(requests, len(model.keys), with_weights=model.has_weighted_tables)
    features = KeyedJaggedTensor(
        keys=list(model.keys),
        values=torch.from_numpy(batch.values).to(model.device),
        lengths=torch.from_numpy(batch.lengths).to(model.device),
        weights=None if batch.weights is None else torch.from_numpy(batch.weights).to(model.device),
    )
    with torch.inference_mode():
        for _ in range(warmup):
            model.forward(features)
        _sync(model.device)
        start = time.perf_counter()
        for _ in range(iterations):
            model.forward(features)
        _sync(model.device)
        forward_s = (time.perf_counter() - start) / iterations

    executor = BatchExecutor(model, pipelined=True)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                executor.run_blocking(requests)
            latencies = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                executor.run_blocking(requests)  # returns after the output is back on the host
                latencies.append(time.perf_counter() - t0)

        async def pipelined() -> float:
            in_flight = asyncio.Semaphore(2)  # the server's default on CUDA (max_inflight_batches)

            async def one() -> None:
                async with in_flight:
                    await executor.run(requests)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(iterations)))
            return time.perf_counter() - t0

        pipelined_s = asyncio.run(pipelined())
    finally:
        executor.shutdown()
    lat = np.array(latencies) * 1e3
    return EngineResult(
        engine=model.engine.value,
        device=str(model.device),
        batch_size=batch_size,
        ids_per_example=ids_per_bag * len(model.keys),
        forward_examples_per_s=round(batch_size / forward_s, 1),
        forward_ms=round(forward_s * 1e3, 3),
        executor_examples_per_s=round(batch_size * iterations / pipelined_s, 1),
        executor_p50_ms=round(float(np.percentile(lat, 50)), 3),
        executor_p99_ms=round(float(np.percentile(lat, 99)), 3),
        iterations=iterations,
    )


def run_cuda_tests() -> dict[str, Any]:
    """Runs the CUDA tests in a pytest process of their own; returns its exit code and summary line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *CUDA_TESTS, "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "command": f"python -m pytest {' '.join(CUDA_TESTS)}",
        "exit_code": proc.returncode,
        "summary": lines[-1] if lines else "",
        "skipped": [line for line in lines if line.startswith("SKIPPED")],
    }


def _table(results: Sequence[EngineResult]) -> str:
    head = "| engine | batch | forward examples/s | forward ms | executor examples/s | p50 ms | p99 ms |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(
            f"| {r.engine} | {r.batch_size:,} | {r.forward_examples_per_s:,.0f} | {r.forward_ms:.3f} | "
            f"{r.executor_examples_per_s:,.0f} | {r.executor_p50_ms:.3f} | {r.executor_p99_ms:.3f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embserve.benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report (default: %(default)s)")
    parser.add_argument("--model", default="default", help="model config, path or built-in name (default: %(default)s)")
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="examples per batch, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--iterations", type=int, default=50, help="timed batches per point (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only, without the CUDA tests")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device on this host (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run it on a host with an NVIDIA GPU and the CUDA fbgemm-gpu wheel (make setup installs it there)",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA

    from embserve.benchmarks.report import hardware
    from embserve.embeddings import build_serving_model, load_model_config

    tests = None if args.skip_tests else run_cuda_tests()
    config = load_model_config(args.model)
    results: list[EngineResult] = []
    for engine in ("fused", "eager"):
        model = build_serving_model(config, device=args.device, engine=engine)
        for size in (int(x) for x in args.batch_sizes.split(",")):
            results.append(bench_engine(model, size, iterations=args.iterations))
        del model
        torch.cuda.empty_cache()
    report = {
        "hardware": {**hardware(), "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(args.device)},
        "command": "python -m embserve.benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.name,
        "tests": tests,
        "results": [dataclasses.asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    if tests is not None:
        print(f"CUDA tests: {tests['summary']} (exit code {tests['exit_code']})")
    print(f"report: {args.out}")
    return 0 if tests is None or tests["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
