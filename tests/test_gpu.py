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

from f5worker.jobs import plan as job_plan
from f5worker.inference import attention
from f5worker.inference import kernels
from f5worker.inference.engine import TTSEngine
from f5worker.inference.fast import BucketedStepRunner, warm_fused_kernels
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
from tests.helpers import GEN_TEXT, rel_l2, request, stock_infer

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
        got = job_plan.synthesize(gpu_engine, request(ref_wav, GEN_TEXT, 11, nfe_step=nfe))
        assert np.isfinite(got).all()
        assert rel_l2(got, expected) < FP16_REL_L2
    assert gpu_engine.step_runner.graphs  # the graphs really ran


def test_graphed_batches_match_items_alone(gpu_engine, ref_wav):
    plans = [job_plan.plan(request(ref_wav, GEN_TEXT[: 20 + 15 * i], i, nfe_step=32)) for i in range(5)]
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


# --- the fast path cannot fail a job (full F5TTS_v1_Base width) -------------------------------------

@pytest.fixture(scope="module")
def full_dit():
    """A randomly initialised DiT of F5TTS_v1_Base's exact layout, fp16 on the GPU (compute does
    not depend on the weights' values; the zero-initialised modulation is filled so every layer acts)."""
    from importlib.resources import files as package_files
    from pathlib import Path

    import yaml

    from f5worker.model.dit import DiT
    from f5worker.inference.fast import install_fused_attention

    config = Path(str(package_files("f5_tts").joinpath("configs/F5TTS_v1_Base.yaml")))
    arch = yaml.safe_load(config.read_text())["model"]["arch"]
    torch.manual_seed(0)
    model = DiT(**arch, text_num_embeds=2545, mel_dim=100).eval()
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    install_fused_attention(model)
    return model.to("cuda", torch.float16)


