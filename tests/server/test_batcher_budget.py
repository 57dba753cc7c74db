"""The latency-budget batching policy: a free slot waits for company only while no queued request has used up its
budget (the setting, or a share of its own deadline), and batches do form under load. The decisions are checked on
a fake clock; the end-to-end checks compare recorded queue waits with the budget, with generous slack (no speed is
asserted)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from embserve.server.batcher import DEADLINE_SHARE, DynamicBatcher
from embserve.server.config import BatchingConfig, BatchPolicy

from .test_batcher import Recorder, make

BUDGET_S = 0.05
SLACK_S = 0.5  # a loaded machine may run the batcher's loop late; a wait past budget + slack is the policy's fault


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Waits:
    """A BatcherObserver that keeps every batch's queue waits."""

    def __init__(self) -> None:
        self.batches: list[Sequence[float]] = []

    def queue_depth(self, examples: int) -> None:
        pass

    def batch_formed(self, examples: int, requests: int, queue_waits_s: Sequence[float]) -> None:
        self.batches.append(list(queue_waits_s))

    def dropped(self, reason: str, count: int = 1) -> None:
        pass


async def test_waits_until_the_first_budget_ends() -> None:
    clock = FakeClock()
    b = make(Recorder(), policy=BatchPolicy.BUDGET, latency_budget_s=BUDGET_S, clock=clock)
    assert b.company_wait_s() == 0  # nothing queued: nothing to wait for
    b.enqueue(1)
    assert b.company_wait_s() == pytest.approx(BUDGET_S)
    clock.now += 0.03
    b.enqueue(2)  # a later request: its budget ends later, the first one's still decides
    assert b.company_wait_s() == pytest.approx(BUDGET_S - 0.03)
    clock.now += 0.03
    assert b.company_wait_s() < 0  # the first request's budget is used up: form the batch now


async def test_a_short_deadline_shortens_the_wait_of_everyone_queued() -> None:
    clock = FakeClock()
    b = make(Recorder(), policy=BatchPolicy.BUDGET, latency_budget_s=BUDGET_S, clock=clock)
    b.enqueue(1)
    clock.now += 0.01
    b.enqueue(2, timeout=0.04)  # may wait a quarter of its 40 ms
    assert b.company_wait_s() == pytest.approx(DEADLINE_SHARE * 0.04)
    b.enqueue(3, timeout=10.0)  # a long deadline: the setting bounds it
    assert b.company_wait_s() == pytest.approx(DEADLINE_SHARE * 0.04)


async def test_a_full_batch_and_the_eager_policy_never_wait() -> None:
    clock = FakeClock()
    b = make(Recorder(), policy=BatchPolicy.BUDGET, latency_budget_s=BUDGET_S, clock=clock)
    for i in range(1, 5):  # max_batch_size 4
        b.enqueue(i)
    assert b.company_wait_s() == 0
    eager = make(Recorder(), clock=clock)
    eager.enqueue(1)
    assert eager.company_wait_s() == 0


async def test_when_items_leave_the_next_budget_decides() -> None:
    clock = FakeClock()
    b = make(Recorder(), policy=BatchPolicy.BUDGET, latency_budget_s=BUDGET_S, clock=clock)
    cancelled = b.enqueue(1, timeout=0.004)  # would end the wait after 1 ms
    clock.now += 0.002
    b.enqueue(2)
    assert b.company_wait_s() == pytest.approx(0.001 - 0.002)
    cancelled.cancel()
    batch = b._take_batch()  # the cancelled item is dropped, item 2 taken
    assert [e.item for e in batch] == [2]
    b.enqueue(3)
    assert b.company_wait_s() == pytest.approx(BUDGET_S)


def test_the_policy_needs_a_budget() -> None:
    with pytest.raises(ValueError, match="latency_budget_s"):
        DynamicBatcher(
            Recorder(),
            size_of=lambda i: 1,
            max_batch_size=4,
            max_queue_delay_s=0.0,
            max_queue_size=16,
            policy=BatchPolicy.BUDGET,
        )
    assert BatchingConfig(policy="budget", latency_budget_ms=3).latency_budget_ms == 3


async def test_no_request_waits_past_its_budget_and_batches_form_under_load() -> None:
    waits = Waits()
    run = Recorder()
    b = make(
        run,
        policy=BatchPolicy.BUDGET,
        latency_budget_s=BUDGET_S,
        max_batch_size=64,
        max_queue_size=1024,
        observer=waits,
    )
    b.start()
    # A lone request at low load waits for company up to its budget, no longer.
    assert await b.submit(1) == 10
    # Under load (requests arriving faster than the budget), batches of several form.
    results = await asyncio.gather(*(_later(b, i, 0.002 * i) for i in range(1, 101)))
    assert results == [10 * i for i in range(1, 101)]
    await b.close()
    assert all(w <= BUDGET_S + SLACK_S for batch in waits.batches for w in batch), waits.batches
    assert max(len(batch) for batch in waits.batches) > 1
    assert len(waits.batches) < 101  # fewer forwards than requests


async def test_a_request_with_a_short_deadline_is_batched_within_it() -> None:
    waits = Waits()
    b = make(Recorder(), policy=BatchPolicy.BUDGET, latency_budget_s=5.0, observer=waits)
    b.start()
    assert await b.submit(7, timeout=2.0) == 70  # would fail DEADLINE_EXCEEDED had it waited the 5 s budget
    await b.close()
    assert waits.batches[0][0] <= DEADLINE_SHARE * 2.0 + SLACK_S


async def _later(b: DynamicBatcher[int, int], item: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return await b.submit(item)
