"""Giving freed memory back to the operating system between jobs.

Why this module exists: a job allocates and frees tens of megabytes (decoded audio, mel and
waveform arrays, WAV bytes) from several threads. glibc's malloc keeps what those threads free in
per-thread arenas instead of returning it, so a long-running worker's resident memory grew by about
15 % over a thousand jobs although Python held no more objects (tracemalloc: +0.5 MB), and a
container memory limit would eventually kill it. ``malloc_trim(0)`` returns the free pages (well
under a millisecond here); it is called off the event loop whenever the worker falls idle, and every
few jobs under constant load. Elsewhere than glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

TRIM_EVERY_JOBS = 4


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 * 1024


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


def _load_malloc_trim():
    """glibc's malloc_trim, after fixing the size from which allocations get their own mapping:
    glibc otherwise raises that size as large blocks are freed (up to 32 MiB), after which audio
    and tensor buffers land in the heap and fragment it; a mapping goes back whole when freed."""
    libc = _glibc()
    if libc is None:
        return None
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return libc.malloc_trim


class HeapTrimmer:
    """Counts finished jobs; ``after_job`` trims the heap when no other job is in flight, and every
    ``every`` jobs anyway (call it off the event loop)."""

    def __init__(self, every: int = TRIM_EVERY_JOBS):
        self.every = every
        self.trims = 0
        self._malloc_trim = _load_malloc_trim()
        self._jobs = 0
        self._lock = threading.Lock()

    def after_job(self, others_in_flight: int = 0) -> bool:
        """True when this call trimmed."""
        with self._lock:
            self._jobs += 1
            due = self._malloc_trim is not None and (others_in_flight == 0 or self._jobs % self.every == 0)
        if due:
            self._malloc_trim(0)
            self.trims += 1
        return due
