"""The short soak in every test run: mixed jobs through runpod's local API server (bench/soak.py).

Why this test exists: a worker that passes each job alone can still leak files or memory over many
jobs. CI runs a short soak (a few hundred jobs take seconds on the tiny models); the full 1,000-job
soak is ``python bench/soak.py --jobs 1000 --record``, whose last figures are in tests/RELIABILITY.md.
"""
from __future__ import annotations

import pytest

from bench.soak import MAX_GROWTH_PERCENT, report, run_soak
from f5worker.settings import ENV_ASR_MODEL
from tests.reliability_report import write_section

pytestmark = pytest.mark.usefixtures("loopback_only")  # the server is a subprocess; this guards the client side

JOBS = 300  # 150 warm-up jobs, then 150 measured (bench/soak.py's run_soak)


def test_short_soak_through_the_local_api_server(tiny_models, tiny_whisper, tmp_path):
    figures = run_soak(JOBS, tmp_path, {**tiny_models, ENV_ASR_MODEL: str(tiny_whisper)})
    write_section("soak-ci", report(figures, "pytest tests/test_reliability_soak.py",
                                    f"Soak in CI: {JOBS} jobs through the local API server"))
    assert figures["server_alive_at_end"]
    assert figures["unintended_failures"] == 0, figures["failure_examples"]
    assert figures["files_left"] == 0, figures["files_left_examples"]
    assert figures["rss_growth_percent"] < MAX_GROWTH_PERCENT, figures