def full_cases(model, seed=3):
    """A padded batch of three, guided, and a single job, as (y, step_cond, text, mask, t, steps, cfg)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cases = []
    for lengths in ([300, 190, 77], [250]):
        frames = max(lengths)
        y = torch.randn(len(lengths), frames, 100, device="cuda", dtype=torch.float16, generator=gen)
        cond = torch.randn(y.shape, device="cuda", dtype=torch.float16, generator=gen) * 0.5
        text = torch.randint(0, 2000, (len(lengths), 60), device="cuda", generator=gen)
        mask = lengths_mask(lengths, frames) if len(lengths) > 1 else None
        cases.append((y, cond, text, mask, torch.linspace(0, 1, 9, device="cuda", dtype=torch.float16), 8, 2.0))
    return cases


def on_fresh_thread(fn):
    """``fn()`` on a new thread (a new cuBLAS handle, so new workspaces), in inference mode there."""
    import threading

    out = {}

    def run():
        try:
            with torch.inference_mode():
                out["value"] = fn()
        except BaseException as err:  # handed back to the test's thread
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_capture_switch_evict_and_recapture_on_fresh_threads_at_full_width(full_dit):
    """Defect 1 of the GPU review: after the switch to fused kernels drops every unfused graph, the
    next capture into the shared pool asserted in the caching allocator. Each round here runs on a
    fresh thread. Then, on a budget of one byte, an unguided case (a new bucket: a capture, and the
    eviction of both graphs) and the first cases again (each a recapture that evicts the one before).
    Eviction runs only after a capture, so the first cases alone would evict nothing."""
    runner = BucketedStepRunner(full_dit)
    cases = full_cases(full_dit)
    unfused = on_fresh_thread(lambda: [runner.integrate(*case) for case in cases])
    on_fresh_thread(lambda: warm_fused_kernels(full_dit, torch.float16, "cuda"))
    runner.use_fused_kernels()
    fused = on_fresh_thread(lambda: [runner.integrate(*case) for case in cases])
    assert runner.level == "fused" and all(key[-1] for key in runner.graphs)  # re-captured, not demoted
    runner.graph_memory_bytes = 1
    unguided = cases[1][:-1] + (0.0,)
    on_fresh_thread(lambda: runner.integrate(*unguided))
    assert [key[2] for key in runner.graphs] == [False]  # both guided graphs evicted
    again = on_fresh_thread(lambda: [runner.integrate(*case) for case in cases])
    assert runner.level == "fused" and len(runner.graphs) == 1 and all(key[2] for key in runner.graphs)
    for case, a, b, c in zip(cases, unfused, fused, again):
        valid = slice(None) if case[3] is None else case[3]
        assert rel_l2_tensors(b[valid], a[valid]) < FP16_REL_L2
        assert torch.equal(c, b)  # a re-captured graph computes what the first one did


def test_integrations_set_aside_on_one_real_graph_give_their_results_alone(full_dit):
    """Step-at-a-time calls (the batcher's preemption) on a real CUDA graph: two integrations of
    one bucket take turns on its graph, each saving its y out of the static buffers and loading it
    back, and each ends bit-equal to the same integration run whole on that graph."""
    runner = BucketedStepRunner(full_dit, varlen=False)
    cases = [full_cases(full_dit, seed=seed)[1] for seed in (3, 4)]  # one row each, one bucket

    def alone_then_interleaved():
        alone = [runner.integrate(*case) for case in cases]
        runs = [runner.start(*case) for case in cases]
        for i in (0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0):  # 8 steps each
            runs[i].step()
        together = [run.result() for run in runs]
        for run in runs:
            run.close()
        return alone, together

    alone, together = on_fresh_thread(alone_then_interleaved)
    assert len(runner.graphs) == 1 and runner.level == "graphed"  # both took turns on the one graph
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert rel_l2_tensors(alone[0], alone[1]) > 0.1


def test_a_real_capture_fault_demotes_to_eager_and_the_items_still_succeed(full_dit, monkeypatch):
    """A host sync inside a capture is refused by CUDA (the capture is invalidated, the context is
    not): a real capture fault. The runner must step down and give the eager step's answer."""
    cases = full_cases(full_dit, seed=5)
    expected = on_fresh_thread(lambda: [BucketedStepRunner(full_dit, use_graphs=False, varlen=False)
                                        .integrate(*case) for case in cases])
    from f5worker.inference import fast

    real_step = fast.euler_step

    def syncing_step(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fast, "euler_step", syncing_step)
    runner = BucketedStepRunner(full_dit, varlen=False)
    got = on_fresh_thread(lambda: [runner.integrate(*case) for case in cases])
    assert runner.level == "eager"
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    monkeypatch.setattr(fast, "euler_step", real_step)
    torch.cuda.synchronize()  # the GPU is still usable
    assert on_fresh_thread(lambda: BucketedStepRunner(full_dit).integrate(*cases[1])).isfinite().all()


def test_a_fused_kernel_fault_on_the_gpu_demotes_to_the_unfused_graphs(full_dit, monkeypatch):
    cases = full_cases(full_dit, seed=7)
    unfused_runner = BucketedStepRunner(full_dit, varlen=False)
    expected = on_fresh_thread(lambda: [unfused_runner.integrate(*case) for case in cases])

    def launch_fails(*args, **kwargs):  # injected: a Triton launch refused on this GPU
        raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch (injected)")

    monkeypatch.setattr(kernels, "cfg_euler", launch_fails)
    runner = BucketedStepRunner(full_dit, fused=True, varlen=False)
    got = on_fresh_thread(lambda: [runner.integrate(*case) for case in cases])
    assert runner.level == "graphed" and runner.graphs
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_whisper_runs_on_its_own_stream(tiny_whisper, tmp_path, ref_wav):
    from f5worker.jobs.audio import decode
    from f5worker.inference.transcriber import Transcriber
    from tests.helpers import whisper_settings

    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cuda")
    samples, sr = decode(ref_wav)
    assert isinstance(transcriber.transcribe(samples, sr), str)
    assert transcriber._stream is not None and transcriber._stream != torch.cuda.current_stream()
