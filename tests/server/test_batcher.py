"""The dynamic batcher alone: batch formation, fan-out, limits, drops and failures (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from embserve.server.batcher import DynamicBatcher
from embserve.server.config import BatchPolicy
from embserve.server.errors import BatchFailed, DeadlineExpired, Overloaded, ShuttingDown


class Recorder:
    """A run_batch that records its batches and can be held closed, so requests pile up behind it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> Sequence[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


async def hold(run: Recorder, b: DynamicBatcher[int, int]) -> asyncio.Future[int]:
    """Starts `b` and runs item 0 alone with the executor held closed, so the next items pile up in the queue."""
    b.start()
    run.gate.clear()
    blocker = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    return blocker


def make(run: Recorder, **kw: object) -> DynamicBatcher[int, int]:
    args: dict[str, object] = dict(
        size_of=lambda i: 1 if i < 1000 else i // 1000,
        max_batch_size=4,
        max_queue_delay_s=0.0,
        max_queue_size=16,
        max_inflight_batches=1,
    )
    args.update(kw)
    return DynamicBatcher(run, **args)  # type: ignore[arg-type]


async def test_requests_gather_while_busy_and_results_fan_out_in_order() -> None:
    run = Recorder()
    b = make(run)
    b.start()
    run.gate.clear()
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)  # batch [0] is now running and held
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 10)]
    await asyncio.sleep(0.01)
    run.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 10)]
    assert run.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    await b.close()


async def test_oversized_request_runs_alone() -> None:
    run = Recorder()
    b = make(run)
    blocker = await hold(run, b)
    big = asyncio.ensure_future(b.submit(9000))  # 9 examples > max_batch_size 4
    small = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.01)
    run.gate.set()
    assert await big == 90000 and await small == 10 and await blocker == 0
    assert run.batches == [[0], [9000], [1]]
    await b.close()


async def test_queue_limit_rejects_at_once() -> None:
    run = Recorder()
    b = make(run, max_queue_size=4)
    blocker = await hold(run, b)
    queued = [asyncio.ensure_future(b.submit(i)) for i in range(1, 5)]
    await asyncio.sleep(0)
    try:
        # "At once": a request the full queue accepted would wait behind the held batch; the bound makes that a
        # failure within seconds, not a hang.
        with pytest.raises(Overloaded, match="queue full: 4 examples queued, limit 4"):
            await asyncio.wait_for(b.submit(99), timeout=2)
    finally:
        run.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *queued), timeout=10)
        await asyncio.wait_for(b.close(), timeout=10)


async def test_expired_and_cancelled_requests_are_never_run() -> None:
    run = Recorder()
    b = make(run)
    blocker = await hold(run, b)
    expired = asyncio.ensure_future(b.submit(1, timeout=0.001))
    cancelled = asyncio.ensure_future(b.submit(2))
    kept = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.02)
    cancelled.cancel()
    run.gate.set()
    with pytest.raises(DeadlineExpired):
        await expired
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await kept == 30 and await blocker == 0
    assert run.batches == [[0], [3]]
    await b.close()


async def test_failure_fails_only_its_batch() -> None:
    run = Recorder(fail_on=5)
    b = make(run)
    blocker = await hold(run, b)
    doomed = [asyncio.ensure_future(b.submit(i)) for i in (4, 5, 6, 7)]
    fine = [asyncio.ensure_future(b.submit(i)) for i in (8, 9)]
    await asyncio.sleep(0.01)
    run.gate.set()
    for d in doomed:
        with pytest.raises(BatchFailed, match="batch of 4 requests failed: RuntimeError: boom"):
            await d
    assert await asyncio.gather(*fine) == [80, 90] and await blocker == 0
    assert await b.submit(1) == 10  # still serving
    await b.close()


async def test_eager_policy_does_not_hold_a_lone_request() -> None:
    run = Recorder()
    b = make(run, policy=BatchPolicy.EAGER, max_queue_delay_s=60.0)
    b.start()
    assert await asyncio.wait_for(b.submit(1), timeout=5) == 10
    await b.close()


async def test_wait_policy_waits_for_company_then_runs_full_batch() -> None:
    run = Recorder()
    b = make(run, policy=BatchPolicy.WAIT, max_queue_delay_s=60.0)
    b.start()
    futs = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert run.batches == []  # three examples wait for a fourth
    futs.append(asyncio.ensure_future(b.submit(3)))
    assert await asyncio.wait_for(asyncio.gather(*futs), timeout=5) == [0, 10, 20, 30]
    assert run.batches == [[0, 1, 2, 3]]
    await b.close()


async def test_wait_policy_runs_partial_batch_after_the_delay() -> None:
    run = Recorder()
    b = make(run, policy=BatchPolicy.WAIT, max_queue_delay_s=0.02)
    b.start()
    assert await asyncio.wait_for(b.submit(1), timeout=5) == 10
    assert run.batches == [[1]]
    await b.close()


