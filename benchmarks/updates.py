"""Row updates benchmark: how fast updates apply, what they cost the lookups served beside them, how soon every
worker serves them, and how long a start takes to replay a delta log.

    python -m embserve.benchmarks.updates [--duration 10] [--out benchmarks/results/updates]

Model: the `small` workload's 26 tables x 100,000 x 64, table f0 fp32 and f1 fp16; a server process with
`--updates` (fsync before each answer). Points, each `--duration` seconds:

- updates alone: one UpdateRows stream sending 4,096-row messages back to back (rows/s and MB/s applied);
- the `small` workload, open loop at 50% of its closed-loop peak, without updates, then with a stream of updates at
  `--update-rows-per-s` (fp32 table, then fp16 table), then with the same updates sent to another server process
  (a control: what the update traffic costs the shared cores, whichever server takes it): lookup p50/p99 and
  throughput against the run without. The points are taken in turn, `--rounds` times (4), so that a drift of the
  shared machine falls on all of them alike, and each point's answers are pooled over its rounds. The sender runs
  `--sender-nice` steps nicer (10), standing in for a trainer on another host;
- `--workers 2`: the time from `update_rows` returning (the worker that took it serves it) to every worker serving
  it, read by lookups over 8 connections;
- start-up with a delta log of `--replay-rows` rows against without (time to SERVING);
- background compaction (`--compact-after-bytes`) of that log: the time to fold it into a new checkpoint and
  reload it, and the lookups' p50/p99 at 50% of their peak while it runs against the same run without.

`--message-rows` sets the rows of one update message (4,096); `--phases` runs some of the phases (alone, load,
visibility, replay, compaction).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embserve.client import Client, RowUpdate
from embserve.embeddings import LargeEmbeddings, init_weights, model_config_from_dict, save_checkpoint
from embserve.embeddings.delta_log import DeltaLog, RowFormat, delta_log_path
from embserve.embeddings.weights import checkpoint_digest, checkpoint_version

from .loadgen import LoadResult, closed_loop, open_loop
from .procs import ServerProcess, embserve_command
from .report import hardware
from .workloads import WORKLOADS, encode_lookups

__all__ = ["main"]

ROWS, DIM = 100_000, 64
MESSAGE_ROWS = 4096  # rows of one update message (--message-rows)
PHASES = ("alone", "load", "visibility", "replay", "compaction")


def _model(directory: Path) -> tuple[Path, Path]:
    tables = [{"name": f"f{i}", "num_embeddings": ROWS, "embedding_dim": DIM} for i in range(26)]
    tables[1]["data_type"] = "fp16"
    data = {"name": "small", "tables": tables}
    (directory / "model.yaml").write_text(yaml.safe_dump(data))
    module = LargeEmbeddings(model_config_from_dict(data))
    init_weights(module, 0)
    save_checkpoint(module, directory / "w.safetensors")
    return directory / "model.yaml", directory / "w.safetensors"


SERVER_ARGS: list[str] = []  # more `serve` flags for every server (--server-args)


def _start(model: Path, checkpoint: Path, log_dir: Path, *extra: str) -> tuple[ServerProcess, float]:
    command = embserve_command(
        model, "--checkpoint", str(checkpoint), "--updates", "--updates-dir", str(log_dir), *SERVER_ARGS, *extra
    )
    command += ["--max-queue-wait-ms", "30000"]
    server = ServerProcess(command, "embserve --updates")
    start = time.perf_counter()
    server.start()
    if "--workers" in extra:
        server.logs.wait("serving", int(extra[extra.index("--workers") + 1]), timeout=300)
        server.address = str(server.logs.wait("workers serving", timeout=300)[0]["address"])
    else:
        server.wait_ready(300)
    return server, time.perf_counter() - start


def _send_updates(
    address: str, table: str, rows_per_s: float, seconds: float, nice: int, message_rows: int, results: Any
) -> None:
    """Sends `message_rows`-row updates of one table over one stream for `seconds`, at `rows_per_s` (0: as fast as they
    apply); puts (rows applied, seconds, refused) on `results`. Runs in a process of its own, `nice` steps nicer,
    standing in for a trainer on another host: its client work should not slow the lookups' load generator."""
    os.nice(nice)
    rng = np.random.default_rng(3)
    pool = [  # made before the clock starts, so that the sender's own CPU is the SDK's, not numpy's
        RowUpdate(
            table,
            rng.choice(ROWS, message_rows, replace=False),
            rng.standard_normal((message_rows, DIM), dtype=np.float32) * 0.01,
        )
        for _ in range(16)
    ]

    def messages() -> Iterator[RowUpdate]:
        start, sent = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            if rows_per_s:
                delay = start + sent / rows_per_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            yield pool[(sent // message_rows) % len(pool)]
            sent += message_rows

    started = time.perf_counter()
    with Client(address, timeout=None) as client:
        outcomes = client.update_many(messages())
    applied = sum(o.rows for o in outcomes if not isinstance(o, Exception))
    refused = sum(1 for o in outcomes if isinstance(o, Exception))
    results.put((applied, time.perf_counter() - started, refused))


class Updater:
    """`_send_updates` in a spawned process."""

    nice = 10  # the sender's niceness (--sender-nice)
    message_rows = MESSAGE_ROWS  # --message-rows

    def __init__(self, address: str, table: str, rows_per_s: float, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._process = context.Process(
            target=_send_updates,
            args=(address, table, rows_per_s, seconds, self.nice, self.message_rows, self._results),
            daemon=True,
        )
        self.rows = 0
        self.seconds = 1.0
        self.refused = 0

    def start(self) -> None:
        self._process.start()

    def join(self) -> None:
        self.rows, self.seconds, self.refused = self._results.get(timeout=600)
        self._process.join(60)


def _updates_alone(address: str, seconds: float) -> dict[str, Any]:
    updater = Updater(address, "f0", 0, seconds)
    updater.start()
    updater.join()
    return {
        "rows_per_s": round(updater.rows / updater.seconds),
        "mb_per_s": round(updater.rows * DIM * 4 / updater.seconds / 1e6, 1),
        "refused": updater.refused,
    }


def _lookups(address: str, rate: float, seconds: float, payloads: list[bytes], sizes: list[int]) -> LoadResult:
    out_dim = 26 * DIM
    return asyncio.run(
        open_loop(
            address, payloads, sizes, [s * out_dim * 4 for s in sizes], rate=rate, duration_s=seconds, warmup_s=1.0
        )
    )


def _pooled(results: list[LoadResult]) -> dict[str, Any]:
    """The rounds of one point: p50/p99 of all their answers together, and each round's p99."""
    latencies = np.concatenate([r.latencies_ms for r in results])
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    return {
        "lookups_per_s": round(sum(r.ok for r in results) / sum(r.duration_s for r in results), 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "round_p99_ms": [round(r.percentile(99), 2) for r in results],
        "errors": errors,
    }


def _half_peak(address: str, seconds: float) -> tuple[float, list[bytes], list[int]]:
    """Half the `small` workload's closed-loop peak (64 callers), and its requests."""
    workload = WORKLOADS["small"]()
    requests = workload.requests(2048)
    payloads, sizes = encode_lookups(requests), [r.batch_size for r in requests]
    out_dim = 26 * DIM
    peak = asyncio.run(
        closed_loop(
            address,
            payloads,
            sizes,
            [s * out_dim * 4 for s in sizes],
            concurrency=64,
            duration_s=seconds,
            warmup_s=1.0,
        )
    ).rps
    return peak / 2, payloads, sizes


POINTS = (  # name, where the updates go ("" none, "same" this server, "other" another server process), table
    ("without_updates", "", ""),
    ("with_fp32_updates", "same", "f0"),
    ("with_fp16_updates", "same", "f1"),
    ("fp32_updates_to_another_server", "other", "f0"),
)


def _under_load(address: str, other: str, seconds: float, update_rate: float, rounds: int) -> dict[str, Any]:
    """The lookups' p50/p99 without updates, with updates of the fp32 and the fp16 table, and with the same updates
    sent to another server process on the same machine (what the machine's shared cores cost, not the server): the
    points taken in turn, `rounds` times, so that a drift of the shared machine falls on all of them alike; each
    point's answers pooled over its rounds."""
    rate, payloads, sizes = _half_peak(address, seconds / 2)
    out: dict[str, Any] = {
        "peak_lookups_per_s": round(2 * rate, 1),
        "offered_lookups_per_s": round(rate, 1),
        "rounds": rounds,
    }
    taken: dict[str, list[LoadResult]] = {name: [] for name, _, _ in POINTS}
    sent: dict[str, list[Updater]] = {name: [] for name, _, _ in POINTS}
    for _ in range(rounds):
        for name, where, table in POINTS:
            if not where:
                taken[name].append(_lookups(address, rate, seconds, payloads, sizes))
                continue
            updater = Updater(address if where == "same" else other, table, update_rate, seconds + 3.0)
            updater.start()  # from before the lookups to after
            time.sleep(1.0)
            taken[name].append(_lookups(address, rate, seconds, payloads, sizes))
            updater.join()
            sent[name].append(updater)
    base = _pooled(taken["without_updates"])
    out["without_updates"] = base
    for name, where, _ in POINTS[1:]:
        point = _pooled(taken[name])
        updaters = sent[name]
        point["update_rows_per_s"] = round(sum(u.rows for u in updaters) / sum(u.seconds for u in updaters))
        point["update_refused"] = sum(u.refused for u in updaters)
        point["p99_vs_without"] = round(point["p99_ms"] / base["p99_ms"], 3)
        point["throughput_vs_without"] = round(point["lookups_per_s"] / base["lookups_per_s"], 3)
        out[name] = point
    return out


def _visibility(address: str, trials: int) -> dict[str, Any]:
    """Seconds from an update's answer to every one of 8 connections (spread over the workers) serving it."""
    readers = [Client(address, transport="unary") for _ in range(8)]
    seen: list[float] = []
    try:
        with Client(address) as writer:
            for k in range(1, trials + 1):
                row = np.full((1, DIM), float(k), np.float32)
                writer.update_rows("f2", [k % ROWS], row)
                answered = time.perf_counter()
                waiting = set(range(len(readers)))
                while waiting:
                    for i in list(waiting):
                        if readers[i].lookup({"f2": [[k % ROWS]]})["f2"][0, 0] == k:
                            waiting.discard(i)
                seen.append(time.perf_counter() - answered)
    finally:
        for r in readers:
            r.close()
    ms = np.array(seen) * 1e3
    return {
        "trials": trials,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


LOG_RECORD_ROWS = 4096  # rows of each update in the logs written for the replay and compaction phases


def _write_log(log_dir: Path, version: str, rows: int) -> tuple[int, int]:
    """A delta log of `rows` rows (updates of f0) over base `version`; returns (rows written, its bytes)."""
    log = DeltaLog(delta_log_path(log_dir, version), version, fsync=False)
    rng = np.random.default_rng(5)
    for _ in range(rows // LOG_RECORD_ROWS):
        ids = rng.choice(ROWS, LOG_RECORD_ROWS, replace=False).astype(np.int64)
        values = (rng.standard_normal((LOG_RECORD_ROWS, DIM), dtype=np.float32) * 0.01).view(np.uint8)
        log.append("f0", "", RowFormat.FLOAT32, ids, values.reshape(LOG_RECORD_ROWS, DIM * 4))
    size = log.size()
    log.close()
    return rows // LOG_RECORD_ROWS * LOG_RECORD_ROWS, size


def _replay(model: Path, checkpoint: Path, base: Path, version: str, rows: int) -> dict[str, Any]:
    clean = base / "log-none"
    server, without = _start(model, checkpoint, clean)
    server.stop()
    logged = base / "log-replay"
    written, _ = _write_log(logged, version, rows)
    server, with_log = _start(model, checkpoint, logged)
    try:
        replayed = server.logs.wait("delta log replayed", timeout=10)[0]
    finally:
        server.stop()
    return {
        "rows": written,
        "start_s_without_log": round(without, 2),
        "start_s_with_log": round(with_log, 2),
        "replay_s": replayed.get("seconds"),
    }


def _compaction(model: Path, checkpoint: Path, base: Path, version: str, rows: int, window: float) -> dict[str, Any]:
    """A server whose log holds `rows` rows, with `--compact-after-bytes` just above it: lookups at 50% of its peak
    for `window` seconds without a compaction, then for `window` seconds from the update that starts one."""
    work = base / "compaction"
    work.mkdir()
    served = work / checkpoint.name  # a copy: the compaction replaces it
    shutil.copyfile(checkpoint, served)
    written, size = _write_log(work / "log", version, rows)
    server, _ = _start(model, served, work / "log", "--compact-after-bytes", str(size + 1))
    try:
        rate, payloads, sizes = _half_peak(server.address, window / 2)
        without = _lookups(server.address, rate, window, payloads, sizes)
        trigger = threading.Timer(1.0, _one_update, args=(server.address,))  # after the lookups' warm-up
        trigger.start()
        during = _lookups(server.address, rate, window, payloads, sizes)
        trigger.join()
        folded = server.logs.wait("compacted the delta log", timeout=600)[0]
        reloaded = server.logs.wait("reloaded", timeout=600)[0]
    finally:
        server.stop()
    started = _seconds(server.logs.wait("compacting the delta log")[0])
    return {
        "rows": written,
        "log_mb": round(size / 1e6, 1),
        "offered_lookups_per_s": round(rate, 1),
        "window_s": window,
        "fold_s": folded.get("seconds"),
        "fold_and_reload_s": round(_seconds(reloaded) - started, 2),
        "without": _pooled([without]),
        "during": _pooled([during]),
    }


def _seconds(entry: dict[str, object]) -> float:
    """A server log entry's time, in seconds since the epoch."""
    return datetime.datetime.fromisoformat(str(entry["ts"])).timestamp()


def _one_update(address: str) -> None:
    with Client(address) as client:
        client.update_rows("f0", [0], np.zeros((1, DIM), np.float32))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Model: 26 tables x {ROWS:,} x {DIM} (f0 fp32, f1 fp16); updates of {r['message_rows']:,} rows per message, "
        f"fsync before each answer. Command: `{r['command']}`.",
    ]
    if "updates_alone" in r:
        u = r["updates_alone"]
        lines += ["", f"Updates alone (fp32 table): {u['rows_per_s']:,} rows/s, {u['mb_per_s']} MB/s."]
    if "under_load" in r:
        load = r["under_load"]
        lines += [
            "",
            f"`small` workload at 50% of its peak ({load['offered_lookups_per_s']:,} of "
            f"{load['peak_lookups_per_s']:,} lookups/s), open loop; the points taken in turn, {load['rounds']} rounds, "
            "each point's answers pooled:",
            "",
            "| point | update rows/s | lookups/s | p50 | p99 | p99 vs without | throughput vs without | p99 of each "
            "round |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for key, label in (
            ("without_updates", "without updates"),
            ("with_fp32_updates", "fp32 updates"),
            ("with_fp16_updates", "fp16 updates"),
            ("fp32_updates_to_another_server", "fp32 updates sent to another server process"),
        ):
            p = load[key]
            rounds = ", ".join(f"{v}" for v in p["round_p99_ms"])
            lines.append(
                f"| {label} | {p.get('update_rows_per_s', 0):,} | {p['lookups_per_s']:,} | {p['p50_ms']} ms | "
                f"{p['p99_ms']} ms | {p.get('p99_vs_without', 1.0)} | {p.get('throughput_vs_without', 1.0)} | "
                f"{rounds} ms |"
            )
    lines.append("")
    if "visibility" in r:
        vis = r["visibility"]
        lines.append(
            f"Visible in every worker (`--workers 2`, 8 connections) after the answer: p50 {vis['p50_ms']} ms, p99 "
            f"{vis['p99_ms']} ms over {vis['trials']} updates."
        )
    if "replay" in r:
        rep = r["replay"]
        lines.append(
            f"Start-up with a delta log of {rep['rows']:,} rows: {rep['start_s_with_log']} s to SERVING (replay "
            f"{rep['replay_s']} s) against {rep['start_s_without_log']} s without."
        )
    if "compaction" in r:
        c = r["compaction"]
        lines.append(
            f"Background compaction of a log of {c['rows']:,} rows ({c['log_mb']} MB): folded in {c['fold_s']} s, "
            f"serving the new base {c['fold_and_reload_s']} s after it started; lookups at "
            f"{c['offered_lookups_per_s']:,}/s over {c['window_s']} s from the update that started it: p50 "
            f"{c['during']['p50_ms']} ms, p99 {c['during']['p99_ms']} ms, against p50 {c['without']['p50_ms']} ms, "
            f"p99 {c['without']['p99_ms']} ms without ({c['during']['lookups_per_s']:,} against "
            f"{c['without']['lookups_per_s']:,} lookups/s, errors {c['during']['errors'] or 'none'})."
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--update-rows-per-s", type=float, default=100_000, help="update rate beside the lookups")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the points under load, taken in turn")
    parser.add_argument("--trials", type=int, default=200, help="updates timed for visibility")
    parser.add_argument("--replay-rows", type=int, default=1_000_000, help="rows in the replayed delta log")
    parser.add_argument(
        "--sender-nice", type=int, default=10, help="niceness of the update sender (a trainer elsewhere, in production)"
    )
    parser.add_argument("--server-args", default="", help="more `serve` flags for every server (one string)")
    parser.add_argument("--message-rows", type=int, default=MESSAGE_ROWS, help="rows of one update message")
    parser.add_argument(
        "--compaction-window", type=float, default=30.0, help="seconds of lookups measured from the compaction's start"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="the phases to run")
    parser.add_argument("--out", default="benchmarks/results/updates", help="where to write JSON and Markdown")
    args = parser.parse_args(argv)
    Updater.nice = args.sender_nice
    Updater.message_rows = args.message_rows
    SERVER_ARGS[:] = shlex.split(args.server_args)
    phases = set(args.phases)
    base = Path(tempfile.mkdtemp(prefix="embserve-updates-"))
    try:
        model, checkpoint = _model(base)
        version = checkpoint_version(checkpoint, checkpoint_digest(checkpoint))
        results: dict[str, Any] = {
            "hardware": hardware(),
            "command": "python -m embserve.benchmarks.updates " + " ".join(argv or sys.argv[1:]),
            "message_rows": args.message_rows,
        }
        if phases & {"alone", "load"}:
            server, _ = _start(model, checkpoint, base / "log-a")
            other, _ = _start(model, checkpoint, base / "log-c")
            try:
                if "alone" in phases:
                    results["updates_alone"] = _updates_alone(server.address, args.duration)
                if "load" in phases:
                    results["under_load"] = _under_load(
                        server.address, other.address, args.duration, args.update_rows_per_s, args.rounds
                    )
            finally:
                server.stop()
                other.stop()
        if "visibility" in phases:
            server, _ = _start(model, checkpoint, base / "log-b", "--workers", "2")
            try:
                results["visibility"] = _visibility(server.address, args.trials)
            finally:
                server.stop()
        if "replay" in phases:
            results["replay"] = _replay(model, checkpoint, base, version, args.replay_rows)
        if "compaction" in phases:
            results["compaction"] = _compaction(
                model, checkpoint, base, version, args.replay_rows, args.compaction_window
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "updates.json").write_text(json.dumps(results, indent=2))
    (out / "updates.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
