"""The standard benchmark suite: each workload against embserve, embserve unbatched, the transport ceiling (a no-op
server) and the compute ceiling (the forward in process), closed and open loop; embserve and the no-op server
over unary calls and over streams. Then the server's CPU per 1,000 examples at fixed offered loads (`cpu`), with
the loads taken from the unary peaks just measured, written to `<out>/cpu`.

    python -m embserve.benchmarks.run                       # the standard suite (about 12 minutes on 2 cores)
    python -m embserve.benchmarks.run --workloads small --duration 1 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml

from embserve.embeddings import ServingModel, build_serving_model
from embserve.oip import wire as oip
from embserve.v1 import embserve_pb2 as pb
from embserve.v1.wire import LOOKUP_METHOD, OutputDType

from . import cpu
from .ceilings import compute_ceiling
from .loadgen import LoadResult, closed_loop, open_loop
from .procs import ServerProcess, embserve_command, noop_command
from .report import Record, write_report
from .workloads import WORKLOADS, Request, Workload, encode_lookups, encode_model_infer

__all__ = ["main", "run_suite"]

CONCURRENCY = {"small": [1, 8, 64, 128], "large": [1, 8, 64], "multihot": [1, 16, 64]}
OPEN_FRACTIONS = (0.25, 0.5, 0.75)
DISTINCT_REQUESTS = {"small": 1024, "large": 32, "multihot": 32}
MAX_QUEUE_DELAY_US = 1000
# target -> (server process, transport, protocol); each closed-loop level measures every target, one after the
# other. `oip`: the same embserve server and requests through the Open Inference Protocol's ModelInfer.
TARGETS = {
    "embserve": ("embserve", "unary", "v1"),
    "embserve-stream": ("embserve", "stream", "v1"),
    "embserve-oip": ("embserve", "unary", "oip"),
    "unbatched": ("unbatched", "unary", "v1"),
    "transport-ceiling": ("transport-ceiling", "unary", "v1"),
    "transport-ceiling-stream": ("transport-ceiling", "stream", "v1"),
}
OUTPUT_DTYPES_MEASURED = ("float32", "float16")


def _as_lookup(raw: bytes) -> bytes:
    """A float32 ModelInferResponse's rows as a LookupResponse, for the Lookup checker."""
    response = oip.ModelInferResponse.FromString(raw)
    return pb.LookupResponse(dtype=pb.DTYPE_FLOAT32, embeddings=response.raw_output_contents[0]).SerializeToString()


