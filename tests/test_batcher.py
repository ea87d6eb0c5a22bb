"""The batcher groups concurrent items, keeps order, and survives a failing model call."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from f5worker.errors import check_abandoned
from f5worker.inference.batcher import MAX_LENGTH_RATIO, Batcher, JobTurn, whole_calls
from f5worker.inference.items import ChunkItem


def item(duration: int, steps: int = 32, seed: int = 0) -> ChunkItem:
    return ChunkItem(cond_wave=torch.zeros(1, 10), text=["a"], duration=duration, ref_frames=1, ref_rms=0.1,
                     seed=seed, steps=steps, cfg_strength=2.0, sway_sampling_coef=-1.0)


def echo_durations(items, abandoned=None):
    """Stands in for TTSEngine.run_items: returns each item's duration, so order is checkable."""
    return [np.array([it.duration]) for it in items]


def test_concurrent_jobs_share_calls_and_keep_order():
    batcher = Batcher(whole_calls(echo_durations), max_wait_s=0.01)

    async def main():
        return await asyncio.gather(*(batcher.submit([item(d), item(d + 1)]) for d in (10, 20, 30)))

    results = asyncio.run(main())
    assert [[int(w[0]) for w in r] for r in results] == [[10, 11], [20, 21], [30, 31]]
    assert max(batcher.calls) > 1 and sum(batcher.calls) == 6


def test_different_ode_settings_never_share_a_call():
    seen = []
    batcher = Batcher(whole_calls(lambda items, abandoned=None: seen.append({it.steps for it in items}) or echo_durations(items)))

    async def main():
        await asyncio.gather(batcher.submit([item(5, steps=32)]), batcher.submit([item(6, steps=16)]))

    asyncio.run(main())
    assert all(len(steps) == 1 for steps in seen)


def test_frame_budget_splits_batches():
    batcher = Batcher(whole_calls(echo_durations), max_frames=100, max_wait_s=0.01)

    async def main():
        await asyncio.gather(*(batcher.submit([item(40)]) for _ in range(5)))

    asyncio.run(main())
    assert max(batcher.calls) <= 2  # 3 x 40 padded frames would pass the 100-frame budget


def test_no_call_holds_rows_further_apart_than_the_length_ratio():
    """Each row was held within the ratio of the lead alone, so 500 and 2000 frames (each within 2x
    of a 1000-frame lead) shared a call: the short row padded to four times its length."""
    seen = []
    batcher = Batcher(whole_calls(lambda items, abandoned=None: seen.append(sorted(it.duration for it in items))
                                  or echo_durations(items)), max_wait_s=0.01)

    async def main():
        await batcher.submit([item(10)])  # the loop is running: the three below queue before a call
        return await asyncio.gather(*(batcher.submit([item(d)]) for d in (1000, 500, 2000)))

    assert [int(r[0][0]) for r in asyncio.run(main())] == [1000, 500, 2000]
    assert all(call[-1] <= MAX_LENGTH_RATIO * call[0] for call in seen), seen
    assert sorted(map(len, seen[1:])) == [1, 2]  # two of them still share a call

