"""Serve a table larger than this machine's memory, read in place from its row file.

Writes a row directory whose one table holds more bytes than the machine has RAM (at least 64 GiB: 64-dim fp32
rows), sparse on disk: only the rows of the hottest ids of a Zipf(1.05) distribution are written, with values known
here, and the rest are holes, which cost no disk and read as zeros. Starts `embserve serve --storage mmap` on it,
looks up Zipf-distributed ids, and checks every answer exactly against the sum of the rows written. Prints one
JSON line with what it measured, then stops the server.

    python examples/larger_than_memory.py [--dir DIR] [--calls 300] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from embserve.client import Client
from embserve.embeddings import ServingDType
from embserve.embeddings.row_directory import MODEL_FILE, row_file_path
from embserve.embeddings.row_files import RowFileWriter, encode_rows

DIM = 64
HOT_ROWS = 20_000  # rows written: the hottest ids
BATCH = 16


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def zipf_ids(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """Zipf(1.05) ranks, spread over the table (hot ids are not neighbours, as hashed ids are not)."""
    ranks = rng.zipf(1.05, size=size).astype(np.int64) - 1
    return (ranks * 2654435761) % rows


def row_values(ids: np.ndarray) -> np.ndarray:
    """The known values of written rows: exact in float32, and distinct per row."""
    return ((ids[:, None] % 1021) / 1024.0 + np.arange(DIM)[None, :] / 64.0).astype(np.float32)


def write_table(directory: Path, rows: int) -> np.ndarray:
    """The row directory: one sparse table with the rows of the HOT_ROWS hottest ranks written; returns their ids."""
    directory.mkdir(parents=True, exist_ok=True)
    hot = np.unique((np.arange(HOT_ROWS, dtype=np.int64) * 2654435761) % rows)
    with RowFileWriter(row_file_path(directory, "item"), table="item", num_embeddings=rows, embedding_dim=DIM,
                       serving_dtype=ServingDType.FP32, source="larger_than_memory example") as writer:
        for ids in np.array_split(hot, 16):
            for i in ids:  # rows are scattered: one write each
                writer.write(int(i), encode_rows(torch.from_numpy(row_values(np.array([i]))), ServingDType.FP32))
        writer.finish()
    model = {"name": "huge", "tables": [{"name": "item", "num_embeddings": rows, "embedding_dim": DIM,
                                         "storage": "mmap"}]}
    (directory / MODEL_FILE).write_text(yaml.safe_dump(model, sort_keys=False))
    return hot


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the row directory (default: a temporary one)")
    parser.add_argument("--calls", type=int, default=300, help="lookups of %d examples to check" % BATCH)
    parser.add_argument("--keep", action="store_true", help="keep the row directory afterwards")
    args = parser.parse_args()

    rows = max(64 << 30, physical_memory() + (8 << 30)) // (DIM * 4)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="embserve-huge-")) / "rows"
    start = time.perf_counter()
    written = write_table(directory, rows)
    path = row_file_path(directory, "item")
    write_s = time.perf_counter() - start

    command = [str(Path(sys.executable).parent / "embserve"), "serve", "--model", str(directory / MODEL_FILE),
               "--checkpoint", str(directory), "--port", "0", "--no-metrics", "--log-format", "json"]
    start = time.perf_counter()
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        address = ""
        assert server.stderr is not None
        for line in server.stderr:
            if '"serving"' in line:
                address = json.loads(line)["address"]
                break
        if not address:
            raise SystemExit(f"the server did not start (exit {server.wait()})")
        serving_s = time.perf_counter() - start
        known = set(written.tolist())
        rng = np.random.default_rng(1)
        hits = 0
        with Client(address) as client:
            for _ in range(args.calls):
                ids = zipf_ids(rng, rows, BATCH)
                result = client.lookup({"item": [[int(i)] for i in ids]})
                expected = np.where(np.isin(ids, written)[:, None], row_values(ids), 0.0).astype(np.float32)
                if not np.array_equal(result.embeddings, expected):
                    raise SystemExit(f"wrong rows for ids {ids.tolist()}")
                hits += sum(int(i) in known for i in ids)
            info = client.metadata()
        print(json.dumps({
            "example": "larger_than_memory",
            "table_bytes": rows * DIM * 4,
            "physical_memory": physical_memory(),
            "disk_bytes": path.stat().st_blocks * 512,
            "write_s": round(write_s, 2),
            "serving_s": round(serving_s, 2),
            "lookups_checked": args.calls * BATCH,
            "written_rows_hit": hits,
            "server_rss_bytes": rss_bytes(server.pid),
            "resident_bytes": info.tables[0].resident_bytes,
            "storage": info.tables[0].storage,
        }))
    finally:
        server.terminate()
        server.wait(60)
        if not args.keep:
            shutil.rmtree(directory if args.dir else directory.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
