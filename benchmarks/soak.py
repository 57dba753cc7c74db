"""Soak: overload, hot reloads and cancellations together, for a bounded time, against a server process.

    python -m embserve.benchmarks.soak --seconds 60

Measures the server's capacity, then sends Poisson traffic at `--overload` times it while the weights file is
swapped and SIGHUP sent every `--reload-every` seconds; some calls carry a 1 ms deadline and some are cancelled by
the caller. Every answered call is checked against a numpy reference of the version it names. Prints one line:
calls sent, ok, rejected, deadline/cancelled, failed, wrong answers (must be 0), the server's max RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from embserve.client import AsyncClient, Cancelled, DeadlineExceeded, LookupResult, Overloaded
from embserve.embeddings import LargeEmbeddings, init_weights, model_config_from_dict, save_checkpoint, table_weights
from embserve.embeddings.weights import checkpoint_digest

from .procs import ServerProcess, embserve_command

__all__ = ["main"]

TABLES = [{"name": f"s{i}", "num_embeddings": 50_000, "embedding_dim": 128} for i in range(8)]


def _pool(rng: np.random.Generator, size: int = 256) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Distinct requests in numpy form: 64 to 128 examples, 0 to 48 ids per bag (heavy enough that the server,
    not the load generator, is the bottleneck on a shared machine)."""
    out = []
    for _ in range(size):
        batch = int(rng.integers(64, 129))
        feats = {}
        for t in TABLES:
            lengths = rng.integers(0, 49, batch)
            feats[str(t["name"])] = (lengths, rng.integers(0, 50_000, int(lengths.sum())))
        out.append(feats)
    return out


def _expected(tables: dict[str, np.ndarray], feats: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    cols = []
    for key, (lengths, values) in feats.items():
        starts = np.concatenate([[0], np.cumsum(lengths)])
        cols.append(np.stack([tables[key][values[a:b]].sum(axis=0) for a, b in zip(starts[:-1], starts[1:])]))
    return np.concatenate(cols, axis=1).astype(np.float32)


async def _traffic(
    address: str, rate: float, seconds: float, refs: dict[str, dict[str, np.ndarray]], rng: np.random.Generator
) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    pool = _pool(rng)
    expected = {v: [_expected(tables, f) for f in pool] for v, tables in refs.items()}  # checks cost no numpy work
    async with AsyncClient(address, retry=None, timeout=2.0) as client:

        async def one(kind: str, index: int) -> None:
            features = pool[index]
            timeout = 0.001 if kind == "deadline" else None
            task = asyncio.ensure_future(client.lookup(features, timeout=timeout))
            if kind == "cancel":
                await asyncio.sleep(float(rng.uniform(0, 0.005)))
                task.cancel()
            try:
                result: LookupResult = await task
            except asyncio.CancelledError:
                counts["cancelled"] += 1
                return
            except Overloaded:
                counts["rejected"] += 1
                return
            except (DeadlineExceeded, Cancelled):
                counts["deadline/cancelled"] += 1
                return
            except Exception as err:  # anything else is a failure worth seeing
                counts["failed"] += 1
                counts[f"failed:{type(err).__name__}"] += 1
                return
            counts["ok"] += 1
            ref = expected.get(result.model_version)
            if ref is None or not np.allclose(result.embeddings, ref[index], atol=1e-4, rtol=1e-5):
                counts["wrong"] += 1

        await client.metadata()
        tasks = set()
        start = time.perf_counter()
        t = 0.0
        while t < seconds:
            t += float(rng.exponential(1.0 / rate))
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            kind = rng.choice(["normal", "deadline", "cancel"], p=[0.9, 0.05, 0.05])
            counts["sent"] += 1
            task = asyncio.ensure_future(one(str(kind), int(rng.integers(0, len(pool)))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        counts["send_seconds"] = int(1000 * (time.perf_counter() - start))
        await asyncio.gather(*tasks, return_exceptions=True)
    return counts


async def _capacity(address: str, seconds: float) -> float:
    keys = [t["name"] for t in TABLES]
    features: dict[str, list[list[int]]] = {str(k): [list(range(24))] * 96 for k in keys}
    done = 0
    async with AsyncClient(address, retry=None, timeout=10) as client:
        await client.metadata()
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await client.lookup(features)
                done += 1

        await asyncio.gather(*(caller() for _ in range(16)))
    return done / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--overload", type=float, default=3.0, help="offered load as a multiple of capacity")
    parser.add_argument("--reload-every", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = model_config_from_dict({"name": "soak", "tables": TABLES})
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "model.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
        refs: dict[str, dict[str, np.ndarray]] = {}
        sources = []
        for seed in (1, 2):
            model = LargeEmbeddings(config)
            init_weights(model, seed)
            src = tmp / f"v{seed}.safetensors"
            save_checkpoint(model, src)
            refs[f"weights-{checkpoint_digest(src)}"] = {
                k: v.detach().numpy().astype(np.float64) for k, v in table_weights(model).items()
            }
            sources.append(src)
        live = tmp / "weights.safetensors"
        shutil.copy(sources[0], live)
        server = ServerProcess(
            embserve_command(
                tmp / "model.yaml",
                "--checkpoint",
                str(live),
                "--max-queue-size",
                "2048",
                "--max-batch-size",
                "1024",
                "--max-queue-wait-ms",
                "100",
            ),
            "embserve",
        )
        server.start()
        try:
            server.wait_ready()
            capacity = asyncio.run(_capacity(server.address, 3.0))
            max_rss = server.rss_bytes()
            stop = threading.Event()
            reloads = 0

            def operator() -> None:
                nonlocal max_rss, reloads
                next_reload = time.monotonic() + args.reload_every
                while not stop.wait(0.1):
                    max_rss = max(max_rss, server.rss_bytes())
                    if time.monotonic() >= next_reload:
                        reloads += 1
                        staged = tmp / "staged.safetensors"
                        shutil.copy(sources[reloads % 2], staged)
                        staged.replace(live)
                        assert server.proc is not None
                        server.proc.send_signal(signal.SIGHUP)
                        next_reload += args.reload_every

            thread = threading.Thread(target=operator, daemon=True)
            thread.start()
            rng = np.random.default_rng(args.seed)
            counts = asyncio.run(_traffic(server.address, args.overload * capacity, args.seconds, refs, rng))
            stop.set()
            thread.join(5)
            metrics = server.metrics()
        finally:
            server.stop()
    ok_reloads = metrics.get("embserve_model_reloads_total{outcome=ok}", 0)
    offered = counts["sent"] / (counts["send_seconds"] / 1e3)
    print(
        f"soak {args.seconds:.0f}s, offered {offered:,.0f} calls/s = {offered / capacity:.1f}x capacity "
        f"({capacity:,.0f} calls/s): sent {counts['sent']}, ok {counts['ok']}, rejected {counts['rejected']}, "
        f"deadline/cancelled {counts['deadline/cancelled'] + counts['cancelled']}, failed {counts['failed']}, "
        f"wrong {counts['wrong']}, reloads {int(ok_reloads)}/{reloads}, max RSS {max_rss / 2**20:,.0f} MiB"
    )
    print(
        json.dumps(
            {
                **counts,
                "capacity": capacity,
                "reloads_ok": ok_reloads,
                "reloads_sent": reloads,
                "max_rss_mb": max_rss / 2**20,
            }
        ),
        file=sys.stderr,
    )
    return 1 if counts["wrong"] or counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