def _checker(model: ServingModel, requests: Sequence[Request]) -> Callable[[int, bytes], bool]:
    """Compares a response with the in-process forward of the same model (same seed) for that request."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def check(index: int, raw: bytes) -> bool:
        response = pb.LookupResponse.FromString(raw)
        r = requests[index]
        kjt = KeyedJaggedTensor(
            keys=list(r.keys), values=torch.from_numpy(r.values), lengths=torch.from_numpy(r.lengths.reshape(-1))
        )
        expected = model.forward(kjt).numpy()
        if response.dtype == pb.DTYPE_FLOAT16:
            got = (
                np.frombuffer(response.embeddings, OutputDType.FLOAT16.numpy).reshape(expected.shape).astype(np.float32)
            )
            return bool(np.allclose(got, expected, rtol=2e-3, atol=1e-4))
        got = np.frombuffer(response.embeddings, OutputDType.FLOAT32.numpy).reshape(expected.shape)
        return bool(np.array_equal(got, expected))

    return check


def _record(workload: str, target: str, dtype: str, res: LoadResult, **extra: object) -> Record:
    return Record(
        workload=workload,
        target=target,
        mode=res.mode,
        concurrency=res.concurrency,
        rate=res.rate,
        output_dtype=dtype,
        duration_s=res.duration_s,
        requests=res.ok,
        examples=res.examples,
        rps=res.rps,
        eps=res.eps,
        p50_ms=res.percentile(50),
        p90_ms=res.percentile(90),
        p99_ms=res.percentile(99),
        p999_ms=res.percentile(99.9),
        errors=res.errors,
        wrong=res.wrong,
        checked=res.checked,
        **extra,  # type: ignore[arg-type]
    )


class _Progress:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="point", file=sys.stderr, dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.bar.set_description(text)

    def done(self, record: Record) -> None:
        self.bar.update(1)
        self.bar.write(
            f"{record.workload:9s} {record.target:18s} {record.mode:6s} "
            f"{(record.concurrency or 0):4d} {record.output_dtype:8s} {record.rps:9,.0f} req/s {record.eps:11,.0f} ex/s "
            f"p50 {record.p50_ms:7.2f} p99 {record.p99_ms:7.2f} ms errors {record.errors or '-'} wrong {record.wrong}"
        )


def _batch_mean(before: dict[str, float], after: dict[str, float]) -> float | None:
    n = after.get("embserve_batches_total", 0) - before.get("embserve_batches_total", 0)
    s = after.get("embserve_batch_examples_sum", 0) - before.get("embserve_batch_examples_sum", 0)
    return s / n if n else None


def run_workload(workload: Workload, args: argparse.Namespace, tmp: Path, progress: _Progress) -> list[Record]:
    records: list[Record] = []
    model_path = tmp / f"{workload.name}.yaml"
    model_path.write_text(yaml.safe_dump(workload.config.model_dump(mode="json", exclude_none=True)))
    requests = workload.requests(DISTINCT_REQUESTS[workload.name], seed=args.seed)
    sizes = [r.batch_size for r in requests]
    payloads = {dtype: encode_lookups(requests, dtype) for dtype in OUTPUT_DTYPES_MEASURED}
    oip_payloads = encode_model_infer(requests, workload.config.name)
    out_dim = workload.config.output_dim
    min_bytes = {d: [s * out_dim * OutputDType(d).itemsize for s in sizes] for d in OUTPUT_DTYPES_MEASURED}
    # Closed-loop points measure throughput: a queue budget long enough never to reject a caller of the sweep.
    common = ["--max-queue-delay-us", str(MAX_QUEUE_DELAY_US), "--max-queue-wait-ms", "30000"]
    servers = {
        "embserve": ServerProcess(embserve_command(model_path, *common), "embserve"),
        "unbatched": ServerProcess(embserve_command(model_path, *common, "--no-batching"), "embserve unbatched"),
        "transport-ceiling": ServerProcess(noop_command(out_dim), "no-op server"),
    }
    progress.step(f"{workload.name}: starting servers")
    for s in servers.values():
        s.start()
    try:
        model = build_serving_model(workload.config)  # same seed as the servers: the reference and compute ceiling
        check = _checker(model, requests)
        for s in servers.values():
            s.wait_ready()
        # Every server answers every distinct request once before anything is measured: the first touch of a
        # table's pages and the first forwards are slow, and whichever target ran first would pay for them.
        progress.step(f"{workload.name}: warming the servers")
        for s in servers.values():
            asyncio.run(
                closed_loop(
                    s.address,
                    payloads["float32"],
                    sizes,
                    min_bytes["float32"],
                    concurrency=8,
                    duration_s=max(1.0, args.warmup),
                    warmup_s=0.0,
                )
            )
        levels = CONCURRENCY[workload.name][: args.max_points]
        batch_at_top: float | None = None
        # Targets alternate at each load level, so a slow drift of this shared machine hits them all alike.
        for n in levels:
            for target, (server_name, transport, protocol) in TARGETS.items():
                server = servers[server_name]
                progress.step(f"{workload.name} {target} {n} callers")
                before = server.metrics()
                target_check: Callable[[int, bytes], bool] | None = None
                if server_name != "transport-ceiling":
                    target_check = check if protocol == "v1" else (lambda i, raw: check(i, _as_lookup(raw)))
                res = asyncio.run(
                    closed_loop(
                        server.address,
                        payloads["float32"] if protocol == "v1" else oip_payloads,
                        sizes,
                        min_bytes["float32"],
                        concurrency=n,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                        check=target_check,
                        transport=transport,
                        method=oip.MODEL_INFER_METHOD if protocol == "oip" else LOOKUP_METHOD,
                    )
                )
                mean = _batch_mean(before, server.metrics())
                if target == "embserve" and n == levels[-1]:
                    batch_at_top = mean
                rec = _record(
                    workload.name,
                    target,
                    "float32",
                    res,
                    mean_batch_examples=mean,
                    server_rss_mb=server.rss_bytes() / 2**20,
                )
                records.append(rec)
                progress.done(rec)
        if workload.name == "large":
            for target in ("embserve", "transport-ceiling"):
                progress.step(f"{workload.name} {target} fp16")
                res = asyncio.run(
                    closed_loop(
                        servers[target].address,
                        payloads["float16"],
                        sizes,
                        min_bytes["float16"],
                        concurrency=levels[-1],
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                        check=check if target == "embserve" else None,
                    )
                )
                rec = _record(workload.name, target, "float16", res)
                records.append(rec)
                progress.done(rec)
        if workload.name == "small" and not args.no_open_loop:
            # The same offered loads over both transports, as fractions of unary's closed-loop peak.
            top = max((r.rps for r in records if r.target == "embserve" and r.mode == "closed"), default=0.0)
            for fraction in OPEN_FRACTIONS:
                for target in ("embserve", "embserve-stream"):
                    progress.step(f"{workload.name} {target} open loop {fraction:.0%}")
                    res = asyncio.run(
                        open_loop(
                            servers["embserve"].address,
                            payloads["float32"],
                            sizes,
                            min_bytes["float32"],
                            rate=max(1.0, fraction * top),
                            duration_s=args.duration,
                            warmup_s=args.warmup,
                            check=check,
                            transport=TARGETS[target][1],
                        )
                    )
                    rec = _record(workload.name, target, "float32", res, load_fraction=fraction)
                    records.append(rec)
                    progress.done(rec)
        progress.step(f"{workload.name} compute ceiling")
        batch = batch_at_top or float(np.mean(sizes))
        eps = compute_ceiling(model, requests, batch, seconds=args.duration)
        rec = Record(
            workload=workload.name,
            target="compute-ceiling",
            mode="in-process",
            concurrency=None,
            rate=None,
            output_dtype="float32",
            duration_s=args.duration,
            requests=0,
            examples=0,
            rps=eps / batch,
            eps=eps,
            p50_ms=1e3 * batch / eps,
            p90_ms=math.nan,
            p99_ms=math.nan,
            p999_ms=math.nan,
            errors={},
            wrong=0,
            checked=0,
            mean_batch_examples=batch,
        )
        records.append(rec)
        progress.done(rec)
    finally:
        for s in servers.values():
            s.stop()
    return records


def run_suite(args: argparse.Namespace) -> tuple[list[Record], dict[str, Path]]:
    names = args.workloads
    total = 0
    for name in names:
        levels = len(CONCURRENCY[name][: args.max_points])
        total += len(TARGETS) * levels + 1 + (2 if name == "large" else 0)
        total += 2 * len(OPEN_FRACTIONS) if name == "small" and not args.no_open_loop else 0
    progress = _Progress(total)
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            records += run_workload(WORKLOADS[name](), args, Path(tmp), progress)
    progress.bar.close()
    command = "python -m embserve.benchmarks.run " + " ".join(shlex.quote(a) for a in args.argv)
    paths = write_report(records, Path(args.out), command.strip(), MAX_QUEUE_DELAY_US / 1e3)
    return records, paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    parser.add_argument("--max-points", type=int, default=8, help="concurrency levels per workload (from the lowest)")
    parser.add_argument("--no-open-loop", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU-per-lookup measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    records, paths = run_suite(args)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not args.no_cpu:
        peaks = {
            name: max((r.rps for r in records if r.workload == name and r.target == "embserve" and r.mode == "closed"))
            for name in args.workloads
        }
        cpu_paths = cpu.run(
            args.workloads,
            duration_s=args.duration,
            warmup_s=args.warmup,
            out_dir=Path(args.out) / "cpu",
            command=f"python -m embserve.benchmarks.cpu --duration {args.duration} --warmup {args.warmup} (peaks from "
            "the suite's unary runs)",
            peaks=peaks,
        )
        print(cpu_paths["markdown"].read_text())
        print("wrote " + ", ".join(str(p) for p in cpu_paths.values()))
    wrong = sum(r.wrong for r in records)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