def test_a_failed_call_fails_its_jobs_and_the_loop_goes_on():
    calls = {"n": 0}

    def flaky(items, abandoned=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return echo_durations(items)

    batcher = Batcher(whole_calls(flaky))

    async def main():
        with pytest.raises(RuntimeError):
            await batcher.submit([item(3)])
        return await batcher.submit([item(4)])

    assert int(asyncio.run(main())[0][0]) == 4


def test_oldest_item_is_never_starved():
    """A job with rare settings, pending first, goes next even though a larger group waits."""
    from f5worker.inference.batcher import _Pending

    batcher = Batcher(whole_calls(echo_durations), max_items=2)
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

    batcher = Batcher(whole_calls(poisoned), max_wait_s=0.02)

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

    batcher = Batcher(whole_calls(record), max_items=1, max_wait_s=0)

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


def test_a_job_whose_later_item_fails_first_gets_that_error_not_a_cancellation():
    """A job's later, shorter chunk can run first, as company of another job's call, while its
    earlier one waits. That chunk failing cancelled the earlier one, and the job, awaiting it, ended
    cancelled: runpod sent no result, and the caller waited for RunPod's timeout."""
    ran = []

    def fails_on_seed_101(items, abandoned=None):
        ran.append(sorted(it.duration for it in items))
        if any(it.seed == 101 for it in items):
            raise RuntimeError("sampling failed")
        return echo_durations(items)

    batcher = Batcher(whole_calls(fails_on_seed_101), max_wait_s=0.01)

    async def the_job_awaits_its_chunks_in_order():
        futures = batcher.enqueue([item(1400, seed=100), item(500, seed=101)])
        try:
            return [await batcher.sampled(future) for future in futures]
        finally:
            batcher.withdraw(futures)

    async def main():
        await batcher.submit([item(10)])  # the loop is running, as on a worker that served a job
        other = asyncio.ensure_future(batcher.submit([item(600, seed=200)]))  # leads; 500 fits beside it
        job = asyncio.ensure_future(the_job_awaits_its_chunks_in_order())
        return await asyncio.gather(other, job, return_exceptions=True)

    other, job = asyncio.run(main())
    assert int(other[0][0]) == 600
    assert isinstance(job, RuntimeError) and str(job) == "sampling failed", repr(job)
    assert ran[1:] == [[500, 600], [600], [500]]  # shared, then each alone; the failed job's 1400 never

def test_jobs_take_turns_so_new_ones_never_starve_a_long_one():
    """A long job's items, and a new one-item job arriving before every call, each with settings of
    its own (so nothing shares a call): the long job still gets its turns (round robin), where a
    rule of "the never-served job first" would serve only the newcomers."""

    async def main():
        batcher = Batcher(whole_calls(echo_durations), max_items=1)
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


# --- calls run a step at a time, and a short job's call runs between two steps of a long one -----
class SteppedCalls:
    """The batcher's ``start_call``: each call records its steps (named by its first item's
    duration) and closes, and each step takes ``step_s``. It stands in for ``EngineCall`` so that
    the order of steps is visible; that a call set aside gives the model's same result is tested
    in test_engine.py with the real model."""

    def __init__(self, step_s: float = 0.002):
        self.step_s, self.steps, self.closed, self.closed_on = step_s, [], [], []

    def __call__(self, items, abandoned):
        return SteppedCall(self, items, abandoned)


class SteppedCall:
    def __init__(self, calls: SteppedCalls, items, abandoned):
        self.calls, self.items, self.abandoned = calls, items, abandoned
        self.name, self.steps_left = items[0].duration, items[0].steps

    def advance(self, set_aside):
        while self.steps_left:
            check_abandoned(self.abandoned)
            time.sleep(self.calls.step_s)
            self.calls.steps.append(self.name)
            self.steps_left -= 1
            if self.steps_left and set_aside():
                return None
        return echo_durations(self.items)

    def close(self):
        self.calls.closed.append(self.name)
        self.calls.closed_on.append(threading.current_thread().name)


async def until(condition, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.0005)


def test_a_short_job_runs_between_two_steps_of_a_long_call():
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)

    async def main():
        long = asyncio.ensure_future(batcher.submit([item(1000)]))
        await until(lambda: len(calls.steps) >= 2)
        short = await batcher.submit([item(10)])
        return await long, short

    long, short = asyncio.run(main())
    assert int(long[0][0]) == 1000 and int(short[0][0]) == 10
    first = calls.steps.index(10)
    assert 2 <= first < 32 and calls.steps[first:first + 32] == [10] * 32  # the short call ran whole
    assert calls.steps.count(1000) == 32 and calls.steps[-1] == 1000  # then the long one went on
    assert batcher.set_aside == 1 and batcher.calls == [1, 1] and sorted(calls.closed) == [10, 1000]


def test_a_newcomer_with_more_work_than_is_left_waits_for_the_running_call():
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)

    async def main():
        first = asyncio.ensure_future(batcher.submit([item(1000)]))
        await until(lambda: len(calls.steps) >= 2)
        await batcher.submit([item(999)])  # 32 x 999 frames of work, against at most 30 x 1000 left
        await first

    asyncio.run(main())
    assert batcher.set_aside == 0 and calls.steps == [1000] * 32 + [999] * 32


def test_a_long_jobs_next_call_never_sets_a_short_jobs_call_aside():
    """A long job's next item is a call of little work (2 steps), less than what is left of a short
    job's call (32 steps), but the long job has more work still to come: whole jobs are compared."""
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)

    async def main():
        short = asyncio.ensure_future(batcher.submit([item(100)]))
        await until(lambda: calls.steps)
        turn = JobTurn(work_after=1000 * 32 * 50)  # fifty more chunks of 1000 frames to come
        await asyncio.gather(short, asyncio.gather(*batcher.enqueue([item(200, steps=2)], turn)))

    asyncio.run(main())
    assert batcher.set_aside == 0 and calls.steps == [100] * 32 + [200] * 2


