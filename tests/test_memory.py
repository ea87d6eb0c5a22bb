"""The heap is trimmed every few jobs (glibc keeps what worker threads free otherwise)."""
from __future__ import annotations

import ctypes.util

import pytest

from f5worker.jobs.memory import HeapTrimmer


def test_trims_every_n_jobs():
    trimmer = HeapTrimmer(every=3)
    if trimmer._malloc_trim is None:
        pytest.skip("not glibc")
    assert [trimmer.after_job(others_in_flight=1) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert trimmer.trims == 2


def test_malloc_trim_is_found_on_this_c_library():
    """The symbol is really there on this machine's C library (the soak's memory figure depends on it)."""
    assert ctypes.util.find_library("c")
    assert HeapTrimmer()._malloc_trim is not None


def test_an_idle_worker_trims_at_once():
    trimmer = HeapTrimmer(every=100)
    if trimmer._malloc_trim is None:
        pytest.skip("not glibc")
    assert trimmer.after_job(others_in_flight=2) is False
    assert trimmer.after_job(others_in_flight=0) is True
