"""Progress reports sent one at a time per job, so RunPod never gets an older one after a newer.

Why this module exists: runpod's ``progress_update`` posts each report from a thread of its own, so
a job's reports raced each other to RunPod (a 6-chunk job's arrived as 3, 4, 1, 2, 5, 6). Here each
job gets one sender thread that posts its reports in order, with runpod's own synchronous sender
(the function each of ``progress_update``'s threads runs); a report made while the previous one is
still being posted replaces any report still waiting, so the newest is sent next and a slow post
never builds a queue. Once a job has ended (``finish``), none of its reports is posted after its
result (RunPod would get an ``IN_PROGRESS`` for a job it was already told is done): one still
waiting is dropped, the one being posted waited for, and any made later ignored.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Protocol

log = logging.getLogger(__name__)

FINISH_WAIT_S = 2.0  # how long a job's answer waits for its report being posted
FINISHED_KEPT = 4096  # ids of ended jobs remembered, so a late report of one is ignored


class ProgressReports(Protocol):
    """Where a job's progress reports go: ``report`` as the job goes on, ``finish`` once it has
    ended (before its result is returned); ``job`` is the runpod job dict, with its ``id``."""

    def report(self, job: dict, update: dict) -> None: ...

    def finish(self, job: dict) -> None: ...


class OrderedProgress:
    """``report(job, update)``: queue ``update`` for ``job`` (a runpod job dict with an ``id``);
    ``send(job, update)`` posts one report and returns once it is sent."""

    def __init__(self, send: Callable[[dict, dict], None]):
        self._send = send
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[dict, dict]] = {}  # job id -> (job, its newest unsent report)
        self._senders: dict[str, threading.Thread] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # the latest ended jobs' ids

    def report(self, job: dict, update: dict) -> None:
        job_id = str(job.get("id"))
        with self._lock:
            if job_id in self._finished:
                return
            self._waiting[job_id] = (job, update)
            if job_id in self._senders:
                return
            thread = threading.Thread(target=self._drain, args=(job_id,), name=f"progress-{job_id}", daemon=True)
            self._senders[job_id] = thread
        thread.start()

    def _drain(self, job_id: str) -> None:
        while True:
            with self._lock:
                waiting = self._waiting.pop(job_id, None)
                if waiting is None:
                    del self._senders[job_id]
                    return
            try:
                self._send(*waiting)
            except Exception:  # noqa: BLE001 - a lost progress report never fails the job
                log.warning("a progress report of job %s could not be sent", job_id, exc_info=True)

    def finish(self, job: dict, timeout: float = FINISH_WAIT_S) -> None:
        """``job`` has ended: a report still waiting is dropped, any made later ignored, and the
        one being posted is waited for, up to ``timeout`` seconds, so that none reaches RunPod
        after the job's result."""
        job_id = str(job.get("id"))
        with self._lock:
            self._finished[job_id] = None
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
            self._waiting.pop(job_id, None)
            sender = self._senders.get(job_id)
        if sender is None:
            return
        sender.join(timeout)
        if sender.is_alive():
            log.warning("a progress report of job %s was still being sent after %g s", job_id, timeout)

    def idle(self) -> bool:
        """True when no report is waiting or being sent (for tests and shutdown)."""
        with self._lock:
            return not self._senders
