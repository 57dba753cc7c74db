"""The CPU-per-lookup benchmark on a tiny budget: both servers start, every API is measured at the given loads, the
SDK's caller CPU is taken over both transports, and the results are written. (No figure is asserted.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

from embserve.benchmarks.cpu import APIS, main, process_tree_cpu


def test_cpu_benchmark_writes_every_api_on_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "cpu"
    argv = ["--workloads", "small", "--rows", "1000", "--duration", "0.3", "--warmup", "0.1"]
    assert main([*argv, "--fractions", "0.5", "--peak", "100", "--out", str(out)]) == 0
    data = json.loads((out / "cpu.json").read_text())
    assert data["hardware"]["cores"] >= 1 and data["unary_peaks"] == {"small": 100}
    points = {(r["api"], r["server"], r["load_fraction"]) for r in data["records"]}
    assert points == {(api, server, 0.5) for api in APIS for server in ("embserve", "no-op")}
    for r in data["records"]:
        assert r["requests"] > 0 and r["errors"] == {} and r["rate"] == 50
        assert r["server_cpu_s"] >= 0 and r["cpu_s_per_1k_examples"] >= 0
    assert [c["transport"] for c in data["callers"]] == ["unary", "stream"]
    assert all(c["lookups"] > 0 and c["errors"] == 0 for c in data["callers"])
    md = (out / "cpu.md").read_text()
    assert "| small | LookupStream | 50% |" in md and "Hardware:" in md and "caller CPU" in md


def test_process_tree_cpu_counts_this_process() -> None:
    before = process_tree_cpu(os.getpid())
    total = 0
    while process_tree_cpu(os.getpid()) - before < 0.02:  # spins until the kernel has counted some CPU
        total += sum(range(1000))
    assert total > 0
