"""CPU per lookup: the server's CPU seconds per 1,000 examples at fixed offered loads, beside the no-op server's.

For each workload and API (unary Lookup, LookupStream, ModelInfer), Poisson arrivals at 25, 50 and 75% of unary
embserve's closed-loop peak; the server's CPU is read from /proc/<pid>/stat of the server process and every
process below it (workers), before and after each point, and divided by the examples answered. The same loads
against the no-op server (`noop_server`: parses each request and answers a prebuilt response) give what gRPC and
the event loop alone cost. Then the caller's own CPU per lookup through the SDK (`AsyncClient`, unary and stream
transports) at half the peak, read from this process's CPU time (all its threads, gRPC's included).

    python -m embserve.benchmarks.cpu                              # every workload, 5 s per point
    python -m embserve.benchmarks.cpu --workloads small --duration 0.5 --out /tmp/cpu
    python -m embserve.benchmarks.cpu --server-args '--batch-policy budget' --out benchmarks/results/cpu-budget
    python -m embserve.benchmarks.cpu --ray-python .venv-ray/bin/python     # beside Ray Serve (make bench-ray)

With `--ray-python`, the same model served by Ray Serve (`ray_server`: direct gRPC ingress, `@serve.batch`, run
by a Python that has Ray) takes the same unary Lookup loads, and a closed loop of 64 callers on one channel gives
each server's peak examples/s: embserve over Lookup and over LookupStream, Ray over Lookup (its gRPC ingress has
no bidirectional streams).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embserve.oip import wire as oip
from embserve.server.config import DEFAULT_MAX_BATCH_SIZE
from embserve.v1.wire import LOOKUP_METHOD

from .loadgen import LoadResult, closed_loop, open_loop
from .procs import ServerProcess, children, embserve_command, noop_command
from .report import hardware
from .workloads import WORKLOADS, Request, Workload, encode_lookups, encode_model_infer

__all__ = ["CallerRecord", "CpuRecord", "main", "measure_workload", "process_tree_cpu", "unary_peak"]

FRACTIONS = (0.25, 0.5, 0.75)
SDK_FRACTION = 0.5
DISTINCT_REQUESTS = {"small": 1024, "large": 32, "multihot": 32}
PEAK_CALLERS = 64
# API -> (transport, method, protocol)
APIS: dict[str, tuple[str, str, str]] = {
    "Lookup": ("unary", LOOKUP_METHOD, "v1"),
    "LookupStream": ("stream", LOOKUP_METHOD, "v1"),
    "ModelInfer": ("unary", oip.MODEL_INFER_METHOD, "oip"),
}
RAY_APIS = ("Lookup",)  # Ray Serve's gRPC ingress: unary and server-streaming calls only
CLOSED_CALLERS = 64


@dataclasses.dataclass
class CpuRecord:
    """One server, API and offered load: its CPU per 1,000 examples answered, and the latency of the answers."""

    workload: str
    api: str
    server: str
    load_fraction: float
    rate: float
    duration_s: float
    requests: int
    examples: int
    errors: dict[str, int]
    server_cpu_s: float
    cpu_s_per_1k_examples: float
    cpu_us_per_request: float
    loadgen_cpu_us_per_request: float  # the raw-bytes load generator's own CPU, for scale
    p50_ms: float
    p99_ms: float


@dataclasses.dataclass
class CallerRecord:
    """The SDK's own CPU per lookup over one transport at one offered load."""

    workload: str
    transport: str
    rate: float
    duration_s: float
    lookups: int
    errors: int
    caller_cpu_us_per_lookup: float
    p50_ms: float
    p99_ms: float


@dataclasses.dataclass
class ClosedRecord:
    """One server and API in closed loop: `callers` callers on one channel, each sending its next call on an answer."""

    workload: str
    server: str
    api: str
    callers: int
    duration_s: float
    calls_per_s: float
    examples_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    server_cpu_s: float


