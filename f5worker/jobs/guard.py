"""The deadline of each job, and what SIGTERM does to the jobs in flight.

Why this module exists: a job must end on time and a worker must stop promptly even when a call
the job made hangs in a thread, which Python cannot interrupt. The handler (``f5worker.service``)
runs every workflow through ``JobGuard.run``:

* Deadline. A job still running after ``F5_JOB_TIMEOUT_SECONDS`` gets "The job did not finish
  within N s (stuck at: <what it was waiting on>)." Its workflow is cancelled, which removes its
  temp files. A call already running in a thread cannot be stopped (Python has no way to); the
  caller is answered at once, the call ends on its own timeouts (storage and download timeouts
  bound every such call) and the job's files are removed after it. A job whose final write (its
  output, or the uploaded voice) has begun is waited for instead, so a caller never gets an error
  for a change that was made; a multipart upload (a long job's output) is asked to stop before
  its next part and is aborted, so that wait is one storage call, not one per part.
* Shutdown. On SIGTERM runpod stops taking jobs and waits for the ones in flight, and Python then
  joins every thread, so one storage call that hangs held the exit for minutes. Here jobs in flight
  get ``SHUTDOWN_GRACE_S`` to finish, then are answered with a sentence (one whose final write has
  begun is waited for ``SHUTDOWN_WRITE_WAIT_S`` more, and answered as it ended); if the process is still
  alive ``EXIT_AFTER_S`` later (a thread stuck in I/O, or one of runpod's long polls), the temp
  files of those jobs are removed again, the multipart uploads still open are aborted (as they
  were when the jobs were answered: no part is left stored), runpod's heartbeat child is stopped
  and the process ends
  with ``os._exit`` (the one way past a thread blocked in a system call). runpod
  (``JobScaler``) and uvicorn (``--rp_serve_api``) install their own SIGTERM handlers once they
  start, after ``serve`` has run, so ours is put in front of theirs from the handler (which runs on
  the main thread's event loop) and calls theirs in turn.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable

from f5worker.errors import WorkerError, WriteStopped
from f5worker.jobs.tempfiles import job_leftovers

log = logging.getLogger(__name__)

SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Jobs whose final write has begun (``jobs.workflows.Worker._commit``), each with the event that
# asks a write of several calls (a multipart upload) to stop before its next and undo what it sent;
# a job's entry leaves with its task.
COMMITTING: weakref.WeakKeyDictionary[asyncio.Task, threading.Event] = weakref.WeakKeyDictionary()

SHUTDOWN_GRACE_S = 3.0  # after SIGTERM, jobs in flight get this long to finish
EXIT_AFTER_S = 5.0  # then answers go out; a process still alive this much later ends itself
CANCEL_SETTLE_S = 0.25  # a stopped job not blocked in a thread unwinds within this
EARLIER_ATTEMPT_POLL_S = 0.05  # how often a job sent again checks whether its earlier attempt has ended
ON_STOP_WAIT_S = 2.0  # how long the exit waits for ``on_stop`` (its calls are storage calls)
# At a shutdown a job whose final write has begun is waited for this long before it is answered,
# which leaves its answer time to go out before the process ends (EXIT_AFTER_S after the answers).
SHUTDOWN_WRITE_WAIT_SHARE = 0.6  # of the exit bound: 3 s of 5, leaving 2 s for the answer to go out
SHUTDOWN_WRITE_WAIT_S = EXIT_AFTER_S * SHUTDOWN_WRITE_WAIT_SHARE


class JobStopped(WorkerError):
    """The job ran past its deadline, or the worker is shutting down (``shutdown``: sent again, it
    may run on another worker; a deadline would stop it again)."""

    def __init__(self, message: str, *, shutdown: bool = False):
        super().__init__(message)
        self.shutdown = shutdown


def _callable_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__qualname__", type(fn).__name__)


_SLEEP_CODE = asyncio.sleep.__code__


def stuck_at(task: asyncio.Task) -> str:
    """What a job's workflow is waiting on: the innermost coroutine it awaits or, for a call handed
    to a thread (``asyncio.to_thread``, ``run_in_executor``), the function that thread runs."""
    coro, where = task.get_coro(), "start"
    while getattr(coro, "cr_frame", None) is not None:
        frame = coro.cr_frame
        if frame.f_code is _SLEEP_CODE:  # a poll: the frame above it says what it waits for
            break
        where = frame.f_code.co_qualname
        handed = frame.f_locals.get("func") or frame.f_locals.get("fn")
        if callable(handed):
            where = _callable_name(handed)
            if not inspect.iscoroutinefunction(handed):  # a thread runs it; below, frames only await it
                return where
        awaited = frame.f_locals.get("future")  # jobs.threads.outlast: a task it waits out
        coro = awaited.get_coro() if isinstance(awaited, asyncio.Task) else coro.cr_await
    return where


def run_bounded(fn: Callable[[], None], seconds: float) -> None:
    """``fn()`` in a thread of its own, waited for at most ``seconds``: a shutdown step that must
    not hold up the exit when the endpoint it calls hangs. Its faults are logged, not raised."""
    def guarded():
        try:
            fn()
        except Exception as err:
            log.warning("shutdown: %s failed: %s", _callable_name(fn), type(err).__name__)

    thread = threading.Thread(target=guarded, name="shutdown-step", daemon=True)
    thread.start()
    thread.join(seconds)


def safe_job_id(job_id: object) -> str:
    """Job ids name temp files and storage keys; anything unusual is replaced by a fresh id."""
    return job_id if isinstance(job_id, str) and SAFE_JOB_ID.fullmatch(job_id) else uuid.uuid4().hex


async def wait_for_earlier_attempt(earlier: threading.Event | None, workflow):
    """``workflow`` run once the earlier attempt of its job id (``earlier`` set) has ended. A job
    sent again keeps its id (a RunPod retry), and so its temp files' names: an attempt answered at
    its deadline unwinds only when its thread ends, and its cleanup removed the files the retry
    was writing. The wait counts against the retry's own deadline."""
    try:
        while earlier is not None and not earlier.is_set():
            await asyncio.sleep(EARLIER_ATTEMPT_POLL_S)
    except BaseException:
        workflow.close()  # never started: no "never awaited" warning
        raise
    return await workflow


