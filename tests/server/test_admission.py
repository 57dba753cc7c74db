"""The byte bounds of admission without a network: the response and receive budgets and the off-loop decoder."""

from __future__ import annotations

import asyncio
import threading

import pydantic
import pytest

from embserve.server.admission import (
    Bounds,
    OffloadDecoder,
    ReceiveBudget,
    ResponseBudget,
    worker_config,
)
from embserve.server.config import LimitsConfig, ServerConfig
from embserve.server.errors import Overloaded

MiB = 1 << 20


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


def test_receive_budget_reserves_the_largest_message_then_keeps_its_size() -> None:
    budget = ReceiveBudget(max_bytes=1000, slot=400)
    first = budget.reserve()
    second = budget.reserve()  # 800 of 1,000
    with pytest.raises(Overloaded, match="max_receive_bytes 1000"):
        budget.reserve()  # 1,200: refused at once, nothing counted
    assert budget.used == 800
    first.settle(50)  # the message read was 50 bytes: its call keeps only those
    third = budget.reserve()  # 850
    with pytest.raises(Overloaded, match="this message needs 200"):
        budget.charge(200)  # a stream message already read: 1,050
    message = budget.charge(150)  # exactly 1,000
    for held in (first, second, third, message):
        held.release()
        held.release()  # idempotent: a call's end and an error path may both release
    assert budget.used == 0


def test_receive_budget_takes_one_message_of_any_size_when_empty() -> None:
    budget = ReceiveBudget(max_bytes=1000, slot=1000)
    held = budget.charge(5000)  # larger than the bound, but nothing else is held
    with pytest.raises(Overloaded):
        budget.reserve()
    held.release()
    budget.reserve().release()
    with pytest.raises(ValueError, match="cannot hold one 2000-byte message"):
        ReceiveBudget(max_bytes=1000, slot=2000)


def test_receive_bytes_must_hold_the_largest_message() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_receive_bytes .* must be >= limits.max_message_bytes"):
        LimitsConfig(max_message_bytes=1 << 20, max_receive_bytes=1 << 19)
    bounds = Bounds(ServerConfig(limits=LimitsConfig(max_message_bytes=1 << 30)), memory=1 << 30)
    assert bounds.max_receive_bytes == 1 << 30  # the host default is raised to one message


def test_workers_share_the_byte_bounds() -> None:
    config = ServerConfig(
        batching={"max_queue_bytes": 512 * MiB, "max_batch_bytes": 64 * MiB},
        limits={"max_pending_response_bytes": 256 * MiB, "max_pending_response_bytes_per_connection": 128 * MiB,
                "max_receive_bytes": 384 * MiB, "max_message_bytes": 8 * MiB, "max_response_bytes": 32 * MiB},
    )
    assert worker_config(config, 1) is config
    one = Bounds(worker_config(config, 4))
    assert (one.max_queue_bytes, one.max_pending_response_bytes, one.max_receive_bytes) == (
        128 * MiB, 64 * MiB, 96 * MiB)  # four workers hold what one process would
    assert one.max_pending_response_bytes_per_connection == 64 * MiB  # not above the worker's total
    assert (one.max_batch_bytes, one.max_response_bytes) == (64 * MiB, 32 * MiB)  # one batch, one request: whole
    many = Bounds(worker_config(config, 100))
    assert many.max_receive_bytes == 8 * MiB  # still room for the largest message
    # Defaults from the host's memory are shared too.
    defaults = ServerConfig()
    assert Bounds(worker_config(defaults, 2)).max_queue_bytes == Bounds(defaults).max_queue_bytes // 2
