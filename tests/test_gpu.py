"""The CUDA-graph path on a GPU: same output as stock f5-tts in fp16, batched or not; variable-length
flash attention equal to masked SDPA (eagerly and replayed from a graph); the fused Triton step
equal to the unfused one, with ``warm_fused_kernels`` compiling every kernel the graphs launch.

Skipped without CUDA (CI has none); run on a GPU machine by bench/device_run.sh (see bench/RESULTS.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from f5worker import attention, kernels
from f5worker.engine import TTSEngine
from f5worker.fast import BucketedStepRunner, warm_fused_kernels
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


# One fp16/bf16 rounding apart per kernel (flash vs memory-efficient attention).
ATTN_TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
TRITON_KERNELS = ("_rows_kernel", "_gelu_tanh_kernel", "_rotary_kernel", "_cfg_euler_kernel")


def rel_l2_tensors(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def lengths_mask(lengths, frames):
    return torch.arange(frames, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]


def masked_attention(q, k, v, mask):
    plan = attention.AttentionPlan(mask, "masked")
    return plan.zero_padding(attention.attend(q, k, v, plan))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_flash_attention_equals_masked_sdpa(dtype):
    frames, heads, dim = 256, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, heads, frames, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    lengths = [256, 200, 17, 1]
    mask = lengths_mask(lengths, frames)
    plan = attention.AttentionPlan(mask, "varlen")
    out = plan.zero_padding(attention.attend(q, k, v, plan))
    torch.testing.assert_close(out, masked_attention(q, k, v, mask), **ATTN_TOLERANCE[dtype])
    for row, length in enumerate(lengths):  # each item as it attends alone (flash, no mask)
        alone = F.scaled_dot_product_attention(*(t[row:row + 1, :, :length] for t in (q, k, v)))
        torch.testing.assert_close(out[row, :length], alone[0].transpose(0, 1).reshape(length, -1),
                                   **ATTN_TOLERANCE[dtype])

    # replayed from a CUDA graph, with the next sample's layout loaded into the captured plan
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan.zero_padding(attention.attend(q, k, v, plan))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = plan.zero_padding(attention.attend(q, k, v, plan))
    next_mask = lengths_mask([30, 256, 128, 5], frames)
    plan.copy_(attention.AttentionPlan(next_mask, "varlen"))
    for t in (q, k, v):
        t.normal_(generator=gen)
    graph.replay()
    torch.testing.assert_close(replayed, masked_attention(q, k, v, next_mask), **ATTN_TOLERANCE[dtype])


def triton_compiled() -> dict[str, int]:
    device = torch.cuda.current_device()
    return {name: len(getattr(kernels, name).device_caches[device][0]) for name in TRITON_KERNELS}


def test_fused_graphs_match_unfused_and_warm_compiles_every_kernel(gpu_engine):
    tr, dtype = gpu_engine.model.transformer, gpu_engine.dtype
    n_mel = tr.proj_out.out_features
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases = []  # (y, step_cond, text, mask, cfg_strength): a padded batch and a single job, guided or not
    for lengths, cfg_strength in (([300, 190, 77], 2.0), ([300, 190, 77], 0.0), ([250], 2.0)):
        frames = max(lengths)
        y = torch.randn(len(lengths), frames, n_mel, device="cuda", dtype=dtype, generator=gen)
        step_cond = torch.randn(len(lengths), frames, n_mel, device="cuda", dtype=dtype, generator=gen) * 0.5
        text = torch.randint(0, 20, (len(lengths), 40), device="cuda", generator=gen)
        mask = lengths_mask(lengths, frames) if len(lengths) > 1 else None
        cases.append((y, step_cond, text, mask, cfg_strength))
    t = torch.linspace(0, 1, 17, device="cuda", dtype=dtype)
    runner = BucketedStepRunner(tr)
    with torch.inference_mode():
        unfused = [runner.integrate(y, c, x, m, t, 16, cfg) for y, c, x, m, cfg in cases]
        assert runner.graphs and not any(key[-1] for key in runner.graphs)
        assert {key[3] for key in runner.graphs} == {"varlen"}  # every case is padded to its bucket
        warm_fused_kernels(tr, dtype, "cuda")
        compiled = triton_compiled()
        runner.use_fused_kernels()
        fused = [runner.integrate(y, c, x, m, t, 16, cfg) for y, c, x, m, cfg in cases]
    assert runner.fused and runner.graphs and all(key[-1] for key in runner.graphs)  # unfused graphs dropped
    assert all(compiled.values()) and triton_compiled() == compiled  # the graphs compiled nothing new
    for (y, _, _, mask, _), a, b in zip(cases, unfused, fused):
        valid = slice(None) if mask is None else mask
        assert rel_l2_tensors(b[valid], a[valid]) < FP16_REL_L2
        assert rel_l2_tensors(a[valid], y[valid]) > 0.1  # the flow really moved y
