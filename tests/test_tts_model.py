"""Which model code runs: the worker's own where it covers the files, stock f5-tts's otherwise.

The own model's equality with stock on the default layout is in test_engine.py (English) and here
for Chinese and mixed text (the own tokeniser end to end); the fallback for a layout the own model
does not cover (qk-norm, which no layout f5-tts ships uses) is chosen, said at start, checked
by the pre-deploy gate, and computes what stock computes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from f5worker.jobs import plan as job_plan
from f5worker.inference.engine import TTSEngine
from f5worker.model.store import resolve_tts_files
from tests.random_models import (
    TINY_ARCH,
    TINY_VOCOS,
    packaged_vocab,
    write_f5_checkpoint,
    write_model_config,
    write_vocos,
)
from f5worker.settings import Settings
from f5worker.model.loader import F5Model, check_model_checkpoint, model_unsupported_reason
from tests.helpers import CPU_REL_L2, load_stock, rel_l2, request, stock_infer

STOCK_ONLY_ARCH = {**TINY_ARCH, "qk_norm": "rms_norm"}


@pytest.fixture(scope="module")
def stock_only_models(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("stock-only")
    config = write_model_config(folder / "model.yaml", STOCK_ONLY_ARCH, name="F5TTS_qk_norm")
    ckpt = write_f5_checkpoint(folder / "model.safetensors", STOCK_ONLY_ARCH, packaged_vocab())
    vocoder = write_vocos(folder / "vocos", TINY_VOCOS)
    return {"F5_CKPT_FILE": str(ckpt), "F5_VOCAB_FILE": str(packaged_vocab()), "F5_MODEL_CONFIG": str(config),
            "F5_VOCODER_DIR": str(vocoder)}


@pytest.fixture(scope="module")
def stock(stock_only_models):
    return load_stock(stock_only_models)


def test_the_default_layout_runs_the_own_model(tiny_models):
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)
    assert isinstance(engine.model, F5Model)
    assert type(engine.vocoder).__module__ == "f5worker.model.vocoder"


def test_another_layout_falls_back_to_stock_and_says_so(stock_only_models, stock, monkeypatch, ref_wav, caplog):
    assert "qk_norm" in model_unsupported_reason({"arch": STOCK_ONLY_ARCH})
    with caplog.at_level(logging.WARNING, logger="f5worker.model.loader"):
        engine = TTSEngine.load(resolve_tts_files(Settings.from_env(stock_only_models)), device="cpu", fast=True)
    assert type(engine.model).__module__ == "f5_tts.model.cfm"
    assert type(engine.step_runner).__name__ == "EagerStepRunner"  # the fast path is written for the own layout
    assert any("F5TTS_qk_norm" in r.getMessage() and "qk_norm" in r.getMessage() for r in caplog.records)
    # the gate checks the model the worker runs
    check_model_checkpoint(Path(stock_only_models["F5_CKPT_FILE"]), Path(stock_only_models["F5_MODEL_CONFIG"]),
                           Path(stock_only_models["F5_VOCAB_FILE"]))
    text = "Hello from a layout of another kind."
    expected = stock_infer(stock, monkeypatch, ref_wav, text, 5, nfe_step=6)
    assert rel_l2(job_plan.synthesize(engine, request(ref_wav, text, 5, nfe_step=6)), expected) < CPU_REL_L2


@pytest.mark.parametrize("text", ["你好，世界。我们今天去公园散步。", "I said 你好 to the team at 9:30, then left."])
def test_chinese_and_mixed_text_equal_stock(tiny_models, monkeypatch, ref_wav, text):
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu")
    expected = stock_infer(load_stock(tiny_models), monkeypatch, ref_wav, text, 11, nfe_step=6)
    assert rel_l2(job_plan.synthesize(engine, request(ref_wav, text, 11, nfe_step=6)), expected) < CPU_REL_L2