def ray_command(ray_python: str, model_path: Path, max_batch_size: int) -> list[str]:
    """`ray_server` for a model YAML under a Python that has Ray Serve."""
    return [
        ray_python,
        "-m",
        "embserve.benchmarks.ray_server",
        "--model",
        str(model_path),
        "--max-batch-size",
        str(max_batch_size),
    ]


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the process ended
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process and every process below it."""
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        ticks += _cpu_ticks(p)
        todo += children(p)
    return ticks / os.sysconf("SC_CLK_TCK")


def _percentile(latencies_ms: np.ndarray | list[float], q: float) -> float:
    return float(np.percentile(latencies_ms, q)) if len(latencies_ms) else float("nan")


def unary_peak(address: str, payloads: Sequence[bytes], sizes: Sequence[int], duration_s: float) -> float:
    """Unary Lookup calls/s with `PEAK_CALLERS` closed-loop callers."""
    res = asyncio.run(
        closed_loop(
            address,
            payloads,
            sizes,
            [0] * len(sizes),
            concurrency=PEAK_CALLERS,
            duration_s=duration_s,
            warmup_s=min(1.0, duration_s),
        )
    )
    return res.rps


def _server_point(
    server: ServerProcess,
    payloads: Sequence[bytes],
    sizes: Sequence[int],
    *,
    rate: float,
    duration_s: float,
    transport: str,
    method: str,
) -> tuple[LoadResult, float, float]:
    """One open-loop point: its result, the server tree's CPU seconds and the load generator's over it."""
    before, caller_before = process_tree_cpu(server.pid), time.process_time()
    res = asyncio.run(
        open_loop(
            server.address,
            payloads,
            sizes,
            [0] * len(sizes),
            rate=rate,
            duration_s=duration_s,
            warmup_s=0.0,
            transport=transport,
            method=method,
        )
    )
    return res, process_tree_cpu(server.pid) - before, time.process_time() - caller_before


def _sdk_point(
    address: str, features: Sequence[dict[str, Any]], *, transport: str, rate: float, duration_s: float
) -> CallerRecord:
    from embserve.client import AsyncClient

    async def run() -> tuple[int, int, list[float], float]:
        rng = np.random.default_rng(0)
        offsets = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.2) + 16))
        offsets = offsets[offsets < duration_s]
        latencies: list[float] = []
        errors = 0
        async with AsyncClient(address, transport=transport, timeout=5.0) as client:
            await client.lookup(features[0])  # the server's limits fetched, streams open
            cpu_before = time.process_time()
            start = time.perf_counter()

            async def one(i: int, scheduled: float) -> None:
                nonlocal errors
                try:
                    await client.lookup(features[i % len(features)])
                except Exception:
                    errors += 1
                    return
                latencies.append(1e3 * (time.perf_counter() - scheduled))

            tasks = []
            for i, offset in enumerate(offsets):
                scheduled = start + float(offset)
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i, scheduled)))
            await asyncio.gather(*tasks)
            cpu = time.process_time() - cpu_before
        return len(latencies), errors, latencies, cpu

    lookups, errors, latencies, cpu = asyncio.run(run())
    return CallerRecord(
        workload="",
        transport=transport,
        rate=rate,
        duration_s=duration_s,
        lookups=lookups,
        errors=errors,
        caller_cpu_us_per_lookup=1e6 * cpu / max(1, lookups + errors),
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
    )


def _features(request: Request) -> dict[str, Any]:
    """A request in the SDK's array form: `{key: (lengths, values)}`."""
    bounds = np.concatenate([[0], np.cumsum(request.lengths.sum(axis=1))])
    return {key: (request.lengths[k], request.values[bounds[k] : bounds[k + 1]]) for k, key in enumerate(request.keys)}