async def test_close_drains_queue_and_refuses_new_items() -> None:
    run = Recorder()
    b = make(run)
    b.start()
    run.gate.clear()
    futs = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDown):
        await b.submit(1)
    run.gate.set()
    await closing
    assert await asyncio.gather(*futs) == [i * 10 for i in range(6)]


def test_arguments_are_checked() -> None:
    run = Recorder()
    with pytest.raises(ValueError, match="max_batch_size must be > 0"):
        make(run, max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        make(run, max_queue_size=2)
    with pytest.raises(ValueError, match="max_queue_delay_s"):
        make(run, max_queue_delay_s=-1.0)
    with pytest.raises(ValueError, match="max_inflight_batches"):
        make(run, max_inflight_batches=0)


async def test_queue_budget_fails_items_that_waited_too_long() -> None:
    run = Recorder()
    b = make(run, max_queue_wait_s=0.02)
    blocker = await hold(run, b)
    stale = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.05)  # past the budget while the blocker holds the executor
    run.gate.set()
    with pytest.raises(Overloaded, match="over the queue budget of 20 ms"):
        await stale
    assert await blocker == 0 and await b.submit(2) == 20
    assert run.batches == [[0], [2]]
    await b.close()


async def test_queue_bytes_bound_refuses_at_once_and_frees_as_batches_run() -> None:
    run = Recorder()
    # Each item "holds" item x 100 bytes; 1,000 bytes may wait. Item 0 runs alone with the executor held.
    b: DynamicBatcher[int, int] = DynamicBatcher(
        run,
        size_of=lambda i: 1,
        max_batch_size=8,
        max_queue_delay_s=0,
        max_queue_size=64,
        bytes_of=lambda i: i * 100,
        max_queue_bytes=1000,
    )
    blocker = await hold(run, b)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (4, 5)]  # 900 bytes wait
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="max_queue_bytes 1000"):
        await asyncio.wait_for(b.submit(2), 5)  # 1,100 > 1,000: refused without waiting
    run.gate.set()
    assert await asyncio.wait_for(asyncio.gather(blocker, *queued), 5) == [0, 40, 50]
    assert await asyncio.wait_for(b.submit(9), 5) == 90  # the queue emptied: 900 bytes fit again
    await b.close()


async def test_an_item_larger_than_the_bytes_bound_runs_when_the_queue_is_empty() -> None:
    run = Recorder()
    b: DynamicBatcher[int, int] = DynamicBatcher(
        run,
        size_of=lambda i: 1,
        max_batch_size=8,
        max_queue_delay_s=0,
        max_queue_size=64,
        bytes_of=lambda i: i * 100,
        max_queue_bytes=1000,
    )
    b.start()
    assert await asyncio.wait_for(b.submit(30), 5) == 300  # 3,000 bytes alone: taken, as a big request is
    await b.close()


async def test_batch_bytes_bound_splits_batches() -> None:
    run = Recorder()
    # Items hold item x 100 bytes; a batch takes at most 1,000 unless one item alone is larger.
    b: DynamicBatcher[int, int] = DynamicBatcher(
        run,
        size_of=lambda i: 1,
        max_batch_size=8,
        max_queue_delay_s=0,
        max_queue_size=64,
        bytes_of=lambda i: i * 100,
        max_queue_bytes=100_000,
        max_batch_bytes=1000,
    )
    blocker = await hold(run, b)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (4, 5, 2, 30, 1)]
    await asyncio.sleep(0)
    run.gate.set()
    assert await asyncio.wait_for(asyncio.gather(blocker, *queued), 5) == [0, 40, 50, 20, 300, 10]
    assert run.batches == [[0], [4, 5], [2], [30], [1]]  # 900; 200 (+3,000 would pass); 3,000 alone; 100
    await b.close()


async def test_queue_budget_fails_an_item_while_the_batch_ahead_still_runs() -> None:
    run = Recorder()
    b = make(run, max_queue_wait_s=0.02, max_queue_size=64)
    blocker = await hold(run, b)
    stale = asyncio.ensure_future(b.submit(1))
    # The executor stays held: the refusal must not wait for the next batch to form.
    with pytest.raises(Overloaded, match="over the queue budget of 20 ms"):
        await asyncio.wait_for(stale, 10)
    assert b.queued_examples == 0 and b.queued_bytes == 0 and not blocker.done()
    kept = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0)
    kept.cancel()  # a cancelled item's timer leaves it to the next batch's sweep
    run.gate.set()
    assert await asyncio.wait_for(blocker, 5) == 0
    assert await asyncio.wait_for(b.submit(3), 5) == 30
    assert run.batches == [[0], [3]]
    await b.close()
