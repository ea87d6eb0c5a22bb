"""bench/bench.py runs end to end on the CPU with a shrunken model and writes every figure the GPU
runs report (their values on the CPU are not GPU figures: bench/RESULTS.md has those); the
worker's output, unfused and after the switch to the fused step, agrees with stock's."""
import json

import pytest

from bench.bench import main
from f5worker.settings import CACHE_ENV_SUBDIRS

COLD_FIELDS = ("to_ready", "import_torch", "cuda_init", "first_job", "second_job", "job_after_preparation",
               "first_job_ratio", "peak_reserved_mib")
WORKER_COLD_FIELDS = ("worker_phases", "fused_switched", "fused_switch_after_ready", "fused_compile_and_check_s",
                      "preparation_done_after_ready", "inflight_model_calls")
PEAK_FIELDS = ("ready", "one_job", "inflight_equal", "inflight_mixed")


def test_bench_smoke(tmp_path, monkeypatch):
    for name in CACHE_ENV_SUBDIRS:  # the bench points the caches at its model root; restored after
        monkeypatch.delenv(name, raising=False)
    assert main(["--out", str(tmp_path), "--tiny"]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    limit = res["agreement_limit"]
    assert limit == 1e-4  # fp32 on the CPU
    for path in ("unfused", "fused"):  # the switch happens on the CPU too (kernels' torch references)
        figures = res["agreement"][path]
        assert set(figures) == {"nfe4_wave_rel_l2", "batched_vs_alone_max_rel_l2"}
        assert max(figures.values()) < limit
    assert res["switch_in_bench"]["switched"] is True and res["switch_in_bench"]["runner_fused"] is True

    cold = res["cold_start"]
    for name in ("worker_empty_cache", "worker_warm_cache", "stock"):
        assert "error" not in cold[name], cold[name]
        assert all(field in cold[name] for field in COLD_FIELDS), cold[name]
        assert set(cold[name]["peak_reserved_mib"]) == set(PEAK_FIELDS)
    for name in ("worker_empty_cache", "worker_warm_cache"):
        assert all(field in cold[name] for field in WORKER_COLD_FIELDS), cold[name]
        assert cold[name]["fused_switched"] is False  # no background switch without a GPU
    assert "memory" in res

    for label in ("stock", "worker_unfused", "worker_fused"):
        assert res["rtf"][label]["nfe4"]["rtf"] > 0
    for kind in ("equal", "mixed"):
        for label in ("stock", "worker_unfused", "worker_fused"):
            figure = res["throughput"][kind][label]
            assert figure["jobs"] == res["inflight_jobs"] and figure["audio_s_per_gpu_s"] > 0
    mixed_bytes = res["mixed_texts_bytes"]  # 2 to 20 s of audio
    assert mixed_bytes == sorted(mixed_bytes) and mixed_bytes[0] < mixed_bytes[-1] / 5
    assert res["time_to_first_audio"]["stock_s"] > 0 and res["time_to_first_audio"]["worker_s"] > 0
    assert (tmp_path / "summary.md").read_text().startswith("device: cpu")


def test_worker_jobs_smoke(tmp_path):
    """bench/worker_jobs.py on the CPU with tiny models: jobs through the real handler at ready and
    after the background tasks, each one recorded; the device run uses it at full size."""
    import subprocess
    import sys

    from tests.processes import REPO

    out = tmp_path / "jobs.json"
    done = subprocess.run([sys.executable, "bench/worker_jobs.py", "--tiny", "--jobs", "2", "--chapter", "800",
                           "--models", str(tmp_path / "models"), "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    jobs = report["jobs_at_ready"] + report["jobs_after_background"]
    assert len(jobs) == 4 and all(job["ok"] and job["duration"] > 0 for job in jobs) and report["failed"] == []
    assert report["end"]["level"] in ("fused", "graphed", "eager")
    chapter = report["chapter"]
    assert chapter["ok"] and 700 < chapter["characters"] <= 800 and chapter["chunks"] >= 2
    # from the unrounded seconds; the report's are rounded to the millisecond
    assert chapter["characters_in_600_s"] == pytest.approx(chapter["characters"] / chapter["seconds"] * 600, rel=1e-3)


def test_http_latency_smoke(tmp_path):
    """bench/http_latency.py end to end on the tiny models: both faces, each figure in its order."""
    from bench import http_latency

    out = tmp_path / "http.json"
    assert http_latency.main(["--out", str(out), "--runs", "1", "--nfe", "2"]) == 0
    res = json.loads(out.read_text())
    assert 0 < res["queue"]["queue_first_audio_s"] <= res["queue"]["queue_result_s"]
    for fmt in ("pcm", "mp3"):
        run = res[f"{fmt}_runs"][0]
        assert 0 < run["first_call_end_s"] < run["ttfb_s"] <= run["ttlb_s"] and run["bytes"] > 0
        assert run["overhead_ms"] == (run["ttfb_s"] - run["first_call_end_s"]) * 1000


def test_alignment_bench_smoke(tmp_path):
    """bench/alignment.py times the worker's own align_words (a shrunken model here)."""
    from bench.alignment import main as alignment_main

    out = tmp_path / "alignment.json"
    assert alignment_main(["--out", str(out), "--tiny", "--chunks", "2", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["text_tokens"] == 100 and len(res["chunk_s"]) == 2
    assert res["seconds_per_audio_minute"] == pytest.approx(res["median_chunk_s"] * 60 / res["chunk_audio_s"], abs=1e-3)


def test_set_aside_bench_smoke(tmp_path):
    """bench/set_aside.py times two integrations alternating against each run whole (a shrunken
    model, eager steps on the CPU: the figures are the GPU run's to give)."""
    from bench.set_aside import STEPS, main as set_aside_main

    out = tmp_path / "set_aside.json"
    assert set_aside_main(["--out", str(out), "--tiny", "--frames", "32", "--repeats", "1", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["hand_overs"] == 2 * STEPS - 1 and res["alternating_s"] > 0
    assert res["step_ms"] == pytest.approx(res["whole_s"] / (2 * STEPS) * 1000, abs=1e-2)
    assert res["set_aside_ms"] == pytest.approx((res["alternating_s"] - res["whole_s"]) / res["hand_overs"] * 1000,
                                                abs=1e-2)
