"""bench/bench.py runs end to end on the CPU with a shrunken model (its GPU figures come from the
GPU runs recorded in bench/RESULTS.md), and its agreement figures hold."""
import json

from bench.bench import main


def test_bench_smoke(tmp_path):
    assert main(["--out", str(tmp_path), "--tiny"]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["agreement"]["nfe4_wave_rel_l2"] < 1e-4
    assert res["agreement"]["batched_vs_alone_max_rel_l2"] < 1e-4
    assert "ready" in res["cold_start_worker"] and "first_job" in res["cold_start_stock"]
    assert res["inflight_2"]["worker_model_calls"] == [2]
