"""The byte bounds of admission without a network: the response budget and the off-loop decoder."""

from __future__ import annotations

import asyncio
import threading

import pytest

from embserve.server.admission import OffloadDecoder, ResponseBudget
from embserve.server.errors import Overloaded


def test_response_budget_bounds_each_connection_and_the_total() -> None:
    budget = ResponseBudget(max_total=1000, max_per_connection=600)
    budget.reserve("a", 500)
    with pytest.raises(Overloaded, match="max_pending_response_bytes_per_connection 600"):
        budget.reserve("a", 200)  # 700 on one connection
    budget.reserve("b", 400)  # another connection: 900 in total
    with pytest.raises(Overloaded, match="max_pending_response_bytes 1000"):
        budget.reserve("c", 200)  # 1,100 in total
    budget.release("a", 500)
    budget.reserve("c", 200)  # room again
    assert (budget.total, budget.pending("a"), budget.pending("b"), budget.pending("c")) == (600, 0, 400, 200)
    budget.release("b", 400)
    budget.release("c", 200)
    assert budget.total == 0 and budget.pending("b") == 0


def test_a_response_larger_than_the_bound_passes_alone() -> None:
    budget = ResponseBudget(max_total=100, max_per_connection=100)
    budget.reserve("a", 5000)  # nothing else counted: taken (max_response_bytes bounds a single answer)
    with pytest.raises(Overloaded):
        budget.reserve("b", 1)
    budget.release("a", 5000)


async def test_decode_queue_bound_refuses_at_once() -> None:
    decoder = OffloadDecoder(min_bytes=100, threads=1, max_waiting=2)
    gate = threading.Event()

    def slow() -> str:
        gate.wait(10)
        return "decoded"

    try:
        running = [asyncio.ensure_future(decoder.run(1000, slow)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert decoder.waiting == 2
        with pytest.raises(Overloaded, match="max_decode_queue"):
            await asyncio.wait_for(decoder.run(1000, slow), 5)
        assert await asyncio.wait_for(decoder.run(10, lambda: "small, in place"), 5) == "small, in place"
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*running), 10) == ["decoded", "decoded"]
        assert decoder.waiting == 0
    finally:
        gate.set()
        decoder.shutdown()
