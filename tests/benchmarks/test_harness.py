"""The benchmark harness end to end on a tiny budget: servers start, load runs, answers check out, reports appear.
(No timing is asserted: the figures come from `make bench`.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embserve.benchmarks.report import Record, targets
from embserve.benchmarks.run import main
from embserve.benchmarks.workloads import WORKLOADS


@pytest.mark.slow
def test_small_suite_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(
        [
            "--workloads",
            "small",
            "--duration",
            "0.4",
            "--warmup",
            "0.1",
            "--max-points",
            "1",
            "--no-cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["hardware"]["cores"] >= 1 and "cpu" in data["hardware"]
    by_target = {r["target"]: r for r in data["records"] if r["mode"] != "open"}
    served = {
        "embserve",
        "embserve-stream",
        "embserve-oip",
        "unbatched",
        "transport-ceiling",
        "transport-ceiling-stream",
    }
    assert set(by_target) == served | {"compute-ceiling"}
    for target in served:
        r = by_target[target]
        assert r["requests"] > 0 and r["errors"] == {} and r["wrong"] == 0
    for target in ("embserve", "embserve-stream", "embserve-oip"):
        assert by_target[target]["checked"] > 0  # sampled responses compared with the model
    opens = [(r["target"], r["load_fraction"]) for r in data["records"] if r["mode"] == "open"]
    assert opens == [(t, f) for f in (0.25, 0.5, 0.75) for t in ("embserve", "embserve-stream")]
    md = (out / "report.md").read_text()
    for target in ("embserve", "embserve-stream", "embserve-oip"):
        assert f"| small | {target} | 1 callers |" in md
    assert "ModelInfer examples/s >= 0.8 x Lookup" in md and "Hardware:" in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workloads_are_deterministic_and_shaped_as_specified() -> None:
    small, large, multihot = (WORKLOADS[n]() for n in ("small", "large", "multihot"))
    assert len(small.config.tables) == 26 and small.config.tables[0].num_embeddings == 100_000
    a, b = small.requests(20, seed=3), small.requests(20, seed=3)
    assert all(np.array_equal(x.values, y.values) for x, y in zip(a, b))
    assert {r.batch_size for r in small.requests(200)} <= set(range(1, 9))
    assert all(r.batch_size == 512 for r in large.requests(3))
    m = multihot.requests(5)
    assert all(r.batch_size == 64 and 1 <= r.lengths.min() and r.lengths.max() <= 40 for r in m)
    assert sum(t.data_type.value == "fp16" for t in multihot.config.tables) == 4
    for r in m:
        rows = np.repeat([t.num_embeddings for t in multihot.config.tables], r.lengths.sum(axis=1))
        assert (r.values >= 0).all() and (r.values < rows).all()


def _rec(**kw: object) -> Record:
    base: dict[str, object] = dict(
        workload="small",
        target="embserve",
        mode="closed",
        concurrency=64,
        rate=None,
        output_dtype="float32",
        duration_s=1.0,
        requests=1,
        examples=1,
        rps=1.0,
        eps=1.0,
        p50_ms=1.0,
        p90_ms=1.0,
        p99_ms=1.0,
        p999_ms=1.0,
        errors={},
        wrong=0,
        checked=0,
    )
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


def test_targets_are_judged_from_the_records() -> None:
    records = [
        _rec(rps=700.0),
        _rec(concurrency=128, rps=650.0),  # peak 700
        _rec(target="transport-ceiling", rps=1000.0),
        _rec(target="embserve-stream", rps=1600.0),
        _rec(target="transport-ceiling-stream", rps=2500.0),
        _rec(workload="large", eps=84.0),
        _rec(workload="large", target="transport-ceiling", eps=100.0),
        _rec(mode="open", load_fraction=0.5, p99_ms=3.0),
        _rec(mode="open", target="embserve-stream", load_fraction=0.5, p99_ms=2.0, checked=4),
    ]
    verdicts = {desc: met for desc, met, _ in targets(records, 1.0)}
    assert verdicts["small, unary: req/s >= 0.7 x unary no-op"] is True
    assert verdicts["large, unary: examples/s >= 0.85 x unary no-op"] is False
    assert verdicts["small, stream: req/s >= 1.5 x unary no-op"] is True
    assert verdicts["small, stream: req/s >= 0.7 x stream no-op"] is False  # 1600 < 1750
    assert verdicts["small, open loop at 50% of unary's peak: stream p99 <= unary p99"] is True
    assert verdicts["every sampled response exact"] is True
    wrong = targets([*records, _rec(wrong=1, checked=1)], 1.0)
    assert dict((d, m) for d, m, _ in wrong)["every sampled response exact"] is False


def test_reply_parser_reads_id_and_status_as_protobuf_does() -> None:
    from embserve.benchmarks.loadgen import reply_id_and_code
    from embserve.v1 import embserve_pb2 as pb

    ok = pb.LookupResponse(
        dtype=pb.DTYPE_FLOAT32,
        shape=[2, 3],
        embeddings=bytes(24),
        keys=["a", "b"],
        dims=[1, 2],
        offsets=[0, 1, 3],
        model_name="m",
        model_version="v",
        request_id="r-17",
    )
    assert reply_id_and_code(ok.SerializeToString()) == (b"r-17", 0)
    failed = pb.LookupResponse(request_id="x" * 300, status=pb.Status(code=8, message="queue full"))
    assert reply_id_and_code(failed.SerializeToString()) == (b"x" * 300, 8)
    many_keys = pb.LookupResponse(keys=[f"t{i}" for i in range(200)], request_id="r-200")  # a field per key
    assert reply_id_and_code(many_keys.SerializeToString()) == (b"r-200", 0)


@pytest.mark.slow
def test_breakdown_reports_each_stage_for_both_transports(capsys: pytest.CaptureFixture[str]) -> None:
    from embserve.benchmarks.breakdown import main as breakdown

    assert breakdown(["--duration", "0.5", "--concurrency", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and " us |" in line}
    assert set(rows) == {"embserve, unary", "embserve, stream", "no-op, unary", "no-op, stream"}
    for name in ("embserve, unary", "embserve, stream"):
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        calls_per_s, cpu_us = float(cells[0].replace(",", "")), float(cells[1].split()[0].replace(",", ""))
        assert calls_per_s > 0 and cpu_us > 0  # the server answered and its CPU per call was measured
        assert all(c.endswith(" us") for c in cells[2:])  # every stage timed
