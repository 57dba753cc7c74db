"""The sharding benchmark end to end on a tiny budget: one server, both routed setups and the SDK's fan-out start,
answer alike and are measured; the JSON and Markdown appear. (No timing is asserted.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embserve.benchmarks.sharding import SETUPS, main


@pytest.mark.slow
def test_sharding_benchmark_runs_every_setup(tmp_path: Path) -> None:
    out = tmp_path / "sharding"
    args = ["--workloads", "small", "--rows", "1000", "--duration", "0.3", "--warmup", "0.1", "--callers", "2"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["hardware"]["cores"] >= 1
    points = {(r["setup"], r["client"]) for r in data["records"]}
    fan_out = {s.replace("router, ", "sdk fan-out, ") for s in SETUPS[1:]}
    assert points == {(s, c) for s in SETUPS for c in ("loadgen", "sdk")} | {(s, "sdk") for s in fan_out}
    for r in data["records"]:
        assert r["ok"] > 0 and not r["errors"] and r["answers_match"], r
    assert {(o["setup"], o["client"]) for o in data["overheads"]} == points - {
        (SETUPS[0], "loadgen"),
        (SETUPS[0], "sdk"),
    }
    assert "| small | router, 2 table-wise shards | loadgen |" in (out / "results.md").read_text()
