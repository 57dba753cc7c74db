"""Storage benchmark: tables served from memory and read in place from their row files (`mmap`).

    python -m embserve.benchmarks.storage [--gib 6] [--duration 10] [--out benchmarks/results/storage]

On one model that fits in memory (`--gib` of 64-dim fp32 tables, written once as a row directory), under Zipf(1.05)
ids: start-up time and RSS of `memory` and `mmap` servers; closed-loop throughput and latency of each, the page cache
warm; a cold start of the `mmap` server (its files dropped from the page cache with posix_fadvise DONTNEED): time
to SERVING and p99 over the first seconds against after warm-up; and `--workers 2` with `mmap`: the PSS of every
process against one worker's. Then a table larger than this machine's memory (a sparse row file, only its hot rows
written): time to SERVING, throughput, p99 and the server's RSS. Writes JSON and a Markdown table to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from embserve.embeddings import ServingDType, model_config_from_dict
from embserve.embeddings.row_directory import MODEL_FILE, row_file_path, write_row_directory
from embserve.embeddings.row_files import RowFileWriter, encode_rows

from .loadgen import LoadResult, closed_loop
from .procs import ServerProcess, children, embserve_command, pss_bytes
from .report import hardware
from .workloads import Request, encode_lookups

__all__ = ["main"]

DIM = 64
ROWS_PER_TABLE = 1 << 20
BATCH = 64
DISTINCT_REQUESTS = 2048
ZIPF_A = 1.05


def zipf(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """Zipf(1.05) ids over `rows`, hot ids spread over the table as hashed ids are."""
    return ((rng.zipf(ZIPF_A, size=size).astype(np.int64) - 1) * 2654435761) % rows


def _requests(keys: Sequence[str], rows: int, count: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [
        Request(tuple(keys), np.ones((len(keys), BATCH), np.int32), zipf(rng, rows, len(keys) * BATCH))
        for _ in range(count)
    ]


def _write_model(directory: Path, gib: float) -> Path:
    tables = max(1, round(gib * (1 << 30) / (ROWS_PER_TABLE * DIM * 4)))
    config = model_config_from_dict(
        {
            "name": "stored",
            "tables": [
                {"name": f"t{i}", "num_embeddings": ROWS_PER_TABLE, "embedding_dim": DIM} for i in range(tables)
            ],
        }
    )
    generator = torch.Generator().manual_seed(0)
    weights = {
        t.name: torch.empty(ROWS_PER_TABLE, DIM).uniform_(-0.01, 0.01, generator=generator) for t in config.tables
    }
    write_row_directory(config, weights, directory)
    return directory


def _drop_cache(directory: Path) -> None:
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _start(directory: Path, storage: str, *extra: str) -> tuple[ServerProcess, float]:
    command = embserve_command(
        directory / MODEL_FILE,
        "--checkpoint",
        str(directory),
        "--storage",
        storage,
        "--max-queue-wait-ms",
        "30000",
        *extra,
    )
    server = ServerProcess(command, f"embserve {storage}")
    start = time.perf_counter()
    server.start()
    if "--workers" in extra and extra[extra.index("--workers") + 1] != "1":
        server.address = str(server.logs.wait("workers serving", timeout=600)[0]["address"])
    else:
        server.wait_ready(600)
    return server, time.perf_counter() - start


def _load(
    server: ServerProcess, payloads: list[bytes], sizes: list[int], out_dim: int, seconds: float, callers: int = 32
) -> LoadResult:
    return asyncio.run(
        closed_loop(
            server.address,
            payloads,
            sizes,
            [s * out_dim * 4 for s in sizes],
            concurrency=callers,
            duration_s=seconds,
            warmup_s=1.0,
            transport="stream",
        )
    )


def _point(result: LoadResult) -> dict[str, Any]:
    return {
        "lookups_per_s": round(result.rps, 1),
        "examples_per_s": round(result.eps),
        "p50_ms": round(result.percentile(50), 2),
        "p99_ms": round(result.percentile(99), 2),
        "errors": dict(result.errors),
    }


def fits_in_memory(directory: Path, seconds: float) -> dict[str, Any]:
    model = yaml.safe_load((directory / MODEL_FILE).read_text())
    keys = [t["name"] for t in model["tables"]]
    out_dim = DIM * len(keys)
    requests = _requests(keys, ROWS_PER_TABLE, DISTINCT_REQUESTS)
    payloads, sizes = encode_lookups(requests), [r.batch_size for r in requests]
    table_bytes = len(keys) * ROWS_PER_TABLE * DIM * 4
    out: dict[str, Any] = {"tables": len(keys), "table_bytes": table_bytes, "callers": 32, "batch": BATCH}
    for storage in ("memory", "mmap"):
        server, start_s = _start(directory, storage)
        try:
            record: dict[str, Any] = {"start_s": round(start_s, 2), "rss_after_start": server.rss_bytes()}
            _load(server, payloads, sizes, out_dim, 3.0)  # the page cache warm for mmap
            record.update(_point(_load(server, payloads, sizes, out_dim, seconds)))
            record["rss_after_load"] = server.rss_bytes()
            out[storage] = record
        finally:
            server.stop()
    out["mmap_vs_memory_throughput"] = round(out["mmap"]["lookups_per_s"] / out["memory"]["lookups_per_s"], 3)
    out["mmap_vs_memory_p99"] = round(out["mmap"]["p99_ms"] / out["memory"]["p99_ms"], 3)

    _drop_cache(directory)  # cold: every page read from disk again
    server, start_s = _start(directory, "mmap")
    try:
        first = _point(_load(server, payloads, sizes, out_dim, 10.0))
        later = _point(_load(server, payloads, sizes, out_dim, seconds))
        out["cold_mmap"] = {"start_s": round(start_s, 2), "first_10s": first, "after_warm_up": later}
    finally:
        server.stop()

    pss: dict[str, int] = {}
    for workers in (1, 2):
        server, _ = _start(directory, "mmap", "--workers", str(workers))
        try:
            _load(server, payloads, sizes, out_dim, 5.0)
            pids = [server.pid, *children(server.pid)] if workers > 1 else [server.pid]
            pss[f"workers_{workers}"] = sum(pss_bytes(p) for p in pids)
        finally:
            server.stop()
    out["pss"] = pss
    return out


def larger_than_memory(base: Path, seconds: float) -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = max(64 << 30, memory + (8 << 30)) // (DIM * 4)
    directory = base / "huge"
    directory.mkdir()
    hot = np.unique(zipf(np.random.default_rng(7), rows, 400_000))  # the rows Zipf traffic touches most
    with RowFileWriter(
        row_file_path(directory, "item"),
        table="item",
        num_embeddings=rows,
        embedding_dim=DIM,
        serving_dtype=ServingDType.FP32,
        source="storage benchmark",
    ) as writer:
        for i in hot:
            writer.write(int(i), encode_rows(torch.full((1, DIM), float(i % 97) / 97), ServingDType.FP32))
        writer.finish()
    (directory / MODEL_FILE).write_text(
        yaml.safe_dump({"name": "huge", "tables": [{"name": "item", "num_embeddings": rows, "embedding_dim": DIM}]})
    )
    requests = _requests(["item"], rows, DISTINCT_REQUESTS, seed=1)
    payloads, sizes = encode_lookups(requests), [r.batch_size for r in requests]
    server, start_s = _start(directory, "mmap")
    try:
        point = _point(_load(server, payloads, sizes, DIM, seconds))
        return {
            "table_bytes": rows * DIM * 4,
            "physical_memory": memory,
            "rows_written": int(hot.size),
            "disk_bytes": row_file_path(directory, "item").stat().st_blocks * 512,
            "start_s": round(start_s, 2),
            **point,
            "server_rss": server.rss_bytes(),
        }
    finally:
        server.stop()


def markdown(results: dict[str, Any]) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    f = results["fits_in_memory"]
    lines = [
        f"Model: {f['tables']} tables x {ROWS_PER_TABLE:,} rows x {DIM} fp32 ({gib(f['table_bytes'])}); Zipf({ZIPF_A}) "
        f"ids, {BATCH} examples per lookup, {f['callers']} callers over LookupStream.",
        "",
        "| storage | start to SERVING | RSS after start | lookups/s | p50 | p99 | RSS after load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for storage in ("memory", "mmap"):
        r = f[storage]
        lines.append(
            f"| {storage} | {r['start_s']} s | {gib(r['rss_after_start'])} | {r['lookups_per_s']:,} | "
            f"{r['p50_ms']} ms | {r['p99_ms']} ms | {gib(r['rss_after_load'])} |"
        )
    cold = f["cold_mmap"]
    lines += [
        "",
        f"mmap against memory: {f['mmap_vs_memory_throughput']}x the throughput, {f['mmap_vs_memory_p99']}x the p99.",
        f"Cold mmap start (page cache dropped): SERVING in {cold['start_s']} s; first 10 s p99 "
        f"{cold['first_10s']['p99_ms']} ms at {cold['first_10s']['lookups_per_s']:,} lookups/s, then p99 "
        f"{cold['after_warm_up']['p99_ms']} ms at {cold['after_warm_up']['lookups_per_s']:,} lookups/s.",
        f"`--workers 2` with mmap: total PSS {gib(f['pss']['workers_2'])} against {gib(f['pss']['workers_1'])} "
        "for one process.",
    ]
    h = results["larger_than_memory"]
    lines += [
        "",
        f"Larger than memory: one table of {gib(h['table_bytes'])} on a {gib(h['physical_memory'])} machine "
        f"({h['rows_written']:,} hot rows written, {gib(h['disk_bytes'])} on disk): SERVING in {h['start_s']} s, "
        f"{h['lookups_per_s']:,} lookups/s ({BATCH} ids each), p99 {h['p99_ms']} ms, server RSS {gib(h['server_rss'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=6.0, help="table bytes of the model that fits in memory")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--dir", help="where to write the row files (default: a temporary directory)")
    parser.add_argument("--out", default="benchmarks/results/storage", help="where to write JSON and Markdown")
    args = parser.parse_args(argv)
    base = Path(args.dir or tempfile.mkdtemp(prefix="embserve-storage-"))
    try:
        print(f"writing a {args.gib} GiB row directory in {base}", file=sys.stderr)
        directory = _write_model(base / "fits", args.gib)
        results = {
            "hardware": hardware(),
            "command": "python -m embserve.benchmarks.storage " + " ".join(argv or sys.argv[1:]),
            "fits_in_memory": fits_in_memory(directory, args.duration),
        }
        shutil.rmtree(directory)
        results["larger_than_memory"] = larger_than_memory(base, args.duration)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps(results, indent=2))
    (out / "storage.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
