"""Scaling figures: `--workers` 1 against N on the `small` and `large` workloads (examples/s, p99, total memory),
and each `serving_dtype` (in-process forward examples/s and table bytes).

    python -m embserve.benchmarks.scaling --workers 1 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from embserve.embeddings import build_serving_model, model_config_from_dict

from .ceilings import compute_ceiling
from .loadgen import closed_loop
from .procs import ServerProcess, children, embserve_command, pss_bytes
from .report import hardware
from .workloads import WORKLOADS, encode_lookups

__all__ = ["main"]


def workers_rows(counts: list[int], duration: float, concurrency: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("small", "large"):
            wl = WORKLOADS[name]()
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(wl.config.model_dump(mode="json", exclude_none=True)))
            requests = wl.requests(256 if name == "small" else 32)
            sizes = [r.batch_size for r in requests]
            payloads = encode_lookups(requests, "float32")
            for n in counts:
                server = ServerProcess(embserve_command(path, "--workers", str(n), "--no-metrics"), f"{n} workers")
                server.start()
                try:
                    server.wait_ready()  # the first worker's "serving"; the rest follow within a second
                    asyncio.run(
                        closed_loop(
                            server.address,
                            payloads,
                            sizes,
                            [0] * len(sizes),
                            concurrency=8,
                            duration_s=1.0,
                            warmup_s=1.0,
                        )
                    )
                    res = asyncio.run(
                        closed_loop(
                            server.address,
                            payloads,
                            sizes,
                            [0] * len(sizes),
                            concurrency=concurrency,
                            duration_s=duration,
                            warmup_s=1.0,
                        )
                    )
                    assert server.proc is not None
                    pids = [server.proc.pid] + children(server.proc.pid)
                    memory = sum(pss_bytes(p) for p in pids)
                finally:
                    server.stop()
                rows.append(
                    {
                        "workload": name,
                        "workers": n,
                        "callers": concurrency,
                        "rps": res.rps,
                        "eps": res.eps,
                        "p50_ms": res.percentile(50),
                        "p99_ms": res.percentile(99),
                        "errors": res.errors,
                        "total_pss_mb": memory / 2**20,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def dtype_rows(duration: float) -> list[dict[str, Any]]:
    wl = WORKLOADS["large"]()
    requests = wl.requests(8)
    rows = []
    for dtype in ("fp32", "fp16", "int8", "int4"):
        data = wl.config.model_dump(mode="json", exclude_none=True)
        for t in data["tables"]:
            t["serving_dtype"] = dtype
        model = build_serving_model(model_config_from_dict(data))
        eps = compute_ceiling(model, requests, 2048, seconds=duration)
        rows.append({"serving_dtype": dtype, "eps": eps, "table_mb": sum(model.weight_bytes.values()) / 2**20})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    workers = workers_rows(args.workers, args.duration, args.callers)
    dtypes = dtype_rows(args.duration)
    result = {"hardware": hardware(), "workers": workers, "serving_dtypes": dtypes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| workload | workers | callers | req/s | examples/s | p50 ms | p99 ms | memory (PSS, all processes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in workers:
        lines.append(
            f"| {r['workload']} | {r['workers']} | {r['callers']} | {r['rps']:,.0f} | {r['eps']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['total_pss_mb']:,.0f} MiB |"
        )
    lines += [
        "",
        "| serving_dtype | forward examples/s (in process, batches of 2,048) | table bytes |",
        "|---|---:|---:|",
    ]
    for r in dtypes:
        lines.append(f"| {r['serving_dtype']} | {r['eps']:,.0f} | {r['table_mb']:,.0f} MiB |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