def test_a_jobs_own_later_items_never_set_its_call_aside():
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)
    waves = asyncio.run(batcher.submit([item(1000), item(10)]))  # too far apart in length to share a call
    assert [int(w[0]) for w in waves] == [1000, 10]
    assert batcher.set_aside == 0 and calls.steps == [1000] * 32 + [10] * 32


def test_a_stream_of_short_jobs_leaves_a_third_of_the_model_to_a_long_one():
    """A new short job as soon as the last one ends: each sets the long call aside, but the long
    call, taken up again, runs for half as long as the short one did before it gives way again."""
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)

    async def main():
        long = asyncio.ensure_future(batcher.submit([item(1000, steps=64)]))
        await until(lambda: calls.steps)
        while not long.done():
            await batcher.submit([item(10, steps=8)])
        await long

    asyncio.run(main())
    last_long = len(calls.steps) - calls.steps[::-1].index(1000)
    while_long_ran = calls.steps[:last_long]
    assert while_long_ran.count(1000) == 64 and batcher.set_aside >= 3
    assert 0.25 <= while_long_ran.count(1000) / len(while_long_ran) <= 0.45, calls.steps  # about a third


def test_no_more_than_max_calls_are_in_progress():
    """With room for two calls, a third job waits for the second to end: it does not set it aside."""
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0, max_calls=2)

    async def main():
        long = asyncio.ensure_future(batcher.submit([item(1000)]))
        await until(lambda: calls.steps)
        middle = asyncio.ensure_future(batcher.submit([item(100)]))
        await until(lambda: 100 in calls.steps)
        await batcher.submit([item(10)])
        await asyncio.gather(long, middle)

    asyncio.run(main())
    last_middle = len(calls.steps) - calls.steps[::-1].index(100)
    assert calls.steps[:last_middle].count(100) == 32 and 10 not in calls.steps[:last_middle]
    assert calls.steps.count(1000) == 32 and calls.steps.count(10) == 32


def test_a_set_aside_call_whose_job_has_gone_takes_no_further_step():
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0)

    async def main():
        long = asyncio.ensure_future(batcher.submit([item(1000)]))
        await until(lambda: calls.steps)
        short = asyncio.ensure_future(batcher.submit([item(10)]))
        await until(lambda: 10 in calls.steps)
        long.cancel()  # its deadline, say, while it is set aside
        await short
        with pytest.raises(asyncio.CancelledError):
            await long
        await asyncio.sleep(0.01)

    asyncio.run(main())
    first = calls.steps.index(10)
    assert calls.steps[first:] == [10] * 32 and sorted(calls.closed) == [10, 1000]


def test_a_set_aside_call_whose_job_has_gone_is_freed_at_once_and_leaves_its_place():
    """Three calls, each setting the one before aside; the first one's job goes while the third
    runs. It is closed before the second resumes (not when its turn comes back), on the model
    thread, and no longer counts among ``max_calls``: a fourth, shorter job still sets the third aside."""
    calls = SteppedCalls()
    batcher = Batcher(calls, max_wait_s=0, max_calls=3)

    async def main():
        first = asyncio.ensure_future(batcher.submit([item(1000)]))
        await until(lambda: calls.steps)
        second = asyncio.ensure_future(batcher.submit([item(100)]))
        await until(lambda: 100 in calls.steps)
        third = asyncio.ensure_future(batcher.submit([item(10)]))
        await until(lambda: 10 in calls.steps)
        first.cancel()  # its deadline, say, while it is set aside under two others
        await asyncio.gather(third, second, batcher.submit([item(1)]))
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())
    assert batcher.set_aside == 3 and calls.closed == [1000, 1, 10, 100]
    first_of_fourth, last_of_third = calls.steps.index(1), len(calls.steps) - calls.steps[::-1].index(10)
    assert first_of_fourth < last_of_third  # the fourth ran between two steps of the third
    assert all(name.startswith("gpu") for name in calls.closed_on)


def test_a_finished_call_is_freed_at_once_not_by_the_cyclic_collector():
    """A call refers back to its batch (``abandoned``); left in a cycle, a long job's calls kept
    their tensors and waveforms until the cyclic collector ran (resident memory grew with the text)."""
    calls, made = SteppedCalls(step_s=0), []

    def start_call(items, abandoned):
        made.append(SteppedCall(calls, items, abandoned))
        return made[-1]

    gc.disable()
    try:
        batcher = Batcher(start_call, max_wait_s=0)
        asyncio.run(batcher.submit([item(10)]))
        finished = weakref.ref(made.pop())
        assert finished() is None
    finally:
        gc.enable()