def measure_workload(
    workload: Workload,
    *,
    duration_s: float,
    warmup_s: float,
    fractions: Sequence[float] = FRACTIONS,
    apis: Sequence[str] = tuple(APIS),
    peak: float | None = None,
    sdk: bool = True,
    server_args: Sequence[str] = (),
    ray_python: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[list[CpuRecord], list[CallerRecord], list[ClosedRecord], float]:
    """Every API's CPU per 1,000 examples at each offered load, on embserve and the no-op server (and Ray Serve,
    unary Lookup, under `ray_python`), and the SDK's own CPU per lookup; `peak`: unary embserve's calls/s (measured
    here when not given). Returns the records, the closed-loop records (with Ray only) and the peak the loads were
    taken from."""
    requests = workload.requests(DISTINCT_REQUESTS.get(workload.name, 64), seed=0)
    sizes = [r.batch_size for r in requests]
    payloads = {"v1": encode_lookups(requests), "oip": encode_model_infer(requests, workload.config.name)}
    out_dim = workload.config.output_dim
    records: list[CpuRecord] = []
    callers: list[CallerRecord] = []
    closed: list[ClosedRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / f"{workload.name}.yaml"
        model_path.write_text(yaml.safe_dump(workload.config.model_dump(mode="json", exclude_none=True)))
        # Open loop at most 75% of the peak: a queue budget that never refuses a call of these loads.
        common = ["--max-queue-wait-ms", "30000", "--no-metrics", *server_args]
        servers = {
            "embserve": ServerProcess(embserve_command(model_path, *common), "embserve"),
            "no-op": ServerProcess(noop_command(out_dim), "no-op server"),
        }
        if ray_python:  # Ray's batches as large in examples as embserve's (its default max_batch_size)
            requests_per_batch = max(1, DEFAULT_MAX_BATCH_SIZE // max(sizes))
            servers["ray"] = ServerProcess(ray_command(ray_python, model_path, requests_per_batch), "Ray Serve")
        for s in servers.values():
            s.start()
        try:
            for s in servers.values():
                s.wait_ready()
            for name, s in servers.items():  # every distinct request once, over every API, before measuring
                for api in _apis_of(name, apis):
                    transport, method, protocol = APIS[api]
                    asyncio.run(
                        closed_loop(
                            s.address,
                            payloads[protocol],
                            sizes,
                            [0] * len(sizes),
                            concurrency=8,
                            duration_s=warmup_s,
                            warmup_s=0.0,
                            transport=transport,
                            method=method,
                        )
                    )
            if peak is None:
                peak = unary_peak(servers["embserve"].address, payloads["v1"], sizes, duration_s)
                progress(f"{workload.name}: unary peak {peak:,.0f} calls/s ({PEAK_CALLERS} callers)")
            for fraction in fractions:
                rate = max(1.0, fraction * peak)
                for api in apis:
                    transport, method, protocol = APIS[api]
                    for name in servers:  # alternated, so that a drift of a shared machine hits all alike
                        if api not in _apis_of(name, apis):
                            continue
                        res, cpu, caller_cpu = _server_point(
                            servers[name],
                            payloads[protocol],
                            sizes,
                            rate=rate,
                            duration_s=duration_s,
                            transport=transport,
                            method=method,
                        )
                        calls = res.ok + sum(res.errors.values())
                        rec = CpuRecord(
                            workload=workload.name,
                            api=api,
                            server=name,
                            load_fraction=fraction,
                            rate=rate,
                            duration_s=duration_s,
                            requests=res.ok,
                            examples=res.examples,
                            errors=res.errors,
                            server_cpu_s=cpu,
                            cpu_s_per_1k_examples=1e3 * cpu / max(1, res.examples),
                            cpu_us_per_request=1e6 * cpu / max(1, calls),
                            loadgen_cpu_us_per_request=1e6 * caller_cpu / max(1, calls),
                            p50_ms=res.percentile(50),
                            p99_ms=res.percentile(99),
                        )
                        records.append(rec)
                        progress(_line(rec))
            if ray_python:
                for name, api in (("embserve", "Lookup"), ("embserve", "LookupStream"), ("ray", "Lookup")):
                    if api in apis:
                        closed.append(
                            _closed_point(workload.name, name, servers[name], api, payloads, sizes, duration_s)
                        )
                        progress(_closed_line(closed[-1]))
            if sdk:
                features = [_features(r) for r in requests]
                for transport in ("unary", "stream"):
                    rec2 = _sdk_point(
                        servers["embserve"].address,
                        features,
                        transport=transport,
                        rate=max(1.0, SDK_FRACTION * peak),
                        duration_s=duration_s,
                    )
                    rec2.workload = workload.name
                    callers.append(rec2)
                    progress(
                        f"{workload.name:9s} SDK {transport:6s} {rec2.rate:8,.0f}/s caller CPU "
                        f"{rec2.caller_cpu_us_per_lookup:7.0f} us/lookup p99 {rec2.p99_ms:7.2f} ms"
                    )
        finally:
            for s in servers.values():
                s.stop()
    assert peak is not None
    return records, callers, closed, peak


def _apis_of(server: str, apis: Sequence[str]) -> list[str]:
    return [a for a in apis if a in RAY_APIS] if server == "ray" else list(apis)


def _closed_point(
    workload: str,
    name: str,
    server: ServerProcess,
    api: str,
    payloads: dict[str, list[bytes]],
    sizes: Sequence[int],
    duration_s: float,
) -> ClosedRecord:
    transport, method, protocol = APIS[api]
    before = process_tree_cpu(server.pid)
    res = asyncio.run(
        closed_loop(
            server.address,
            payloads[protocol],
            sizes,
            [0] * len(sizes),
            concurrency=CLOSED_CALLERS,
            duration_s=duration_s,
            warmup_s=min(1.0, duration_s),
            transport=transport,
            method=method,
            connections=1,
        )
    )
    return ClosedRecord(
        workload=workload,
        server=name,
        api=api,
        callers=CLOSED_CALLERS,
        duration_s=duration_s,
        calls_per_s=res.rps,
        examples_per_s=res.eps,
        p50_ms=res.percentile(50),
        p99_ms=res.percentile(99),
        errors=res.errors,
        server_cpu_s=process_tree_cpu(server.pid) - before,
    )


def _closed_line(r: ClosedRecord) -> str:
    return (
        f"{r.workload:9s} {r.api:12s} {r.server:8s} closed loop, {r.callers} callers on one channel: "
        f"{r.calls_per_s:8,.0f} calls/s {r.examples_per_s:9,.0f} examples/s p99 {r.p99_ms:7.2f} ms "
        f"errors {r.errors or '-'}"
    )


def _line(r: CpuRecord) -> str:
    return (
        f"{r.workload:9s} {r.api:12s} {r.server:8s} {r.rate:8,.0f}/s  {1e3 * r.cpu_s_per_1k_examples:8.2f} ms CPU "
        f"per 1k examples  {r.cpu_us_per_request:7.0f} us/call  p50 {r.p50_ms:6.2f} p99 {r.p99_ms:7.2f} ms  "
        f"errors {r.errors or '-'}"
    )


def markdown(
    records: Sequence[CpuRecord],
    callers: Sequence[CallerRecord],
    hw: dict[str, Any],
    command: str,
    closed: Sequence[ClosedRecord] = (),
) -> str:
    lines = [
        "# CPU per lookup",
        "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GiB; Python {hw['python']}, "
        f"torch {hw['torch']}, grpcio {hw['grpcio']}. The load generator shares the cores.",
        "",
        f"Command: `{command}`",
        "",
        "Server CPU (all its processes) per 1,000 examples answered, at open-loop loads that are fractions of unary "
        "embserve's peak; the no-op server at the same loads.",
        "",
        "| workload | API | load | calls/s | embserve CPU ms / 1k ex | no-op CPU ms / 1k ex | embserve us / call | "
        "no-op us / call | embserve p50 ms | embserve p99 ms | no-op p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_key = {(r.workload, r.api, r.load_fraction, r.server): r for r in records}
    for (workload, api, fraction, server), r in by_key.items():
        if server != "embserve":
            continue
        noop = by_key.get((workload, api, fraction, "no-op"))
        n = noop or r
        errors = {**r.errors, **{f"no-op {k}": v for k, v in (noop.errors if noop else {}).items()}}
        lines.append(
            f"| {workload} | {api} | {fraction:.0%} | {r.rate:,.0f} | {1e3 * r.cpu_s_per_1k_examples:,.2f} | "
            f"{1e3 * n.cpu_s_per_1k_examples:,.2f} | {r.cpu_us_per_request:,.0f} | {n.cpu_us_per_request:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {n.p99_ms:.2f} | {errors or '-'} |"
        )
    lines += _ray_tables(by_key, closed)
    if callers:
        lines += [
            "",
            "The caller's own CPU per lookup through the SDK (`AsyncClient`), at half the peak:",
            "",
            "| workload | transport | lookups/s | caller CPU us / lookup | p50 ms | p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for c in callers:
            lines.append(
                f"| {c.workload} | {c.transport} | {c.rate:,.0f} | {c.caller_cpu_us_per_lookup:,.0f} | "
                f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.errors} |"
            )
    return "\n".join(lines) + "\n"


def _ray_tables(by_key: dict[tuple[str, str, float, str], CpuRecord], closed: Sequence[ClosedRecord]) -> list[str]:
    """embserve against Ray Serve: CPU per 1,000 examples at each load (Ray over unary Lookup), and closed loop."""
    rays = {(w, f): r for (w, api, f, server), r in by_key.items() if server == "ray" and api == "Lookup"}
    if not rays:
        return []
    lines = [
        "",
        "Against Ray Serve (unary Lookup, direct gRPC ingress, `@serve.batch`) at the same loads: CPU ms per 1,000 "
        "examples, and embserve's as a fraction of Ray's:",
        "",
        "| workload | load | calls/s | Ray CPU ms / 1k ex | Lookup CPU | LookupStream CPU | Lookup / Ray | "
        "LookupStream / Ray | Ray p99 ms | Lookup p99 ms | LookupStream p99 ms | Ray errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (workload, fraction), ray in rays.items():
        unary = by_key.get((workload, "Lookup", fraction, "embserve"))
        stream = by_key.get((workload, "LookupStream", fraction, "embserve"))
        cells = []
        for r in (unary, stream):
            cells.append(f"{1e3 * r.cpu_s_per_1k_examples:,.2f}" if r else "-")
        for r in (unary, stream):
            cells.append(f"{r.cpu_s_per_1k_examples / ray.cpu_s_per_1k_examples:.2f}x" if r else "-")
        for r in (ray, unary, stream):
            cells.append(f"{r.p99_ms:.2f}" if r else "-")
        lines.append(
            f"| {workload} | {fraction:.0%} | {ray.rate:,.0f} | {1e3 * ray.cpu_s_per_1k_examples:,.2f} | "
            + " | ".join(cells)
            + f" | {ray.errors or '-'} |"
        )
    if closed:
        lines += [
            "",
            f"Closed loop, {CLOSED_CALLERS} callers on one channel:",
            "",
            "| workload | server | API | calls/s | examples/s | vs Ray | p50 ms | p99 ms | server CPU us / call | errors |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        ray_eps = {c.workload: c.examples_per_s for c in closed if c.server == "ray"}
        for c in closed:
            base = ray_eps.get(c.workload)
            versus = f"{c.examples_per_s / base:.2f}x" if base else "-"
            per_call = 1e6 * c.server_cpu_s / max(1.0, c.calls_per_s * c.duration_s)
            lines.append(
                f"| {c.workload} | {c.server} | {c.api} | {c.calls_per_s:,.0f} | {c.examples_per_s:,.0f} | {versus} | "
                f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {per_call:,.0f} | {c.errors or '-'} |"
            )
    return lines


def write_results(
    records: Sequence[CpuRecord],
    callers: Sequence[CallerRecord],
    out_dir: Path,
    command: str,
    peaks: dict[str, float],
    closed: Sequence[ClosedRecord] = (),
) -> dict[str, Path]:
    """Writes cpu.json and cpu.md into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    paths = {"json": out_dir / "cpu.json", "markdown": out_dir / "cpu.md"}
    data = {
        "hardware": hw,
        "command": command,
        "unary_peaks": peaks,
        "records": [dataclasses.asdict(r) for r in records],
        "callers": [dataclasses.asdict(c) for c in callers],
        "closed_loop": [dataclasses.asdict(c) for c in closed],
    }
    paths["json"].write_text(json.dumps(data, indent=1))
    paths["markdown"].write_text(markdown(records, callers, hw, command, closed))
    return paths


def run(
    workloads: Sequence[str],
    *,
    duration_s: float,
    warmup_s: float,
    out_dir: Path,
    command: str,
    fractions: Sequence[float] = FRACTIONS,
    apis: Sequence[str] = tuple(APIS),
    peaks: dict[str, float] | None = None,
    rows: int | None = None,
    sdk: bool = True,
    server_args: Sequence[str] = (),
    ray_python: str | None = None,
) -> dict[str, Path]:
    """Measures every workload and writes the results; `peaks`: unary calls/s per workload, where known."""
    records: list[CpuRecord] = []
    callers: list[CallerRecord] = []
    closed: list[ClosedRecord] = []
    used: dict[str, float] = {}
    for name in workloads:
        workload = WORKLOADS[name](rows) if rows else WORKLOADS[name]()
        recs, calls, closes, used[name] = measure_workload(
            workload,
            duration_s=duration_s,
            warmup_s=warmup_s,
            fractions=fractions,
            apis=apis,
            peak=(peaks or {}).get(name),
            sdk=sdk,
            server_args=server_args,
            ray_python=ray_python,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        records += recs
        callers += calls
        closed += closes
    return write_results(records, callers, out_dir, command, used, closed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--apis", nargs="+", default=list(APIS), choices=list(APIS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS), help="of the unary peak")
    parser.add_argument("--peak", type=float, help="unary calls/s the loads are fractions of (default: measured)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per server and API")
    parser.add_argument("--rows", type=int, help="rows per table (default: the workload's)")
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK's caller CPU")
    parser.add_argument(
        "--server-args", default="", help="more `embserve serve` flags, e.g. '--batch-policy budget' (one string)"
    )
    parser.add_argument(
        "--ray-python", help="a Python with Ray Serve and embserve installed: measure Ray Serve beside (make bench-ray)"
    )
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    command = "python -m embserve.benchmarks.cpu " + " ".join(shlex.quote(a) for a in given)
    paths = run(
        args.workloads,
        duration_s=args.duration,
        warmup_s=args.warmup,
        out_dir=Path(args.out),
        command=command.strip(),
        fractions=args.fractions,
        apis=args.apis,
        peaks={name: args.peak for name in args.workloads} if args.peak else None,
        rows=args.rows,
        sdk=not args.no_sdk,
        server_args=shlex.split(args.server_args),
        ray_python=args.ray_python,
    )
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
