"""Groups chunk items from concurrent jobs into shared model calls on one GPU thread, and runs a
short job's call between two steps of a long one.

Why this module exists: a serverless worker is billed by the GPU-second, and a DiT step on 2 items
costs little more than on 1. Jobs that arrive together (runpod's ``concurrency_modifier`` lets
several run on one worker) submit their chunk items here; a single loop takes whatever is pending,
waits at most ``max_wait_s`` for company, and starts a call of one job's oldest waiting item
together with others that share its ODE settings, nearest its length first, within an item and a
frame budget and at most ``MAX_LENGTH_RATIO`` apart in length. The model is only ever driven from
one thread.

Fairness: jobs take turns leading a call (the one served longest ago leads; a new job has never
been served), and a job queues only ``job_window`` items at a time (``jobs.workflows`` keeps the
rest). A call runs a step at a time (``ModelCall.advance``), so it need not run to its end before
another starts: when a job with no call in progress has less work left (steps x frames of its
items, queued or still to come: ``JobTurn.work_after``) than the running call's jobs (steps left x
rows x frames, and what they still have to come), the running call is set aside after its current
step and the newcomer's runs first (shortest remaining work first; a chapter's next chunk thus never
sets a short job's call aside);
the set-aside call then resumes where it stopped, with the same result. A short job that arrives
while a chapter runs thus waits for one ODE step of it, not for its call. A call taken up again
runs for ``OWED_SHARE`` of the time others ran while it waited before it can be set aside again,
so a stream of short jobs takes at most about two thirds of the model's time from a long one; at
most ``max_calls`` calls are in progress at once (each holds its tensors on the device). A call
whose jobs have all gone is freed before the next slice, set aside or not, and counts no more
among them; calls are closed on the model thread, as they run.

``start_call(items, abandoned)`` makes a call of the items (``inference.engine.EngineCall``; the
model thread calls it); ``abandoned()`` is true once every job of the call has gone (failed, or
stopped at its deadline), and a call that asks it between ODE steps stops there
(``f5worker.errors.CallAbandoned``), so a stopped job's call does not hold up the jobs queued
behind it for more than one step. ``whole_calls(run_items)`` makes calls of a plain function that
samples items at once and is never set aside.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from f5worker.errors import CallAbandoned, traceback_without_messages
from f5worker.inference.items import ChunkItem, item_frames, item_work

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S = 0.004
DEFAULT_MAX_ITEMS = 16
DEFAULT_MAX_FRAMES = 16 * 2048  # sum of padded frames in one call: bounds GPU memory
# Items of one call are at most this far apart in length: every row is padded to the longest, so a
# row padded to more than twice its own length wastes more than the shared call saves, and a short
# job's answer would wait for a long job's much longer rows.
MAX_LENGTH_RATIO = 2.0
# Items a job keeps queued at once: its next call's share and one more, so a long job's own chunks
# still share calls while another job's items can lead the very next one.
DEFAULT_JOB_WINDOW = 2
# Calls in progress at once: the running one and those set aside for it (each holds its batch's
# tensors on the device until it ends).
DEFAULT_MAX_CALLS = 3
# A call set aside is owed this share of the model time others had meanwhile, and runs it back
# before it gives way again: under a stream of shorter jobs a long one keeps a third of the model
# (never starved), while a short job that arrives just after another waits at most half that one's
# time, not all of it (the short job's latency beside a long one stays within 2x its idle latency).
OWED_SHARE = 0.5


class ModelCall(Protocol):
    """One model call of a batch of items, run on the model thread in slices."""

    steps_left: int  # ODE steps still to run

    def advance(self, set_aside: Callable[[], bool]) -> list[np.ndarray] | None:
        """Steps until the last, then each item's waveform; or None after a step at which
        ``set_aside()`` is true (the call resumes at its next ``advance``)."""

    def close(self) -> None:
        """Let go of what it holds (a call that is never advanced again)."""


StartCall = Callable[[list[ChunkItem], Callable[[], bool]], ModelCall]
RunItems = Callable[[list[ChunkItem], Callable[[], bool]], list[np.ndarray]]


class WholeCall:
    """A ``ModelCall`` of a plain ``run_items(items, abandoned)`` function: run at once, never set aside."""

    def __init__(self, run_items: RunItems, items: list[ChunkItem], abandoned: Callable[[], bool]):
        self.run_items, self.items, self.abandoned = run_items, items, abandoned
        self.steps_left = items[0].steps

    def advance(self, set_aside: Callable[[], bool]) -> list[np.ndarray]:
        return self.run_items(self.items, self.abandoned)

    def close(self) -> None:
        return None


def whole_calls(run_items: RunItems) -> StartCall:
    """The ``start_call`` of a plain ``run_items`` function (tests, benches, faults injected per call)."""
    return lambda items, abandoned: WholeCall(run_items, items, abandoned)


def run_whole(start_call: StartCall) -> RunItems:
    """The plain ``run_items`` of a ``start_call``: each call run to its end at once."""
    return lambda items, abandoned=None: start_call(items, abandoned).advance(lambda: False)


@dataclass(frozen=True)
class OffModelThread:
    """A background preparation task that must not hold the model thread (it waits: for a file
    lock, say); ``prepare_in_background`` runs it on its own thread, in order with the others."""
    run: Callable[[], object]


@dataclass(eq=False)  # compared by identity
class JobTurn:
    """One job's place in the rotation of who leads a call: the number of the call that last
    served it. A job first queued counts as served just before the latest call: ahead of the job
    that call served, behind any job that has waited longer, so that however many jobs arrive, each
    waits for at most one call of every other (round robin). A job queueing its items in several
    goes passes the same one."""
    last_call: float = -1.0
    queued: bool = False
    # The work (``items.item_work``) of the job's items not queued yet: the job layer keeps it up
    # to date, so that the shortest-work-first rule compares whole jobs, not one call of each.
    work_after: int = 0


@dataclass(eq=False)  # compared by identity: the generated __eq__ would compare tensors
class _Pending:
    item: ChunkItem
    future: asyncio.Future
    # The futures of the same enqueue(), not their entries: an entry referring to a list of
    # entries would be a reference cycle, freed only by the cyclic collector, and a long job's
    # sampled waveforms were kept by hundreds of them until it ran.
    job: list[asyncio.Future] = field(default_factory=list)
    turn: JobTurn = field(default_factory=JobTurn)


@dataclass(eq=False)
class _Running:
    """A call in progress: running, or set aside between two of its steps."""
    batch: list[_Pending]
    call: ModelCall | None = None  # made on the model thread, at its first slice
    run_s: float = 0.0  # the model time it has had
    owed_s: float = 0.0  # its share of the model time others had while it was set aside, not yet run back

    def abandoned(self) -> bool:
        return all(e.future.done() for e in self.batch)

    def work_left(self) -> int:
        """Steps left x rows x frames, and the least work still to come of a job it serves: what
        the shortest-work-first rule compares."""
        steps = self.batch[0].item.steps if self.call is None else self.call.steps_left
        to_come = min(e.turn.work_after for e in self.batch)
        return steps * len(self.batch) * max(item_frames(e.item) for e in self.batch) + to_come


class Batcher:
    def __init__(self, start_call: StartCall, *, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 max_items: int = DEFAULT_MAX_ITEMS, max_frames: int = DEFAULT_MAX_FRAMES,
                 job_window: int = DEFAULT_JOB_WINDOW, max_calls: int = DEFAULT_MAX_CALLS,
                 executor: ThreadPoolExecutor | None = None):
        self._start_call = start_call
        self.job_window = job_window
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        self.max_frames = max_frames
        self.max_calls = max_calls
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._pending: list[_Pending] = []
        self._running: list[_Running] = []  # calls in progress; the one running is last
        # The work left of each job with no call in progress, by ``id`` of its turn, and the least
        # of them (None: there are none); the model thread reads it between steps to decide
        # whether to set the running call aside.
        self._newcomer_works: dict[int, int] = {}
        self._newcomer_work: int | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.calls: list[int] = []  # batch size of each model call, for logs and tests
        self.call_seconds: list[float] = []  # model time of each finished call (set-aside time not counted)
        self.set_aside: int = 0  # times a running call was set aside for a newcomer's, for logs and tests
        self.preparing: threading.Thread | None = None


    async def submit(self, items: list[ChunkItem]) -> list[np.ndarray]:
        """Waveforms of the items, in order, once every one has been sampled."""
        futures = self.enqueue(items)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # The job failed or was cancelled (its deadline): its other chunks are not worth a
            # model call, so they leave the queue now.
            self.withdraw(futures)
            raise

    def enqueue(self, items: list[ChunkItem], turn: JobTurn | None = None) -> list[asyncio.Future]:
        """Queue the items as one job's (``turn``: that job's, when it queues in several goes); each
        future gets its item's waveform as soon as the model call that sampled it ends (a streamed
        job uses each as it comes). A caller that stops waiting calls ``withdraw``."""
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        turn = turn if turn is not None else JobTurn()
        if not turn.queued:
            turn.last_call, turn.queued = len(self.calls) - 1.5, True
        futures = [loop.create_future() for _ in items]
        entries = [_Pending(item, future, futures, turn) for item, future in zip(items, futures)]
        self._pending.extend(entries)
        self._refresh_newcomer()
        self._wakeup.set()
        return futures

    @staticmethod
    async def sampled(future: asyncio.Future) -> np.ndarray:
        """One queued item's waveform. Awaited through the batcher, so that a job stopped at its
        deadline says it was waiting for the model ("stuck at: Batcher.sampled")."""
        return await future

    def withdraw(self, futures: list[asyncio.Future]) -> None:
        """Take the items of these futures off the queue and cancel what is not settled."""
        wanted = set(map(id, futures))
        self._withdraw([e for e in self._pending if id(e.future) in wanted])
        for future in futures:
            if not future.done():
                future.cancel()

    def _withdraw(self, entries: list[_Pending]) -> None:
        for entry in entries:
            if entry in self._pending:
                self._pending.remove(entry)
            if not entry.future.done():
                entry.future.cancel()
        self._refresh_newcomer()

    def prepare_in_background(self, tasks: list[Callable[[], object] | OffModelThread]) -> threading.Thread:
        """Run preparation tasks in order: each callable on the model thread, alone, so a job that
        arrives meanwhile waits for one task at most, never for the whole list; each
        ``OffModelThread`` on the background thread, so its waiting holds up no job."""
        def run():
            for task in tasks:
                try:
                    if isinstance(task, OffModelThread):
                        task.run()
                    else:
                        self.executor.submit(task).result()
                except Exception:  # an optimisation: a failure only costs speed later
                    log.warning("background preparation failed", exc_info=True)

        thread = threading.Thread(target=run, name="prepare", daemon=True)
        thread.start()
        self.preparing = thread
        return thread

    def _ensure_loop(self) -> None:
        # The loop belongs to the event loop that first submits (runpod runs one per worker).
        if self._task is None or self._task.done():
            for run in self._running:  # calls of an event loop that has gone (its futures with it)
                call, run.call = run.call, None
                if call is not None:
                    self.executor.submit(call.close)  # on the model thread, as every close
            self._running.clear()
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def next_batch(self, busy: set[int] = frozenset()) -> list[_Pending]:
        """The lead item and others sharing its ODE settings, within the budgets: all of them when
        they fit, else those nearest the lead in length (every row of a call is padded to its
        longest item, so a call of like lengths wastes little). The lead is the oldest item of the
        job served longest ago, and it always goes: no job waits behind a stream of more common
        ones, or behind another job's turns. ``busy``: the ``id`` of each job turn with a call in
        progress, whose items wait for it to end."""
        self._pending = [e for e in self._pending if not e.future.done()]
        waiting = [e for e in self._pending if id(e.turn) not in busy]
        if not waiting:
            return []
        lead = min(waiting, key=lambda e: e.turn.last_call)  # min() keeps the first of equals
        others = [e for e in waiting if e is not lead and e.item.batch_key == lead.item.batch_key
                  and _within_ratio(e.item.duration, lead.item.duration)]
        # nearest length first; among equals, the oldest first (sorted() keeps queue order)
        others.sort(key=lambda e: abs(e.item.duration - lead.item.duration))
        batch, longest, shortest = [lead], lead.item.duration, lead.item.duration
        for entry in others:
            if len(batch) >= self.max_items:
                break
            longest_after = max(longest, entry.item.duration)
            if longest_after * (len(batch) + 1) > self.max_frames:
                continue  # too long for this call; a shorter one further on may still fit
            if not _within_ratio(longest_after, min(shortest, entry.item.duration)):
                continue  # within the ratio of the lead, not of the rows on its other side
            batch.append(entry)
            longest, shortest = longest_after, min(shortest, entry.item.duration)
        for entry in batch:
            self._pending.remove(entry)
            entry.turn.last_call = len(self.calls)
        return batch

    # --- the loop: calls started, run in slices, set aside, finished ---------------------------
    def _busy_turns(self) -> set[int]:
        return {id(e.turn) for run in self._running for e in run.batch}

    def _refresh_newcomer(self) -> None:
        busy = self._busy_turns()
        works: dict[int, int] = {}  # by job turn: its queued items' work and what is still to come
        for e in self._pending:
            if id(e.turn) not in busy and not e.future.done():
                works[id(e.turn)] = works.get(id(e.turn), e.turn.work_after) + item_work(e.item)
        self._newcomer_works, self._newcomer_work = works, min(works.values()) if works else None

    def _should_set_aside(self, run: _Running, ran_s: float) -> bool:
        """Whether ``run``, which has run ``ran_s`` since it was last taken up, gives way to a
        newcomer's call now (read on the model thread between steps, and on the loop's)."""
        work = self._newcomer_work
        in_progress = sum(1 for other in self._running if not other.abandoned())  # a gone one is about to be freed
        return (work is not None and in_progress < self.max_calls and ran_s >= run.owed_s
                and work < run.work_left())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                if len(self._pending) < self.max_items:
                    await asyncio.sleep(self.max_wait_s)  # a lone job waits this long for company
            await self._finish_abandoned(loop)
            try:
                self._start_waiting()
            except Exception as exc:  # batching itself failed: fail what waits, never hang
                log.error("batching failed:\n%s", traceback_without_messages(exc))
                for entry in list(self._pending):
                    self._settle(entry, error=exc)
                self._pending.clear()
                self._refresh_newcomer()
                continue
            if self._running:
                await self._advance(loop, self._running[-1])

    def _start_waiting(self) -> None:
        """A call for waiting items, when none is in progress, or when the running one gives way."""
        busy = self._busy_turns()
        if self._running:
            running = self._running[-1]
            if not self._should_set_aside(running, 0.0):
                return
            # only a job with less work left than the running call's may lead the call that sets it aside
            left = running.work_left()
            busy |= {turn for turn, work in self._newcomer_works.items() if work >= left}
        batch = self.next_batch(busy)
        if batch:
            if self._running:
                self.set_aside += 1
            self._running.append(_Running(batch))
            self.calls.append(len(batch))
        self._refresh_newcomer()

    def _slice(self, run: _Running) -> list[np.ndarray] | None:
        """On the model thread: ``run`` until its end, or until it gives way to a newcomer."""
        started = time.perf_counter()
        if run.call is None:
            run.call = self._start_call([e.item for e in run.batch], run.abandoned)
        return run.call.advance(lambda: self._should_set_aside(run, time.perf_counter() - started))

    async def _advance(self, loop, run: _Running) -> None:
        """One slice of the running call. If the call fails with several items in it, each item
        is tried again alone, so a failing item fails only its own job and never the jobs it
        happened to share a call with."""
        started = time.perf_counter()
        try:
            waves = await loop.run_in_executor(self.executor, self._slice, run)
        except CallAbandoned:
            log.info("model call of %d item(s) stopped between steps: no job still waits for it", len(run.batch))
            await self._finish(loop, run)
            return
        except Exception as exc:
            await self._finish(loop, run)
            self._failed(run, exc)
            return
        finally:
            self._account(run, time.perf_counter() - started)
        if waves is None:
            return  # set aside: the newcomer's call starts next
        await self._finish(loop, run)
        self.call_seconds.append(run.run_s)
        for entry, wave in zip(run.batch, waves):
            self._settle(entry, result=wave)

    def _account(self, run: _Running, seconds: float) -> None:
        run.run_s += seconds
        run.owed_s = max(0.0, run.owed_s - seconds)
        for other in self._running:
            if other is not run:
                other.owed_s += OWED_SHARE * seconds

    async def _finish_abandoned(self, loop) -> None:
        """Free every call in progress whose jobs have all gone (failed, or their deadline), set
        aside or not: a set-aside one would otherwise hold its tensors, and a place among
        ``max_calls``, until the calls above it had ended."""
        while (gone := next((run for run in self._running if run.abandoned()), None)) is not None:
            log.info("model call of %d item(s) dropped: no job still waits for it", len(gone.batch))
            await self._finish(loop, gone)

    async def _finish(self, loop, run: _Running) -> None:
        """Take ``run`` out of the calls in progress and close its call on the model thread (the
        eager DiT's step cache is that thread's own)."""
        if run in self._running:
            self._running.remove(run)
        # The call refers back to the run (its ``abandoned``): a reference cycle, freed only by the
        # cyclic collector, would keep the call's tensors and its jobs' waveforms alive.
        closing = [run.call] if run.call is not None else []
        run.call = None
        self._refresh_newcomer()
        if closing:
            try:
                # popped on the model thread, so nothing (not the executor's work item, which
                # outlives the await for a moment) still holds the call once it is closed
                await loop.run_in_executor(self.executor, lambda: closing.pop().close())
            except Exception:  # closing frees memory; a failure there must not stop the loop
                log.warning("closing a model call failed", exc_info=True)

    def _failed(self, run: _Running, exc: Exception) -> None:
        if len(run.batch) == 1:
            log.warning("model call of 1 item failed:\n%s", traceback_without_messages(exc))
            self._settle(run.batch[0], error=exc)
            return
        log.warning("model call of %d items failed (%s); retrying each alone", len(run.batch), type(exc).__name__)
        for entry in reversed(run.batch):  # the first item runs first
            if not entry.future.done():
                self._running.append(_Running([entry]))
                self.calls.append(1)
        self._refresh_newcomer()

    def _settle(self, entry: _Pending, result=None, error: BaseException | None = None) -> None:
        if entry.future.done():  # its job already gave up (failed elsewhere, or its deadline)
            return
        if error is None:
            entry.future.set_result(result)
            return
        # The job has failed: its other chunks are not worth a model call. Each gets the same
        # error, not a cancellation: a job awaiting an earlier chunk (a later one can run first,
        # as another job's company) would take that as its own cancellation, and end unanswered.
        for future in entry.job:
            if not future.done():
                future.set_exception(error)
                future.exception()  # the job hears it from the one it awaits: no "never retrieved" log
        self.withdraw(entry.job)


def _within_ratio(a: int, b: int) -> bool:
    """Whether items of ``a`` and ``b`` frames may share a call (``MAX_LENGTH_RATIO``)."""
    return max(a, b) <= MAX_LENGTH_RATIO * max(1, min(a, b))
