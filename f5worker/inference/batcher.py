"""Groups chunk items from concurrent jobs into shared model calls on one GPU thread.

Why this module exists: a serverless worker is billed by the GPU-second, and a DiT step on 2 items
costs little more than on 1. Jobs that arrive together (runpod's ``concurrency_modifier`` lets
several run on one worker) submit their chunk items here; a single loop takes whatever is pending,
waits at most ``max_wait_s`` for company, and runs one job's oldest waiting item together with
others that share its ODE settings, nearest its length first, within an item and a frame budget
and at most ``MAX_LENGTH_RATIO`` apart in length. The model is only ever driven from one thread.

Fairness: jobs take turns leading a call (the one served longest ago leads; a new job has never
been served), and a job queues only ``job_window`` items at a time (``jobs.workflows`` keeps the
rest), so a short job that arrives while a chapter-length one runs waits for one model call of it,
not for its whole text.

``run_items(items, abandoned)`` samples a call's items; ``abandoned()`` is true once every job of
the call has gone (failed, or stopped at its deadline), and a ``run_items`` that asks it between
ODE steps stops there (``f5worker.errors.CallAbandoned``), so a stopped job's running call does
not hold up the jobs queued behind it for more than one step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from f5worker.errors import CallAbandoned
from f5worker.inference.items import ChunkItem

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


@dataclass(eq=False)  # compared by identity: the generated __eq__ would compare tensors
class _Pending:
    item: ChunkItem
    future: asyncio.Future
    # The futures of the same enqueue(), not their entries: an entry referring to a list of
    # entries would be a reference cycle, freed only by the cyclic collector, and a long job's
    # sampled waveforms were kept by hundreds of them until it ran.
    job: list[asyncio.Future] = field(default_factory=list)
    turn: JobTurn = field(default_factory=JobTurn)


class Batcher:
    def __init__(self, run_items: Callable[[list[ChunkItem], Callable[[], bool]], list[np.ndarray]], *,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, max_items: int = DEFAULT_MAX_ITEMS,
                 max_frames: int = DEFAULT_MAX_FRAMES, job_window: int = DEFAULT_JOB_WINDOW,
                 executor: ThreadPoolExecutor | None = None):
        self._run_items = run_items
        self.job_window = job_window
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        self.max_frames = max_frames
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.calls: list[int] = []  # batch size of each model call, for logs and tests
        self.call_seconds: list[float] = []  # wall time of each model call, for the bench
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
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def next_batch(self) -> list[_Pending]:
        """The lead item and others sharing its ODE settings, within the budgets: all of them when
        they fit, else those nearest the lead in length (every row of a call is padded to its
        longest item, so a call of like lengths wastes little). The lead is the oldest item of the
        job served longest ago, and it always goes: no job waits behind a stream of more common
        ones, or behind another job's turns."""
        self._pending = [e for e in self._pending if not e.future.done()]
        if not self._pending:
            return []
        lead = min(self._pending, key=lambda e: e.turn.last_call)  # min() keeps the first of equals
        others = [e for e in self._pending if e is not lead and e.item.batch_key == lead.item.batch_key
                  and _within_ratio(e.item.duration, lead.item.duration)]
        # nearest length first; among equals, the oldest first (sorted() keeps queue order)
        others.sort(key=lambda e: abs(e.item.duration - lead.item.duration))
        batch, longest = [lead], lead.item.duration
        for entry in others:
            if len(batch) >= self.max_items:
                break
            longest_after = max(longest, entry.item.duration)
            if longest_after * (len(batch) + 1) > self.max_frames:
                continue  # too long for this call; a shorter one further on may still fit
            batch.append(entry)
            longest = longest_after
        for entry in batch:
            self._pending.remove(entry)
            entry.turn.last_call = len(self.calls)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            if len(self._pending) < self.max_items:
                await asyncio.sleep(self.max_wait_s)  # a lone job waits this long for company
            while self._pending:
                try:
                    batch = self.next_batch()
                except Exception as exc:  # batching itself failed: fail what waits, never hang
                    log.exception("batching failed")
                    for entry in list(self._pending):
                        self._settle(entry, error=exc)
                    self._pending.clear()
                    continue
                if batch:
                    await self._run(loop, batch)

    async def _run(self, loop, batch: list[_Pending]) -> None:
        """One model call; if it fails with several items in it, each item is retried alone, so a
        failing item fails only its own job and never the jobs it happened to share a call with."""
        started = time.perf_counter()
        self.calls.append(len(batch))
        try:
            waves = await loop.run_in_executor(self.executor, self._run_items, [e.item for e in batch],
                                               lambda: all(e.future.done() for e in batch))
        except CallAbandoned:  # every job it served is gone (its deadline, a failure): nothing to settle
            log.info("model call of %d item(s) stopped between steps: no job still waits for it", len(batch))
            return
        except Exception as exc:
            if len(batch) == 1:
                log.warning("model call of 1 item failed: %s", type(exc).__name__, exc_info=True)
                self._settle(batch[0], error=exc)
                return
            log.warning("model call of %d items failed (%s); retrying each alone", len(batch),
                        type(exc).__name__)
            for entry in batch:
                if not entry.future.done():
                    await self._run(loop, [entry])
            return
        self.call_seconds.append(time.perf_counter() - started)
        for entry, wave in zip(batch, waves):
            self._settle(entry, result=wave)

    def _settle(self, entry: _Pending, result=None, error: BaseException | None = None) -> None:
        if entry.future.done():  # its job already gave up (failed elsewhere, or its deadline)
            return
        if error is None:
            entry.future.set_result(result)
            return
        entry.future.set_exception(error)
        # The job has failed: its other chunks are not worth a model call.
        self.withdraw([f for f in entry.job if f is not entry.future])


def _within_ratio(a: int, b: int) -> bool:
    """Whether items of ``a`` and ``b`` frames may share a call (``MAX_LENGTH_RATIO``)."""
    return max(a, b) <= MAX_LENGTH_RATIO * max(1, min(a, b))
