"""Sharded serving benchmark: one server of the whole model against a router in front of two shard servers
(table-wise, and with one table split row-wise), and the SDK fanning out to the shards against the SDK through
the router.

    python -m embserve.benchmarks.sharding [--duration 5] [--workloads small,wide] [--callers 16] [--rows 20000]

Per workload and setup, closed-loop throughput and p50/p99: the load generator (pre-encoded LookupStream
messages) against the single server and against each router, and the SDK (`AsyncClient` over streams against
the single server and the router, `AsyncShardedClient` against the shards) with the same callers. The router's
overhead is its p50/p99 less the single server's, and its throughput over the single server's. Before timing,
every setup's answers to the same requests are compared with the single server's (exact table-wise, within
float32 rounding row-wise). Every process shares this machine's cores: compare setups, not absolute figures.
Writes JSON and Markdown to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embserve.client import AsyncClient, AsyncShardedClient, EmbserveError
from embserve.embeddings.config import ModelConfig, model_config_from_dict
from embserve.embeddings.plan import dump_plan, make_plan

from .cluster import Cluster
from .loadgen import closed_loop
from .procs import ServerProcess, embserve_command
from .report import hardware
from .workloads import WORKLOADS, Request, Workload, encode_lookups, zipf_ids

__all__ = ["ShardingRecord", "main"]

DEFAULT_ROWS = 20_000
DISTINCT_REQUESTS = 256
CHECKED_REQUESTS = 8
SETUPS = ("one server", "router, 2 table-wise shards", "router, 2 shards, 1 row-wise table")


@dataclasses.dataclass
class ShardingRecord:
    """One measured point; latencies in milliseconds."""

    workload: str
    setup: str
    client: str  # "loadgen" (pre-encoded stream messages) or "sdk"
    callers: int
    duration_s: float
    ok: int
    examples: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    answers_match: bool

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0


def _wide(rows: int = DEFAULT_ROWS) -> Workload:
    config = model_config_from_dict(
        {
            "name": "wide",
            "tables": [{"name": f"w{i}", "num_embeddings": rows, "embedding_dim": 32} for i in range(48)],
        }
    )

    def make(rng: np.random.Generator) -> Request:
        batch = 16
        keys = tuple(t.name for t in config.tables)
        values = np.concatenate([zipf_ids(rng, t.num_embeddings, batch) for t in config.tables])
        return Request(keys, np.ones((len(keys), batch), np.int32), values)

    return Workload("wide", "48 tables x dim 32; one id per feature; 16 examples per request", config, make)


BENCH_WORKLOADS: dict[str, Callable[..., Workload]] = {"small": WORKLOADS["small"], "wide": _wide}


def _features(request: Request) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ends = np.cumsum(request.lengths.sum(axis=1))
    return {
        k: (request.lengths[i], request.values[int(ends[i]) - int(request.lengths[i].sum()) : int(ends[i])])
        for i, k in enumerate(request.keys)
    }


async def _sdk_loop(
    lookup: Callable[[dict[str, Any]], Any],
    features: Sequence[dict[str, Any]],
    callers: int,
    duration_s: float,
    warmup_s: float,
) -> tuple[int, int, dict[str, int], np.ndarray]:
    """`callers` coroutines each calling `lookup` as soon as the previous call answered."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counts = [0, 0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def caller(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at:
            f = features[n % len(features)]
            n += callers
            sent = time.perf_counter()
            try:
                result = await lookup(f)
            except EmbserveError as err:
                if sent >= measure_from:
                    errors[err.code] = errors.get(err.code, 0) + 1
                continue
            if sent >= measure_from:
                latencies.append((time.perf_counter() - sent) * 1e3)
                counts[0] += 1
                counts[1] += result.batch_size

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return counts[0], counts[1], errors, np.array(latencies)


