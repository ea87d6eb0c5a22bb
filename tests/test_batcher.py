"""The batcher groups concurrent items, keeps order, and survives a failing model call."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from f5worker.inference.batcher import Batcher
from f5worker.inference.items import ChunkItem


def item(duration: int, steps: int = 32, seed: int = 0) -> ChunkItem:
    return ChunkItem(cond_wave=torch.zeros(1, 10), text=["a"], duration=duration, ref_frames=1, ref_rms=0.1,
                     seed=seed, steps=steps, cfg_strength=2.0, sway_sampling_coef=-1.0)


def echo_durations(items, abandoned=None):
    """Stands in for TTSEngine.run_items: returns each item's duration, so order is checkable."""
    return [np.array([it.duration]) for it in items]


def test_concurrent_jobs_share_calls_and_keep_order():
    batcher = Batcher(echo_durations, max_wait_s=0.01)

    async def main():
        return await asyncio.gather(*(batcher.submit([item(d), item(d + 1)]) for d in (10, 20, 30)))

    results = asyncio.run(main())
    assert [[int(w[0]) for w in r] for r in results] == [[10, 11], [20, 21], [30, 31]]
    assert max(batcher.calls) > 1 and sum(batcher.calls) == 6


def test_different_ode_settings_never_share_a_call():
    seen = []
    batcher = Batcher(lambda items, abandoned=None: seen.append({it.steps for it in items}) or echo_durations(items))

    async def main():
        await asyncio.gather(batcher.submit([item(5, steps=32)]), batcher.submit([item(6, steps=16)]))

    asyncio.run(main())
    assert all(len(steps) == 1 for steps in seen)


def test_frame_budget_splits_batches():
    batcher = Batcher(echo_durations, max_frames=100, max_wait_s=0.01)

    async def main():
        await asyncio.gather(*(batcher.submit([item(40)]) for _ in range(5)))

    asyncio.run(main())
    assert max(batcher.calls) <= 2  # 3 x 40 padded frames would pass the 100-frame budget


def test_a_failed_call_fails_its_jobs_and_the_loop_goes_on():
    calls = {"n": 0}

    def flaky(items, abandoned=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return echo_durations(items)

    batcher = Batcher(flaky)

    async def main():
        with pytest.raises(RuntimeError):
            await batcher.submit([item(3)])
        return await batcher.submit([item(4)])

    assert int(asyncio.run(main())[0][0]) == 4


def test_oldest_item_is_never_starved():
    """A job with rare settings, pending first, goes next even though a larger group waits."""
    from f5worker.inference.batcher import _Pending

    batcher = Batcher(echo_durations, max_items=2)
    loop = asyncio.new_event_loop()
    try:
        rare = _Pending(item(50, steps=8), loop.create_future())
        batcher._pending = [rare] + [_Pending(item(5), loop.create_future()) for _ in range(3)]
        assert batcher.next_batch() == [rare]
        assert [e.item.steps for e in batcher.next_batch()] == [32, 32]
    finally:
        loop.close()


def test_a_failing_item_fails_only_its_own_job():
    """One item that makes the shared model call fail: the jobs batched with it are retried alone
    and succeed; only the job that owns the item gets the error."""
    def poisoned(items, abandoned=None):
        if any(it.duration == 13 for it in items):
            raise RuntimeError("position limit exceeded")
        return echo_durations(items)

    batcher = Batcher(poisoned, max_wait_s=0.02)

    async def main():
        return await asyncio.gather(*(batcher.submit([item(d)]) for d in (10, 13, 20, 30, 40)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], RuntimeError)
    assert [int(r[0][0]) for i, r in enumerate(results) if i != 1] == [10, 20, 30, 40]
    assert max(batcher.calls) > 1  # they did share a call before the retry


def test_a_failed_or_cancelled_job_withdraws_its_other_items():
    """Once a job has failed (or hit its deadline), its remaining chunks never reach the model."""
    ran = []

    def record(items, abandoned=None):
        ran.extend(it.duration for it in items)
        if any(it.duration == 1 for it in items):
            raise RuntimeError("bad chunk")
        return echo_durations(items)

    batcher = Batcher(record, max_items=1, max_wait_s=0)

    async def main():
        with pytest.raises(RuntimeError):
            await batcher.submit([item(1), item(2), item(3)])
        task = asyncio.ensure_future(batcher.submit([item(7), item(8)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await batcher.submit([item(9)])

    assert int(asyncio.run(main())[0][0]) == 9
    assert 2 not in ran and 3 not in ran and 8 not in ran


def test_jobs_take_turns_so_new_ones_never_starve_a_long_one():
    """A long job's items, and a new one-item job arriving before every call, each with settings of
    its own (so nothing shares a call): the long job still gets its turns (round robin), where a
    rule of "the never-served job first" would serve only the newcomers."""
    from f5worker.inference.batcher import JobTurn

    async def main():
        batcher = Batcher(echo_durations, max_items=1)
        batcher.enqueue([item(100, steps=8) for _ in range(4)], JobTurn())
        served = []
        for call in range(12):
            batcher.enqueue([item(100, steps=16 + call)])
            batch = batcher.next_batch()
            batcher.calls.append(len(batch))
            served.append(batch[0].item.steps)
        return served

    served = asyncio.run(main())
    long_turns = [call for call, steps in enumerate(served) if steps == 8]
    # More jobs arrive than calls serve, so each waits a turn of every other job waiting: the long
    # job's turns come further apart as the queue grows, but they come.
    assert len(long_turns) >= 3 and long_turns[0] == 0, served
    assert all(b - a <= 5 for a, b in zip(long_turns, long_turns[1:])), served