class JobGuard:
    """The deadline of each job, and what SIGTERM does to the jobs in flight (module docstring)."""

    def __init__(self, timeout_s: float, tmp_dir: Path, grace_s: float = SHUTDOWN_GRACE_S,
                 exit_after_s: float = EXIT_AFTER_S,
                 committing: Callable[[asyncio.Task], threading.Event | None] = lambda task: None,
                 on_stop: Callable[[], None] = lambda: None, write_wait_s: float | None = None):
        self.timeout_s = timeout_s
        # The stop event of a job whose final write has begun (None: it has not). Such a job is
        # waited for past its deadline, so it never answers an error over a change it made: a
        # write of one call finishes within the storage timeouts, and one of several (a multipart
        # upload) is asked to stop before its next call and undo itself, so the wait is one call.
        self.committing = committing
        # at a shutdown, how long such a write is waited for: a share of the exit bound in use
        self.write_wait_s = exit_after_s * SHUTDOWN_WRITE_WAIT_SHARE if write_wait_s is None else write_wait_s
        # Called as the worker stops taking work (at the end of the grace, and again just before
        # the process ends): the storage's abort of the multipart uploads still open.
        self.on_stop = on_stop
        self.tmp_dir = tmp_dir
        self.grace_s = grace_s
        self.exit_after_s = exit_after_s
        self.stopping = False
        self._lock = threading.Lock()
        self._in_flight: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stopped: set[str] = set()  # jobs whose abandoned threads may still write their files
        # each job id's latest attempt: set once its workflow has ended (and removed its files)
        self._attempts: dict[str, threading.Event] = {}
        self._previous = None

    async def run(self, job_id: str, workflow) -> dict:
        """``workflow`` (a coroutine) to its result, unless the deadline or a shutdown stops it."""
        loop = asyncio.get_running_loop()
        ended = threading.Event()
        with self._lock:
            earlier, self._attempts[job_id] = self._attempts.get(job_id), ended
        work = loop.create_task(wait_for_earlier_attempt(earlier, workflow))
        work.add_done_callback(functools.partial(self._attempt_ended, job_id, ended))
        stop = loop.create_future()
        with self._lock:
            self._in_flight[job_id] = (loop, stop)
        try:
            await asyncio.wait({work, stop}, timeout=self.timeout_s or None, return_when=asyncio.FIRST_COMPLETED)
            await self._see_write_through(job_id, work, stop)
            if work.done():
                return self._ended(work, shutdown=stop.done())
            where = stuck_at(work)
            self._stopped.add(job_id)
            if stop.done() and self.committing(work) is not None:
                raise JobStopped(f"The worker shut down while the job's result was being stored (stuck at: {where}); "
                                 "it may have been stored all the same, so send it again to be sure.", shutdown=True)
            if stop.done():
                raise JobStopped(f"The worker shut down before the job finished (stuck at: {where}); "
                                 "send it again.", shutdown=True)
            raise JobStopped(f"The job did not finish within {self.timeout_s:g} s (stuck at: {where}).")
        finally:
            with self._lock:
                self._in_flight.pop(job_id, None)
            if not work.done():
                # A job blocked in a thread unwinds (and removes its temp files) only once that
                # thread ends (jobs.Worker._off_loop); the caller is answered now, and whatever the
                # thread has written so far is swept here. A job cancelled (runpod's cancel or
                # execution timeout, an HTTP client gone) or stopped while writing its output has
                # its multipart upload stop before the next part and aborted, as at the deadline.
                # Its staged files are not swept: its thread may still be about to read one (the
                # subtitle file, after the audio), and the workflow removes them once it ends.
                if (write_stop := self.committing(work)) is not None:
                    write_stop.set()
                work.cancel()
                await asyncio.wait({work}, timeout=CANCEL_SETTLE_S)
                if write_stop is None:
                    self.sweep([job_id])

    def _attempt_ended(self, job_id: str, ended: threading.Event, _work: asyncio.Task) -> None:
        ended.set()
        with self._lock:
            if self._attempts.get(job_id) is ended:
                del self._attempts[job_id]

    async def _see_write_through(self, job_id: str, work: asyncio.Task, stop: asyncio.Future) -> None:
        """A job stopped (its deadline, a shutdown) after its final write has begun is waited for, so
        that its answer says what was stored: a multipart upload is asked to stop before its next
        part and is aborted; a write of one call finishes within the storage timeouts, which bound
        the wait at a deadline, and ``write_wait_s`` bounds it at a shutdown."""
        if work.done() or (write_stop := self.committing(work)) is None:
            return
        write_stop.set()
        if not stop.done():
            log.warning("job %s passed its deadline while writing its result; waiting for the write "
                        "(a multipart upload stops before its next part and is aborted)", job_id)
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            log.warning("job %s: the worker is shutting down while it writes its result; waiting up to %g s "
                        "for the write", job_id, self.write_wait_s)
            await asyncio.wait({work}, timeout=self.write_wait_s)

    def _ended(self, work: asyncio.Task, *, shutdown: bool) -> dict:
        """A finished workflow's result; a multipart upload it stopped, as the sentence of what was left."""
        if work.cancelled() or not isinstance(stopped := work.exception(), WriteStopped):
            return work.result()
        undone = ("the upload was aborted, so nothing was stored" if stopped.undone else
                  "the upload was stopped, but aborting it failed, so its parts stay stored until "
                  "the bucket's rule for incomplete multipart uploads removes them")
        if shutdown:
            raise JobStopped(f"The worker shut down while the job's output was being uploaded, and {undone}; "
                             "send it again.", shutdown=True) from stopped
        raise JobStopped(f"The job did not finish within {self.timeout_s:g} s: its output was "
                         f"still being uploaded, and {undone}.") from stopped

    def stop_jobs(self) -> None:
        """Answer the jobs in flight now, as at the end of a shutdown's grace (any thread)."""
        with self._lock:
            in_flight = list(self._in_flight.values())
        for loop, stop in in_flight:
            try:
                loop.call_soon_threadsafe(lambda f=stop: f.done() or f.set_result(None))
            except RuntimeError:  # its loop has closed: the job is over
                pass

    def watch_sigterm(self) -> None:
        """Put ``on_sigterm`` in front of the SIGTERM handler runpod or uvicorn installed. Only a
        Python handler is chained: with the default action the process ends at once anyway."""
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if current == self.on_sigterm or not callable(current):
            return
        self._previous = current
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum, frame) -> None:
        if not self.stopping:
            self.stopping = True
            log.warning("SIGTERM: %d job(s) in flight get %g s to finish; the process ends at most %g s later",
                        len(self._in_flight), self.grace_s, self.exit_after_s)
            threading.Thread(target=self._wind_down, name="shutdown", daemon=True).start()
        if callable(self._previous):
            self._previous(signum, frame)

    def _wind_down(self) -> None:
        time.sleep(self.grace_s)
        self.stop_jobs()
        # The jobs are answered "send it again": their uploads stop before their next part, aborted.
        run_bounded(self.on_stop, ON_STOP_WAIT_S)
        time.sleep(self.exit_after_s)
        busy = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive())
        log.warning("shutdown: still running after %g s (threads: %s); exiting now",
                    self.grace_s + self.exit_after_s, ", ".join(busy))
        self.sweep(set(self._stopped) | set(self._in_flight))
        run_bounded(self.on_stop, ON_STOP_WAIT_S)  # an upload whose part was in flight at the first
        for child in multiprocessing.active_children():  # runpod's heartbeat process
            child.terminate()
        for handler in logging.getLogger().handlers:
            handler.flush()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)

    def sweep(self, job_ids) -> None:
        """Remove the jobs' temp files (``jobs.tempfiles``) and the hidden partial files beside
        them, which an abandoned thread may still hold open (its final rename then fails)."""
        for job_id in job_ids:
            for path in list(job_leftovers(self.tmp_dir, job_id)):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    log.warning("could not remove %s", path)
