"""The switch to the fused kernels: compiled under the volume's lock, checked against the unfused
step on the loaded weights, and taken only when they agree; the worker keeps serving otherwise.

Run on the CPU, where the fused step runs the kernels' torch references (their Triton versions are
held to those under Triton's interpreter in test_kernels.py and test_fast_fused.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from filelock import FileLock

from f5worker import fast_kernels, kernels
from f5worker.engine import TTSEngine
from f5worker.model_store import resolve_tts_files
from f5worker.settings import Settings
from tests.processes import REPO
from tests.test_engine import CPU_REL_L2, GEN_TEXT, load_stock, rel_l2, request, stock_infer


@pytest.fixture
def engine(tiny_models):
    return TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)


def test_checked_kernels_are_switched_to_and_compute_what_stock_does(engine, tiny_models, monkeypatch, ref_wav,
                                                                    tmp_path):
    errors = fast_kernels.check_fast_paths(engine.model.transformer, torch.float32, "cpu")
    assert set(errors) == {"fused", "varlen", "fused_varlen"} and max(errors.values()) < 1e-5
    runner = engine.step_runner
    assert runner.fused is False and runner.varlen is False  # served on the unfused step from the start
    assert fast_kernels.switch_task(runner, engine.dtype, engine.device, tmp_path / "triton")() is True
    assert (tmp_path / "triton" / fast_kernels.LOCK_NAME).exists()
    assert runner.fused is False  # a switch lands between integrations, on the model thread
    got = engine.synthesize(request(ref_wav, GEN_TEXT, 7, nfe_step=8))
    assert runner.fused is True
    expected = stock_infer(load_stock(tiny_models), monkeypatch, ref_wav, GEN_TEXT, 7, nfe_step=8)
    assert rel_l2(got, expected) < CPU_REL_L2


def test_kernels_that_disagree_are_not_used(engine, monkeypatch, ref_wav, tmp_path, caplog):
    # Fault injection: a kernel that computes the wrong thing (as a miscompiled one would).
    right = kernels.cfg_euler
    monkeypatch.setattr(kernels, "cfg_euler", lambda x, flow, dt, cfg, **kw: right(x, flow, dt, cfg, **kw) * 1.1)
    with caplog.at_level(logging.WARNING, logger="f5worker.fast_kernels"):
        assert fast_kernels.switch_task(engine.step_runner, engine.dtype, engine.device, tmp_path)() is False
    assert "differ from the unfused step" in caplog.text
    engine.synthesize(request(ref_wav, GEN_TEXT, 7, nfe_step=2))
    assert engine.step_runner.fused is False


def test_a_compile_lock_held_too_long_leaves_the_worker_on_the_unfused_step(engine, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fast_kernels, "LOCK_TIMEOUT_S", 0.2)
    tmp_path.mkdir(exist_ok=True)
    # Another worker of the endpoint compiling: flock locks are per open file, so a lock held here
    # blocks the task's own FileLock on the same path as another process's would.
    with FileLock(str(tmp_path / fast_kernels.LOCK_NAME)), caplog.at_level(logging.WARNING):
        result = []
        thread = threading.Thread(target=lambda: result.append(
            fast_kernels.switch_task(engine.step_runner, engine.dtype, engine.device, tmp_path)()))
        thread.start()
        thread.join()
    assert result == [False] and "Timeout" in caplog.text
    assert engine.step_runner._wanted == (False, False)



def test_without_triton_the_worker_imports_and_serves_on_the_unfused_step(tiny_models):
    """A torch build without Triton (CPU-only wheels, some platforms): the kernels module still
    imports, its torch references run, and the switch is declined with a reason."""
    script = f"""
import sys, logging
sys.modules["triton"] = None  # as if not installed: 'import triton' raises ImportError
logging.basicConfig(level=logging.WARNING)
import torch
from f5worker import fast_kernels, kernels
from f5worker.engine import TTSEngine
from f5worker.model_store import resolve_tts_files
from f5worker.settings import Settings
assert not kernels.TRITON_AVAILABLE
engine = TTSEngine.load(resolve_tts_files(Settings.from_env({tiny_models!r})), device="cpu", fast=True)
x = torch.randn(2, 5, 64)
assert torch.equal(kernels.layernorm_modulate(x, torch.zeros(2, 64), torch.zeros(2, 64)),
                   kernels.layernorm_modulate_reference(x, torch.zeros(2, 64), torch.zeros(2, 64)))
print("switched:", fast_kernels.switch_task(engine.step_runner, engine.dtype, "cpu", None)())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "switched: False" in done.stdout and "has no Triton" in done.stderr
