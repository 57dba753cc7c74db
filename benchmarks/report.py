"""Benchmark records, the hardware they ran on, and their Markdown table, targets and PNG plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Record", "hardware", "write_report"]


@dataclasses.dataclass
class Record:
    """One measurement: a workload, a target server, a load point."""

    workload: str
    target: str  # embserve[-stream|-oip] | unbatched | transport-ceiling[-stream] | compute-ceiling
    mode: str  # closed | open | in-process
    concurrency: int | None
    rate: float | None
    output_dtype: str
    duration_s: float
    requests: int
    examples: int
    rps: float
    eps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    errors: dict[str, int]
    wrong: int
    checked: int
    mean_batch_examples: float | None = None
    server_rss_mb: float | None = None
    load_fraction: float | None = None  # open loop: the rate as a fraction of the measured closed-loop maximum


def hardware() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"


def _find(records: Sequence[Record], **kw: Any) -> Record | None:
    for r in records:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def targets(records: Sequence[Record], max_queue_delay_ms: float) -> list[tuple[str, bool, str]]:
    """The benchmark targets: (description, met, measured figures)."""
    out: list[tuple[str, bool, str]] = []

    def peak(wl: str, target: str) -> Record | None:
        return max(
            (
                r
                for r in records
                if r.workload == wl and r.target == target and r.mode == "closed" and r.output_dtype == "float32"
            ),
            key=lambda r: r.eps,
            default=None,
        )

    def ratio(desc: str, got: Record | None, ceiling: Record | None, factor: float, per_request: bool) -> None:
        if got is None or ceiling is None:
            return
        a, b = (got.rps, ceiling.rps) if per_request else (got.eps, ceiling.eps)
        unit = "req/s" if per_request else "examples/s"
        out.append(
            (desc, a >= factor * b, f"{a:,.0f} vs {factor} x {b:,.0f} {unit} = {factor * b:,.0f} ({a / b:.2f} x)")
        )

    # Peak closed-loop throughput against the no-op servers' peaks, on the same cores.
    for wl, factor, per_request in (("small", 0.7, True), ("large", 0.85, False), ("multihot", 0.7, False)):
        unit = "req/s" if per_request else "examples/s"
        ratio(
            f"{wl}, unary: {unit} >= {factor} x unary no-op",
            peak(wl, "embserve"),
            peak(wl, "transport-ceiling"),
            factor,
            per_request,
        )
    ratio(
        "small, stream: req/s >= 1.5 x unary no-op",
        peak("small", "embserve-stream"),
        peak("small", "transport-ceiling"),
        1.5,
        True,
    )
    ratio(
        "small, stream: req/s >= 0.7 x stream no-op",
        peak("small", "embserve-stream"),
        peak("small", "transport-ceiling-stream"),
        0.7,
        True,
    )
    for fraction in (0.25, 0.5, 0.75):
        unary = _find(records, workload="small", mode="open", target="embserve", load_fraction=fraction)
        stream = _find(records, workload="small", mode="open", target="embserve-stream", load_fraction=fraction)
        if unary and stream:
            out.append(
                (
                    f"small, open loop at {fraction:.0%} of unary's peak: stream p99 <= unary p99",
                    stream.p99_ms <= unary.p99_ms,
                    f"{stream.p99_ms:.2f} ms vs {unary.p99_ms:.2f} ms at {unary.rate or 0:,.0f}/s",
                )
            )
    for wl in ("small", "large", "multihot"):
        top = max((r.concurrency or 0 for r in records if r.workload == wl and r.target == "embserve-oip"), default=0)
        infer = _find(records, workload=wl, target="embserve-oip", concurrency=top)
        lookup = _find(records, workload=wl, target="embserve", mode="closed", concurrency=top, output_dtype="float32")
        if infer and lookup:
            out.append(
                (
                    f"{wl}, {top} callers: ModelInfer examples/s >= 0.8 x Lookup",
                    infer.eps >= 0.8 * lookup.eps,
                    f"{infer.eps:,.0f} vs 0.8 x {lookup.eps:,.0f} = {0.8 * lookup.eps:,.0f}",
                )
            )
    checked = sum(r.checked for r in records)
    out.append(
        (
            "every sampled response exact",
            checked > 0 and not any(r.wrong for r in records),
            f"{sum(r.wrong for r in records)} wrong of {checked} checked",
        )
    )
    for wl in ("small", "large", "multihot"):
        pairs = []
        for r in records:
            if r.workload == wl and r.target == "embserve" and r.mode == "closed" and r.output_dtype == "float32":
                u = _find(records, workload=wl, target="unbatched", concurrency=r.concurrency)
                if u:
                    pairs.append((r, u))
        if pairs:
            ok = all(r.eps >= u.eps for r, u in pairs)
            worst = min(pairs, key=lambda p: p[0].eps / max(p[1].eps, 1e-9))
            out.append(
                (
                    f"{wl}: batched examples/s >= unbatched at every concurrency",
                    ok,
                    f"worst ratio {worst[0].eps / max(worst[1].eps, 1e-9):.2f} at {worst[0].concurrency} callers",
                )
            )
            one = [p for p in pairs if p[0].concurrency == 1]
            if one:
                r, u = one[0]
                out.append(
                    (
                        f"{wl}, 1 caller: p50 within 0.3 ms of unbatched",
                        r.p50_ms <= u.p50_ms + 0.3,
                        f"{r.p50_ms:.2f} ms vs {u.p50_ms:.2f} ms",
                    )
                )
    half = _find(records, workload="small", mode="open", target="embserve", load_fraction=0.5)
    compute = _find(records, workload="small", target="compute-ceiling")
    if half and compute and compute.mean_batch_examples:
        forward_ms = 1e3 * compute.mean_batch_examples / compute.eps
        bound = 2 * (max_queue_delay_ms + forward_ms)
        out.append(
            (
                "small, open loop at half the max rate: p99 <= 2 x (queue delay + forward)",
                half.p99_ms <= bound,
                f"p99 {half.p99_ms:.2f} ms at {half.rate or 0:,.0f}/s vs 2 x ({max_queue_delay_ms:.2f} + {forward_ms:.2f}) = {bound:.2f} ms",
            )
        )
    fp16 = _find(records, workload="large", target="embserve", output_dtype="float16")
    fp32 = _find(
        records,
        workload="large",
        target="embserve",
        concurrency=fp16.concurrency if fp16 else -1,
        output_dtype="float32",
    )
    if fp16 and fp32:
        out.append(
            (
                "large: fp16 responses >= 1.6 x fp32 examples/s",
                fp16.eps >= 1.6 * fp32.eps,
                f"{fp16.eps:,.0f} vs 1.6 x {fp32.eps:,.0f} = {1.6 * fp32.eps:,.0f}",
            )
        )
    return out


def markdown(records: Sequence[Record], hw: dict[str, Any], command: str, max_queue_delay_ms: float) -> str:
    lines = [
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GiB, GPU: {hw['gpu'] or 'none'}; "
        f"Python {hw['python']}, torch {hw['torch']}, grpcio {hw['grpcio']}. Load generator and servers share the machine.",
        "",
        f"Command: `{command}`",
        "",
        "| workload | target | load | dtype | req/s | examples/s | p50 ms | p90 ms | p99 ms | p99.9 ms | batch | errors | wrong |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        load = (
            f"{r.concurrency} callers"
            if r.mode == "closed"
            else (f"{r.rate:,.0f}/s open" if r.mode == "open" else "in-process")
        )
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "-"
        lines.append(
            f"| {r.workload} | {r.target} | {load} | {r.output_dtype} | {_fmt(r.rps)} | {_fmt(r.eps)} | "
            f"{_fmt(r.p50_ms)} | {_fmt(r.p90_ms)} | {_fmt(r.p99_ms)} | {_fmt(r.p999_ms)} | "
            f"{_fmt(r.mean_batch_examples, 1)} | {errors} | {r.wrong}/{r.checked} |"
        )
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    for desc, met, figures in targets(records, max_queue_delay_ms):
        lines.append(f"| {desc} | {'yes' if met else '**no**'} | {figures} |")
    return "\n".join(lines) + "\n"


def plot(records: Sequence[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r.workload for r in records})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for target, style in (
            ("embserve", "o-"),
            ("embserve-stream", "D-"),
            ("embserve-oip", "d-."),
            ("unbatched", "s--"),
            ("transport-ceiling", "^:"),
            ("transport-ceiling-stream", "v:"),
        ):
            for mode in ("closed", "open"):
                pts = sorted(
                    (
                        r
                        for r in records
                        if r.workload == wl and r.target == target and r.mode == mode and r.output_dtype == "float32"
                    ),
                    key=lambda r: (r.concurrency or 0, r.rate or 0),
                )
                if not pts:
                    continue
                label = f"{target} ({mode})"
                ax.plot([p.eps for p in pts], [p.p99_ms for p in pts], style, label=f"{label} p99")
                ax.plot([p.eps for p in pts], [p.p50_ms for p in pts], style, alpha=0.4, label=f"{label} p50")
        compute = _find(records, workload=wl, target="compute-ceiling")
        if compute:
            ax.axvline(compute.eps, color="k", lw=0.8, ls="-.", label="compute ceiling")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("examples/s")
        ax.set_ylabel("latency ms")
        ax.set_title(wl)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: Sequence[Record], out_dir: Path, command: str, max_queue_delay_ms: float) -> dict[str, Path]:
    """Writes results.json (one record per measurement), report.md and latency.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "png": out_dir / "latency.png"}
    paths["json"].write_text(
        json.dumps({"hardware": hw, "command": command, "records": [dataclasses.asdict(r) for r in records]}, indent=1)
    )
    paths["markdown"].write_text(markdown(records, hw, command, max_queue_delay_ms))
    plot(records, paths["png"])
    return paths
