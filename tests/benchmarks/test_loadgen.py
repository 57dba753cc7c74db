"""The open-loop generator measures latency from each call's scheduled send time, so a generator (or server)
that falls behind its schedule shows up in the latencies instead of being hidden."""

from __future__ import annotations

import asyncio
import time

import pytest

from embserve.benchmarks import loadgen

BLOCK_S = 0.01


def test_open_loop_latency_counts_from_the_scheduled_send(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, float]] = []  # (send began, answered) per call, in call order

    async def slow_send(payload: bytes, timeout: float) -> tuple[bytes | None, str]:
        began = time.perf_counter()
        time.sleep(BLOCK_S)  # blocks the event loop: every later send leaves late
        calls.append((began, time.perf_counter()))
        return b"x" * 8, "OK"

    monkeypatch.setattr(loadgen, "_unary", lambda method: slow_send)  # every unary callable sends slowly
    total_s = 0.1
    result = asyncio.run(
        asyncio.wait_for(
            loadgen.open_loop("127.0.0.1:1", [b"req"], [1], [1], rate=1000.0, duration_s=total_s, warmup_s=0.0), 60
        )
    )
    assert result.ok == len(calls) > 50
    # Every call was scheduled within `total_s` of the start, which is no later than the first send; the n-th
    # answer came after n blocking sends, so its latency from the schedule is at least (answered - first - total).
    first = calls[0][0]
    floors_ms = [(answered - first - total_s) * 1e3 for _, answered in calls]
    assert max(floors_ms) > 200  # the schedule really slipped, so the check below has teeth
    for i, (latency, floor) in enumerate(zip(result.latencies_ms, floors_ms)):
        assert latency >= floor, f"call {i}: {latency:.1f} ms measured, but it was at least {floor:.1f} ms late"
