"""Where a call's CPU goes: the server's CPU per call under load, split into its stages.

The total is measured from outside: the server process's CPU time (all threads, from /proc) over a closed-loop run,
divided by the calls it answered, for each transport, against embserve and the no-op server. The stages are
measured in process on the same requests: parse, validate, batcher, executor (assembly, forward, framing) at the
batch size the server formed. What the total leaves over is gRPC and the event loop.

    python -m embserve.benchmarks.breakdown                      # small workload, 64 callers, 5 s per run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from embserve.embeddings import build_serving_model
from embserve.server.batcher import DynamicBatcher
from embserve.server.decode import KeyOrders, decode_lookup, parse_message
from embserve.server.executor import BatchExecutor
from embserve.server.framing import ResponseEncoder, rows_as_bytes
from embserve.server.request import ModelSchema, SparseRequest
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import OutputDType, pack_features

from .loadgen import TRANSPORTS, closed_loop
from .procs import ServerProcess, embserve_command, noop_command
from .report import hardware
from .workloads import WORKLOADS

__all__ = ["main"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _per_item_us(fn: Callable[[int], object], count: int, seconds: float = 1.0) -> float:
    """Median-of-5 microseconds per call of `fn(i)`, after a warm-up pass."""
    for i in range(min(count, 8)):
        fn(i)
    runs = []
    for _ in range(5):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 5:
            fn(n % count)
            n += 1
        runs.append((time.perf_counter() - start) / n * 1e6)
    return float(np.median(runs))


def _batcher_us(items: Sequence[SparseRequest], batch: int) -> float:
    """Batcher overhead per request: queue, form batches of `batch` examples, fan results out (no compute)."""

    async def run() -> float:
        async def nothing(reqs: list[SparseRequest]) -> list[int]:
            return [0] * len(reqs)

        batcher: DynamicBatcher[SparseRequest, int] = DynamicBatcher(
            nothing,
            size_of=lambda r: r.batch_size,
            max_batch_size=batch,
            max_queue_delay_s=0.0,
            max_queue_size=1 << 30,
        )
        batcher.start()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            await asyncio.gather(*(batcher.submit(items[(n + i) % len(items)]) for i in range(64)))
            n += 64
        elapsed = time.perf_counter() - start
        await batcher.close()
        return elapsed / n * 1e6

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small", choices=list(WORKLOADS))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]()
    requests = workload.requests(1024, seed=0)
    payloads = [
        pb.LookupRequest(features=pack_features(r.keys, r.batch_size, r.lengths, r.values)).SerializeToString()
        for r in requests
    ]
    sizes = [r.batch_size for r in requests]
    min_bytes = [s * workload.config.output_dim * 4 for s in sizes]

    totals: dict[tuple[str, str], tuple[float, float, float]] = {}  # (server, transport) -> (us/call, calls/s, batch)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.yaml"
        model_path.write_text(yaml.safe_dump(workload.config.model_dump(mode="json", exclude_none=True)))
        servers = {
            "embserve": ServerProcess(embserve_command(model_path, "--max-queue-wait-ms", "30000"), "embserve"),
            "no-op": ServerProcess(noop_command(workload.config.output_dim), "no-op"),
        }
        for s in servers.values():
            s.start()
        try:
            for s in servers.values():
                s.wait_ready()
            for transport in TRANSPORTS:
                for name, server in servers.items():
                    assert server.proc is not None
                    before_cpu, before_m = _cpu_seconds(server.proc.pid), server.metrics()
                    res = asyncio.run(
                        closed_loop(
                            server.address,
                            payloads,
                            sizes,
                            min_bytes,
                            concurrency=args.concurrency,
                            duration_s=args.duration,
                            warmup_s=0.0,
                            transport=transport,
                        )
                    )
                    cpu = _cpu_seconds(server.proc.pid) - before_cpu
                    after_m = server.metrics()
                    batches = after_m.get("embserve_batches_total", 0) - before_m.get("embserve_batches_total", 0)
                    calls = res.ok + sum(res.errors.values())
                    batch = (res.examples / batches) if batches else float("nan")
                    totals[(name, transport)] = (1e6 * cpu / max(calls, 1), res.rps, batch)
        finally:
            for s in servers.values():
                s.stop()

    model = build_serving_model(workload.config)
    schema = ModelSchema.of(model, max_request_examples=16384, max_request_ids=4_000_000)
    orders = KeyOrders(schema)
    messages = [parse_message(pb.LookupRequest, p) for p in payloads]
    sparse = [decode_lookup(m, schema, orders) for m in messages]
    parse_us = _per_item_us(lambda i: parse_message(pb.LookupRequest, payloads[i]), len(payloads))
    validate_us = _per_item_us(lambda i: decode_lookup(messages[i], schema, orders), len(messages))
    mean_size = float(np.mean(sizes))
    lines = [
        f"Hardware: {hardware()['cpu']}, {os.cpu_count()} cores; workload `{args.workload}`, {args.concurrency} "
        f"closed-loop callers, {args.duration:.0f} s per run; load generator on the same cores.",
        f"Command: `python -m embserve.benchmarks.breakdown {' '.join(argv or sys.argv[1:])}`",
        "",
        "| server, transport | calls/s | server CPU per call | parse | validate | batcher | assemble + forward | "
        "frame | gRPC, event loop, rest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    executor = BatchExecutor(model, pipelined=False)
    encoder = ResponseEncoder(
        keys=model.keys, dims=model.dims, offsets=model.offsets, model_name="m", model_version="v"
    )
    try:
        for (name, transport), (total, rps, batch) in totals.items():
            if name == "no-op":
                lines.append(f"| no-op, {transport} | {rps:,.0f} | {total:,.0f} us | | | | | | {total:,.0f} us |")
                continue
            per_batch = max(1, round(batch / mean_size))
            groups = [sparse[i : i + per_batch] for i in range(0, len(sparse) - per_batch, per_batch)]
            executor_us = _per_item_us(lambda i: executor.run_blocking(groups[i]), len(groups)) / per_batch
            rows = torch.zeros((round(mean_size), model.output_dim))
            frame_us = _per_item_us(
                lambda i: encoder.encode(
                    rows_as_bytes(rows, OutputDType.FLOAT32),
                    batch_size=rows.shape[0],
                    output_dtype=OutputDType.FLOAT32,
                    request_id="r#1",
                ),
                1,
            )
            batcher_us = _batcher_us(sparse, max(1, round(batch)))
            known = parse_us + validate_us + batcher_us + executor_us
            lines.append(
                f"| embserve, {transport} | {rps:,.0f} | {total:,.0f} us | {parse_us:.1f} us | {validate_us:.1f} us | "
                f"{batcher_us:.1f} us | {executor_us - frame_us:.1f} us | {frame_us:.1f} us | "
                f"{total - known:,.0f} us |"
            )
            lines.append(f"|  (batch {batch:.1f} examples, {per_batch} requests) | | | | | | | | |")
    finally:
        executor.shutdown()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
