"""Awaiting work that runs on a thread, which a cancellation cannot stop.

Why this module exists: when a job is cancelled (its deadline, a shutdown, an HTTP client gone)
while it awaits a thread, asyncio ends the await at once but the thread runs on. A job that then
unwinds removes temp files the thread still writes, or releases a lock (one model load at a time)
while its load goes on, so a second load of the same model starts beside it. ``outlast`` waits for
the thread's end either way and only then lets the cancellation through.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def outlast(future: asyncio.Future):
    """``future``'s result; if the caller is cancelled meanwhile, the cancellation is raised only
    once ``future`` is done (however often it is cancelled while it waits), and a failure of the
    work no one will read now is logged."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                continue
        if not future.cancelled() and (err := future.exception()) is not None:
            log.warning("work its cancelled job waited out failed: %s", type(err).__name__)
        raise
