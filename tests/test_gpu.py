"""The CUDA-graph path on a GPU: same output as stock f5-tts in fp16, batched or not.

Skipped without CUDA (CI has none); run on a GPU machine by bench/device_run.sh (see bench/RESULTS.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from f5worker.engine import TTSEngine
from f5worker.model_store import resolve_tts_files
from f5worker.settings import Settings
from tests.test_engine import GEN_TEXT, rel_l2, request, stock_infer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# fp16 through 32 steps: each step rounds differently in fused/masked kernels; stock itself moves
# by this much between fp16 kernels. A real error (wrong mask, wrong time step) is O(1).
FP16_REL_L2 = 3e-2


@pytest.fixture(scope="module")
def gpu_engine(tiny_models):
    return TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cuda", fast=True)


def test_graphed_path_matches_stock_fp16(gpu_engine, tiny_models, monkeypatch, ref_wav):
    import yaml
    from pathlib import Path

    from bench.bench import stub_training_imports

    stub_training_imports()  # the GPU image lacks wandb/datasets, which stock's trainer import wants
    from f5_tts.infer import utils_infer
    from f5_tts.model import DiT

    arch = yaml.safe_load(Path(tiny_models["F5_MODEL_CONFIG"]).read_text())["model"]["arch"]
    model = utils_infer.load_model(DiT, arch, tiny_models["F5_CKPT_FILE"], vocab_file=tiny_models["F5_VOCAB_FILE"],
                                   device="cuda")
    vocoder = utils_infer.load_vocoder("vocos", is_local=True, local_path=tiny_models["F5_VOCODER_DIR"], device="cuda")
    assert gpu_engine.dtype == torch.float16 and gpu_engine.step_runner.use_graphs
    for nfe in (16, 32):
        expected = stock_infer((utils_infer, model, vocoder), monkeypatch, ref_wav, GEN_TEXT, 11, device="cuda",
                               nfe_step=nfe)
        got = gpu_engine.synthesize(request(ref_wav, GEN_TEXT, 11, nfe_step=nfe))
        assert np.isfinite(got).all()
        assert rel_l2(got, expected) < FP16_REL_L2
    assert gpu_engine.step_runner.graphs  # the graphs really ran


def test_graphed_batches_match_items_alone(gpu_engine, ref_wav):
    plans = [gpu_engine.plan(request(ref_wav, GEN_TEXT[: 20 + 15 * i], i, nfe_step=32)) for i in range(5)]
    items = [it for p in plans for it in p.items]
    together = gpu_engine.run_items(items)
    for item, wave in zip(items, together):
        assert rel_l2(wave, gpu_engine.run_items([item])[0]) < FP16_REL_L2
