"""The CPU-per-lookup benchmark on a tiny budget: both servers start, every API is measured at the given loads, the
SDK's caller CPU is taken over both transports, and the results are written (no figure is asserted); its tables
against Ray Serve; and, where a Ray Serve Python is given (EMBSERVE_RAY_PYTHON), a short run beside Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from embserve.benchmarks.cpu import APIS, ClosedRecord, CpuRecord, main, markdown, process_tree_cpu

RAY_PYTHON = os.environ.get("EMBSERVE_RAY_PYTHON", "")


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


def _record(api: str, server: str, cpu_s: float, examples: int = 2000) -> CpuRecord:
    return CpuRecord(
        workload="small",
        api=api,
        server=server,
        load_fraction=0.5,
        rate=1000.0,
        duration_s=2.0,
        requests=2000,
        examples=examples,
        errors={},
        server_cpu_s=cpu_s,
        cpu_s_per_1k_examples=1e3 * cpu_s / examples,
        cpu_us_per_request=1e6 * cpu_s / 2000,
        loadgen_cpu_us_per_request=0.0,
        p50_ms=1.0,
        p99_ms=2.0,
    )


def _closed(server: str, api: str, examples_per_s: float) -> ClosedRecord:
    return ClosedRecord("small", server, api, 64, 2.0, examples_per_s / 4, examples_per_s, 10.0, 20.0, {}, 1.0)


def test_markdown_sets_each_embserve_api_against_ray() -> None:
    """Ray's CPU per 1,000 examples is the denominator of both embserve APIs' ratios, and closed-loop examples/s are
    taken against Ray's of the same workload."""
    records = [
        _record("Lookup", "embserve", 0.8),  # 0.4 ms per example
        _record("LookupStream", "embserve", 0.5),
        _record("Lookup", "no-op", 0.2),
        _record("Lookup", "ray", 1.6),  # 0.8 ms per example: embserve's unary is half, its stream 0.31x
    ]
    closed = [
        _closed("embserve", "Lookup", 9000),
        _closed("embserve", "LookupStream", 15000),
        _closed("ray", "Lookup", 6000),
    ]
    md = markdown(
        records, [], {"cpu": "x", "cores": 2, "memory_gb": 1, "python": "3", "torch": "t", "grpcio": "g"}, "c", closed
    )
    assert "| small | 50% | 1,000 | 800.00 | 400.00 | 250.00 | 0.50x | 0.31x | 2.00 | 2.00 | 2.00 | - |" in md
    assert "| small | embserve | LookupStream | 3,750 | 15,000 | 2.50x |" in md
    assert "| small | embserve | Lookup | 2,250 | 9,000 | 1.50x |" in md
    assert "| small | ray | Lookup | 1,500 | 6,000 | 1.00x |" in md


def test_markdown_without_ray_has_no_ray_table() -> None:
    md = markdown(
        [_record("Lookup", "embserve", 0.8)],
        [],
        {"cpu": "x", "cores": 2, "memory_gb": 1, "python": "3", "torch": "t", "grpcio": "g"},
        "c",
    )
    assert "Ray" not in md


@pytest.mark.slow
@pytest.mark.skipif(not RAY_PYTHON, reason="EMBSERVE_RAY_PYTHON (a Python with Ray Serve and embserve) is not set")
def test_cpu_benchmark_beside_ray_serve(tmp_path: Path) -> None:
    """With a Ray Serve Python (make bench-ray's .venv-ray), Ray answers the same Lookups without error, and the
    closed-loop points cover both embserve APIs and Ray."""
    out = tmp_path / "cpu"
    argv = ["--workloads", "small", "--rows", "1000", "--duration", "0.5", "--warmup", "0.2", "--no-sdk"]
    argv += ["--apis", "Lookup", "LookupStream", "--fractions", "0.5", "--peak", "100", "--ray-python", RAY_PYTHON]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "cpu.json").read_text())
    ray = [r for r in data["records"] if r["server"] == "ray"]
    assert [r["api"] for r in ray] == ["Lookup"] and ray[0]["requests"] > 0 and ray[0]["errors"] == {}
    assert {(c["server"], c["api"]) for c in data["closed_loop"]} == {
        ("embserve", "Lookup"),
        ("embserve", "LookupStream"),
        ("ray", "Lookup"),
    }
    assert all(c["calls_per_s"] > 0 and c["errors"] == {} for c in data["closed_loop"])


@pytest.mark.parametrize("client", ["async", "sync"])
def test_coalescing_benchmark_runs_both_modes(tmp_path: Path, client: str) -> None:
    from embserve.benchmarks import coalescing

    out = tmp_path / "coalescing"
    argv = ["--callers", "4", "--duration", "0.3", "--rounds", "1", "--client", client, "--out", str(out)]
    assert coalescing.main(argv) == 0
    records = json.loads((out / "coalescing.json").read_text())["records"]
    assert [r["mode"] for r in records] == ["coalesced", "one per message"]
    assert all(r["lookups_per_s"] > 0 for r in records)
