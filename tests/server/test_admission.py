"""The budgets of admission without a network: answers not yet taken (with flow control per connection), request
messages not yet queued, the off-loop decoder; and the bounds they count against, with the worker split."""

from __future__ import annotations

import asyncio
import threading

import pytest

from embserve.server.admission import ReceiveBudget, ResponseBudget
from embserve.server.bounds import Bounds
from embserve.server.config import ServerConfig
from embserve.server.errors import DeadlineExpired, Overloaded
from embserve.server.offload import OffloadDecoder

MiB = 1 << 20


async def test_answers_are_owed_per_connection_and_unsent_in_total() -> None:
    budget = ResponseBudget(max_total=1000, max_per_connection=600)
    a1 = await budget.admit("a", 500)
    b1 = await budget.admit("b", 250)
    assert (budget.owed, budget.unsent, budget.pending("a"), budget.connections) == (750, 0, 500, 2)
    a1.mark_computed()
    b1.mark_computed()
    c1 = budget.reserve("c", 300)  # 750 computed and not taken: new calls pass
    c1.mark_computed()
    with pytest.raises(Overloaded, match="max_pending_response_bytes 1000; this call needs 10"):
        budget.reserve("d", 10)  # 1,050 computed and not taken: the server sheds load
    for owed in (a1, b1, c1):
        owed.release()
        owed.release()  # idempotent: the write and the call's end may both release
    assert (budget.owed, budget.unsent, budget.connections) == (0, 0, 0)


async def test_a_connection_at_its_bound_is_held_until_its_answers_are_taken() -> None:
    budget = ResponseBudget(max_total=10_000, max_per_connection=600, max_held_request_bytes=100)
    first = await budget.admit("slow", 400)
    first.mark_computed()  # a client that has not read 400 bytes of answers
    other = await asyncio.wait_for(budget.admit("other", 400), 1)  # other connections pass
    held = asyncio.ensure_future(budget.admit("slow", 400, request_bytes=60))
    await asyncio.sleep(0.05)
    assert not held.done() and budget.waiting == 1  # held, not refused: flow control
    with pytest.raises(Overloaded, match="read the answers before sending more"):
        await budget.admit("slow", 400, request_bytes=60)  # held requests past their share are refused
    first.release()  # the client read its answer
    second = await asyncio.wait_for(held, 1)
    assert budget.pending("slow") == 400 and budget.waiting == 0
    with pytest.raises(DeadlineExpired, match="max_pending_response_bytes_per_connection 600"):
        await budget.admit("slow", 400, timeout=0.05)  # a caller's deadline ends the wait
    alone = await budget.admit("big", 5000)  # an answer larger than the bound passes alone
    for owed in (second, other, alone):
        owed.release()
    assert (budget.owed, budget.waiting, budget.connections) == (0, 0, 0)


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


def test_receive_budget_counts_messages_until_they_are_queued() -> None:
    budget = ReceiveBudget(max_bytes=1000)
    first = budget.charge(400)
    second = budget.charge(500)  # 900 of 1,000
    with pytest.raises(Overloaded, match="this one has 200, over the server's max_receive_bytes 1000"):
        budget.charge(200)  # refused at once, nothing counted
    assert budget.used == 900
    third = budget.charge(100)  # exactly 1,000
    for held in (first, second, third):
        held.release()
        held.release()  # idempotent: the queueing and an error path may both release
    assert budget.used == 0
    with pytest.raises(ValueError):
        with budget.holding(300):
            assert budget.used == 300
            raise ValueError("decoding failed")
    assert budget.used == 0


def test_receive_budget_takes_one_message_of_any_size_when_empty() -> None:
    budget = ReceiveBudget(max_bytes=1000)
    held = budget.charge(5000)  # larger than the bound, but nothing else is held
    with pytest.raises(Overloaded):
        budget.charge(1)
    held.release()
    budget.charge(1).release()


def test_workers_share_the_byte_bounds() -> None:
    config = ServerConfig(
        batching={"max_queue_bytes": 512 * MiB, "max_batch_bytes": 64 * MiB},
        limits={
            "max_pending_response_bytes": 256 * MiB,
            "max_pending_response_bytes_per_connection": 128 * MiB,
            "max_receive_bytes": 384 * MiB,
            "max_message_bytes": 8 * MiB,
            "max_response_bytes": 32 * MiB,
        },
    )
    whole = Bounds.of(config)
    assert whole.share(1) is whole
    one = whole.share(4)
    assert (one.max_queue_bytes, one.max_pending_response_bytes, one.max_receive_bytes) == (
        128 * MiB,
        64 * MiB,
        96 * MiB,
    )  # four workers hold what one process would
    assert one.max_pending_response_bytes_per_connection == 64 * MiB  # not above the worker's total
    assert (one.max_batch_bytes, one.max_response_bytes) == (64 * MiB, 32 * MiB)  # one batch, one request: whole
    # Defaults from the host's memory are shared too.
    defaults = Bounds.of(ServerConfig())
    assert defaults.share(2).max_queue_bytes == defaults.max_queue_bytes // 2
