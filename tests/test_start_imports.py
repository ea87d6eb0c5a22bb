"""The worker's start path and an English job import none of the packages that made cold starts slow.

x_transformers (with einx and torch._dynamo), torchdiffeq (with scipy), vocos (with encodec),
pypinyin and rjieba/jieba (with their dictionaries) and transformers cost seconds of a cold start
before a weight moved. The worker runs its own model code; this runs the real entry point in a
fresh interpreter (``runpod-handler.py --test_input``: start-up, model load, warm-up, one English
job) and reads ``sys.modules`` as the process exits. A Chinese job then loads the Chinese text tools
on first need, and nothing else from the list.
"""
from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import REPO
from tests.processes import child_env

# Never imported on the start path or by an English job.
FORBIDDEN = ("x_transformers", "einx", "einops", "torchdiffeq", "scipy", "vocos", "encodec", "pypinyin",
             "jieba", "rjieba", "transformers", "torch._dynamo", "torchaudio", "librosa", "f5_tts.model")
CHINESE_TOOLS = {"pypinyin", "rjieba"}

# Runs the entry point as `python runpod-handler.py` would, and writes sys.modules when it exits.
PROBE = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "runpod-handler.py"
runpy.run_path("runpod-handler.py", run_name="__main__")
"""


def modules_after(job: dict, env: dict, out) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), "--test_input", json.dumps(job)], cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "completed successfully" in done.stdout + done.stderr
    return set(json.loads(out.read_text()))


def loaded(modules: set[str], names) -> set[str]:
    return {name for name in names if name in modules or any(m.startswith(name + ".") for m in modules)}


def test_start_and_an_english_job_import_none_of_the_slow_packages(tiny_models, tiny_whisper, tmp_path):
    env = child_env(tiny_models, tiny_whisper, tmp_path / "volume")
    modules = modules_after({"input": {"text": "Hello there, café au lait at 10:30; ready?",
                                       "local_voice": "basic_ref_en.wav", "nfe_step": 4, "seed": 1}},
                            env, tmp_path / "modules.json")
    assert "torch" in modules and "f5worker.model.dit" in modules  # the probe saw the real run
    assert loaded(modules, FORBIDDEN) == set()


def test_a_v0_model_starts_and_speaks_on_the_own_model(tiny_v0_models, tiny_whisper, tmp_path):
    """F5TTS_Base's layout (the community fine-tunes') no longer falls back to stock's import chain."""
    env = child_env(tiny_v0_models, tiny_whisper, tmp_path / "volume")
    modules = modules_after({"input": {"text": "Hello there.", "local_voice": "basic_ref_en.wav", "nfe_step": 4,
                                       "seed": 1}}, env, tmp_path / "modules.json")
    assert "f5worker.model.dit" in modules
    assert loaded(modules, FORBIDDEN) == set()


def test_a_chinese_job_loads_the_chinese_text_tools_only(tiny_models, tiny_whisper, tmp_path):
    env = child_env(tiny_models, tiny_whisper, tmp_path / "volume")
    modules = modules_after({"input": {"text": "你好，世界。Hello.", "local_voice": "basic_ref_en.wav",
                                       "nfe_step": 4, "seed": 1}}, env, tmp_path / "modules.json")
    assert loaded(modules, CHINESE_TOOLS) == CHINESE_TOOLS
    assert loaded(modules, FORBIDDEN) == CHINESE_TOOLS


def test_importing_the_handler_module_loads_no_torch():
    """runpod-handler.py imports f5worker.service before start-up; torch (seconds) loads in
    start-up, beside runpod's own import, not before it."""
    probe = "import sys; sys.argv = sys.argv[:1]; import f5worker.service; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