def _record(
    workload: str,
    setup: str,
    client: str,
    callers: int,
    duration_s: float,
    ok: int,
    examples: int,
    errors: dict[str, int],
    latencies_ms: np.ndarray,
    answers_match: bool,
) -> ShardingRecord:
    has = latencies_ms.size > 0
    return ShardingRecord(
        workload,
        setup,
        client,
        callers,
        duration_s,
        ok,
        examples,
        errors,
        float(np.percentile(latencies_ms, 50)) if has else None,
        float(np.percentile(latencies_ms, 99)) if has else None,
        answers_match,
    )


async def _answers(lookup: Callable[[dict[str, Any]], Any], features: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    return [np.array((await lookup(f)).embeddings) for f in features]


def _same(got: Sequence[np.ndarray], want: Sequence[np.ndarray], exact: bool) -> bool:
    if exact:
        return all(np.array_equal(a, b) for a, b in zip(got, want))
    return all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))


class _Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.records: list[ShardingRecord] = []

    def loadgen(
        self, workload: str, setup: str, address: str, requests: Sequence[Request], out_dim: int, ok: bool
    ) -> None:
        sizes = [r.batch_size for r in requests]
        for callers in self.args.callers:
            result = asyncio.run(
                closed_loop(
                    address,
                    encode_lookups(requests),
                    sizes,
                    [s * out_dim * 4 for s in sizes],
                    concurrency=callers,
                    duration_s=self.args.duration,
                    warmup_s=self.args.warmup,
                    transport="stream",
                )
            )
            errors = dict(result.errors)
            if result.wrong:
                errors["wrong size"] = result.wrong
            rec = _record(
                workload,
                setup,
                "loadgen",
                callers,
                result.duration_s,
                result.ok,
                result.examples,
                errors,
                result.latencies_ms,
                ok,
            )
            self._add(rec)

    def sdk(
        self,
        workload: str,
        setup: str,
        make: Callable[[], Any],
        features: Sequence[dict[str, Any]],
        want: Sequence[np.ndarray] | None,
        exact: bool,
    ) -> list[np.ndarray]:
        async def run() -> list[np.ndarray]:
            async with make() as client:
                answers = await _answers(client.lookup, features[:CHECKED_REQUESTS])
                match = want is None or _same(answers, want, exact)
                for callers in self.args.callers:
                    ok, examples, errors, latencies = await _sdk_loop(
                        client.lookup, features, callers, self.args.duration, self.args.warmup
                    )
                    self._add(
                        _record(
                            workload, setup, "sdk", callers, self.args.duration, ok, examples, errors, latencies, match
                        )
                    )
                return answers

        return asyncio.run(run())

    def _add(self, rec: ShardingRecord) -> None:
        self.records.append(rec)
        p50 = f"{rec.p50_ms:.2f}" if rec.p50_ms is not None else "-"
        p99 = f"{rec.p99_ms:.2f}" if rec.p99_ms is not None else "-"
        print(
            f"{rec.workload:6} {rec.setup:36} {rec.client:7} callers={rec.callers:<3} {rec.rps:8.0f} req/s "
            f"p50 {p50} ms p99 {p99} ms errors {rec.errors or 0} match {rec.answers_match}",
            flush=True,
        )

    def workload(self, name: str) -> None:
        wl = BENCH_WORKLOADS[name](self.args.rows)
        config: ModelConfig = wl.config
        folder = self.folder / name
        folder.mkdir()
        model = folder / "model.yaml"
        model.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
        out_dim = sum(t.embedding_dim for t in config.tables)
        requests = wl.requests(DISTINCT_REQUESTS, seed=1)
        features = [_features(r) for r in requests]
        plans = {
            SETUPS[1]: (folder / "table-wise-plan.yaml", make_plan(config, shards=2)),
            SETUPS[2]: (folder / "row-wise-plan.yaml", make_plan(config, shards=2, row_wise=[config.tables[0].name])),
        }
        with ServerProcess(embserve_command(model), "one server") as server:
            server.wait_ready()
            self.loadgen(name, SETUPS[0], server.address, requests, out_dim, True)
            want = self.sdk(name, SETUPS[0], lambda: AsyncClient(server.address), features, None, True)
        for setup, (path, plan) in plans.items():
            dump_plan(plan, path)
            exact = setup == SETUPS[1]
            with Cluster(model, path) as cluster:
                router, shards = cluster.router_address, cluster.shard_addresses
                answers = asyncio.run(self._router_answers(router, features[:CHECKED_REQUESTS]))
                self.loadgen(name, setup, router, requests, out_dim, _same(answers, want, exact))
                self.sdk(name, setup, lambda: AsyncClient(router), features, want, exact)
                fan_out = setup.replace("router, ", "sdk fan-out, ")
                self.sdk(name, fan_out, lambda: AsyncShardedClient(path, shards), features, want, exact)

    @staticmethod
    async def _router_answers(address: str, features: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        async with AsyncClient(address) as client:
            return await _answers(client.lookup, features)


def _by(records: Sequence[ShardingRecord], **kw: Any) -> ShardingRecord | None:
    return next((r for r in records if all(getattr(r, k) == v for k, v in kw.items())), None)


def overheads(records: Sequence[ShardingRecord]) -> list[dict[str, Any]]:
    """Per workload, setup and callers: the router's (or the fan-out's) p50/p99 less the single server's, and its
    throughput over the single server's, with the same client."""
    out = []
    for r in records:
        if r.setup == SETUPS[0]:
            continue
        base = _by(records, workload=r.workload, setup=SETUPS[0], client=r.client, callers=r.callers)
        if base is None or base.rps == 0 or r.p50_ms is None or base.p50_ms is None:
            continue
        out.append(
            {
                "workload": r.workload,
                "setup": r.setup,
                "client": r.client,
                "callers": r.callers,
                "p50_added_ms": r.p50_ms - base.p50_ms,
                "p99_added_ms": (r.p99_ms or 0.0) - (base.p99_ms or 0.0),
                "throughput_ratio": r.rps / base.rps,
            }
        )
    return out


def markdown(records: Sequence[ShardingRecord], hw: dict[str, Any], command: str) -> str:
    lines = [
        "# Sharded serving",
        "",
        f"`{command}` on {hw['cpu']} ({hw['cores']} cores); every process shares these cores.",
        "",
        "| workload | setup | client | callers | req/s | p50 ms | p99 ms | errors | answers match |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        p50 = f"{r.p50_ms:.2f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.2f}" if r.p99_ms is not None else "-"
        lines.append(
            f"| {r.workload} | {r.setup} | {r.client} | {r.callers} | {r.rps:,.0f} | {p50} | {p99} | "
            f"{sum(r.errors.values())} | {'yes' if r.answers_match else 'NO'} |"
        )
    lines += [
        "",
        "Overhead against one server (same client and callers):",
        "",
        "| workload | setup | client | callers | p50 added ms | p99 added ms | throughput ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for o in overheads(records):
        lines.append(
            f"| {o['workload']} | {o['setup']} | {o['client']} | {o['callers']} | {o['p50_added_ms']:.2f} | "
            f"{o['p99_added_ms']:.2f} | {o['throughput_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embserve.benchmarks.sharding", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each point is measured")
    parser.add_argument("--workloads", default="small,wide", help=f"comma-separated: {', '.join(BENCH_WORKLOADS)}")
    parser.add_argument("--callers", default="16", help="comma-separated closed-loop callers per point")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per table (the requests' shapes stay)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sharding"), help="output folder")
    args = parser.parse_args(argv)
    args.callers = [int(x) for x in str(args.callers).split(",")]
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in BENCH_WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}: choose from {', '.join(BENCH_WORKLOADS)}")
    command = "python -m embserve.benchmarks.sharding " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="embserve-sharding-") as tmp:
        bench = _Bench(args, Path(tmp))
        for name in names:
            bench.workload(name)
    hw = hardware()
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "hardware": hw,
        "records": [dataclasses.asdict(r) | {"rps": r.rps} for r in bench.records],
        "overheads": overheads(bench.records),
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(bench.records, hw, command)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0 if all(r.answers_match and not r.errors and r.ok > 0 for r in bench.records) else 1


if __name__ == "__main__":
    sys.exit(main())
