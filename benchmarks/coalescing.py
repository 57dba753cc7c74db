"""Coalesced stream messages: lookups/s and CPU per lookup of one process's concurrent callers through the SDK
over LookupStream, with the lookups issued together sent in one message (the default) against one lookup per
message (`coalesce=False`).

    python -m embserve.benchmarks.coalescing [--workload small] [--callers 64] [--duration 8] [--rounds 2]
    python -m embserve.benchmarks.coalescing --client sync      # threads sharing one blocking Client

`--callers` tasks share one `AsyncClient` (or threads one `Client`) and each sends its next lookup as soon as the
previous one is answered (closed loop); the two modes are taken in turn, `--rounds` times. The caller's CPU is this process's (its gRPC
threads included), the server's that of its process tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from embserve.client import AsyncClient, Client

from .cpu import _features, process_tree_cpu
from .procs import ServerProcess, embserve_command
from .report import hardware
from .workloads import WORKLOADS

__all__ = ["main", "measure"]

MODES = {"coalesced": True, "one per message": False}


async def _closed_loop(
    address: str, features: Sequence[dict[str, Any]], *, coalesce: bool, callers: int, seconds: float, pid: int
) -> dict[str, float]:
    async with AsyncClient(address, timeout=10.0, coalesce=coalesce) as client:
        await client.lookup(features[0])  # the server's limits fetched, the streams open
        done = 0
        stop = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            nonlocal done
            k = i
            while time.perf_counter() < stop:
                await client.lookup(features[k % len(features)])
                done += 1
                k += callers

        caller_before, server_before, start = time.process_time(), process_tree_cpu(pid), time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        elapsed = time.perf_counter() - start
        return {
            "lookups_per_s": done / elapsed,
            "caller_cpu_us_per_lookup": 1e6 * (time.process_time() - caller_before) / max(1, done),
            "server_cpu_us_per_lookup": 1e6 * (process_tree_cpu(pid) - server_before) / max(1, done),
        }


def _threads(
    address: str, features: Sequence[dict[str, Any]], *, coalesce: bool, callers: int, seconds: float, pid: int
) -> dict[str, float]:
    with Client(address, timeout=10.0, coalesce=coalesce) as client:
        client.lookup(features[0])
        done = [0] * callers
        stop = time.perf_counter() + seconds

        def caller(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                client.lookup(features[k % len(features)])
                done[i] += 1
                k += callers

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
        caller_before, server_before, start = time.process_time(), process_tree_cpu(pid), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed, total = time.perf_counter() - start, sum(done)
        return {
            "lookups_per_s": total / elapsed,
            "caller_cpu_us_per_lookup": 1e6 * (time.process_time() - caller_before) / max(1, total),
            "server_cpu_us_per_lookup": 1e6 * (process_tree_cpu(pid) - server_before) / max(1, total),
        }


def measure(
    workload_name: str, *, callers: int, seconds: float, rounds: int, client: str = "async"
) -> list[dict[str, Any]]:
    """Each mode's closed-loop point, `rounds` times in turn, against one server of the workload's model."""
    workload = WORKLOADS[workload_name]()
    features = [_features(r) for r in workload.requests(1024, seed=0)]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / f"{workload_name}.yaml"
        model.write_text(yaml.safe_dump(workload.config.model_dump(mode="json", exclude_none=True)))
        with ServerProcess(embserve_command(model, "--no-metrics"), "embserve") as server:
            server.wait_ready()
            for k in range(rounds):
                for mode, coalesce in MODES.items():
                    args: dict[str, Any] = {"coalesce": coalesce, "callers": callers, "seconds": seconds}
                    if client == "sync":
                        run = _threads(server.address, features, pid=server.pid, **args)
                    else:
                        run = asyncio.run(_closed_loop(server.address, features, pid=server.pid, **args))
                    records.append(
                        {"workload": workload_name, "client": client, "mode": mode, "round": k, "callers": callers}
                        | run
                    )
                    print(
                        f"{mode:16s} {run['lookups_per_s']:8,.0f} lookups/s  caller CPU "
                        f"{run['caller_cpu_us_per_lookup']:5.0f} us/lookup  server CPU "
                        f"{run['server_cpu_us_per_lookup']:5.0f} us/lookup",
                        file=sys.stderr,
                        flush=True,
                    )
    return records


def markdown(records: Sequence[dict[str, Any]], hw: dict[str, Any], command: str) -> str:
    lines = [
        f"Hardware: {hw['cpu']}, {hw['cores']} cores; the callers and the server share them. Command: `{command}`",
        "",
        "| workload | client | mode | round | callers | lookups/s | caller CPU us / lookup | server CPU us / lookup |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['workload']} | {r['client']} | {r['mode']} | {r['round'] + 1} | {r['callers']} | "
            f"{r['lookups_per_s']:,.0f} | "
            f"{r['caller_cpu_us_per_lookup']:,.0f} | {r['server_cpu_us_per_lookup']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small", choices=list(WORKLOADS))
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers sharing one client")
    parser.add_argument("--client", choices=["async", "sync"], default="async", help="tasks or threads")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both modes, taken in turn")
    parser.add_argument("--out", default="benchmarks/results/coalescing")
    args = parser.parse_args(argv)
    records = measure(
        args.workload, callers=args.callers, seconds=args.duration, rounds=args.rounds, client=args.client
    )
    command = "python -m embserve.benchmarks.coalescing " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    (out / "coalescing.json").write_text(json.dumps({"hardware": hw, "command": command, "records": records}, indent=1))
    text = markdown(records, hw, command.strip())
    (out / "coalescing.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
