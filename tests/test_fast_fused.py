"""The fused DiT step and variable-length attention (f5worker.inference.fast, f5worker.inference.attention) on the CPU.

The unfused step is the reference here (tests/test_own_dit.py proves it equal to stock f5-tts):

1. In this process: the fused step with the kernels' torch references, and variable-length
   attention through its per-segment reference, integrate to the same mel as the unfused masked
   step; the packing keeps each item to itself; the switch to fused kernels lands between
   integrations, never in one; ``warm_fused_kernels`` calls every kernel the fused step calls.
2. In a subprocess under Triton's interpreter (TRITON_INTERPRET=1, read by Triton at import, so it
   must not leak into this process): the fused step with the Triton kernels themselves, references
   refused, against the unfused step.

The flash kernel and CUDA graphs need a GPU: tests/test_gpu.py covers them there.
"""
from __future__ import annotations

import threading

import pytest
import torch

from f5worker.inference import attention
from f5worker.inference import fast
from f5worker.inference import kernels
from tests.processes import INTERPRETED, run_interpreted
from tests.helpers import rel_l2, sample, tiny_dit
from tests.random_models import TINY_V0_ARCH

REL_L2 = 1e-5  # fp32; the fused kernels round once where torch rounds per op
KERNEL_WRAPPERS = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate", "gelu_tanh",
                   "rotary", "rotary_qkv", "cfg_euler")


CASES = {"alone": [12], "padded_batch": [12, 9, 4]}


def integrate_both(model, lengths, cfg_strength, **fused_kw):
    y, step_cond, text, mask, t = sample(lengths)
    with torch.inference_mode():
        unfused = fast.euler_integrate(model, y, step_cond, text, mask, t, steps=2, cfg_strength=cfg_strength)
        fused = fast.euler_integrate(model, y, step_cond, text, mask, t, steps=2, cfg_strength=cfg_strength, fused=True,
                                     **fused_kw)
    assert rel_l2(unfused, y) > 1e-2  # the flow really moved y: equality below is not trivial
    if mask is not None:  # padded frames come out as the unfused path leaves them
        assert torch.equal(fused[~mask], unfused[~mask]) or rel_l2(fused[~mask], unfused[~mask]) <= REL_L2
    return fused, unfused


# --- 1. in this process ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg_strength", [2.0, 0.0])
@pytest.mark.parametrize("arch", ["v1", "v0"])
def test_fused_step_with_reference_kernels_equals_unfused(case, cfg_strength, arch):
    fused, unfused = integrate_both(tiny_dit(arch=TINY_V0_ARCH if arch == "v0" else None), CASES[case], cfg_strength)
    assert rel_l2(fused, unfused) <= REL_L2


def test_runner_paths_all_integrate_to_the_unfused_masked_mel():
    """Through BucketedStepRunner (bucket padding, then eager on the CPU): fused or not, masked or
    variable-length attention."""
    model = tiny_dit()
    y, step_cond, text, mask, t = sample([12, 9, 4])
    with torch.inference_mode():
        expected = fast.BucketedStepRunner(model, use_graphs=False).integrate(y, step_cond, text, mask, t, 2, 2.0)
        for fused in (False, True):
            for varlen in (False, True):
                runner = fast.BucketedStepRunner(model, use_graphs=False, fused=fused, varlen=varlen)
                got = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
                assert got.shape == y.shape
                assert rel_l2(got[mask], expected[mask]) <= REL_L2, (fused, varlen)


def rand_qkv(batch, heads, frames, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, frames, dim, generator=gen) for _ in range(3)]


def test_varlen_packing_gives_each_item_its_own_attention():
    lengths = [10, 1, 7, 10]  # a full row, a single frame, two partial rows
    frames = max(lengths)
    mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    q, k, v = rand_qkv(len(lengths), 3, frames, 16)
    plan = attention.AttentionPlan(mask, "varlen")
    # the layout: valid tokens of each row in order, then the padding; segments at the row bounds
    total = sum(lengths)
    assert plan.cum_seq.dtype == torch.int32 and plan.cum_seq.tolist() == [0, 10, 11, 18, 28]
    valid = [(r, n) for r in range(len(lengths)) for n in range(lengths[r])]
    assert list(zip(plan.pack_row[:total].tolist(), plan.pack_pos[:total].tolist())) == valid
    assert not mask[plan.pack_row[total:], plan.pack_pos[total:]].any()
    flat = plan.pack_row * frames + plan.pack_pos
    assert torch.equal(flat[plan.unpack_index], torch.arange(mask.numel()))  # unpack inverts pack
    varlen = plan.zero_padding(attention.attend(q, k, v, plan))
    masked_plan = attention.AttentionPlan(mask, "masked")
    masked = masked_plan.zero_padding(attention.attend(q, k, v, masked_plan))
    torch.testing.assert_close(varlen, masked, rtol=1e-5, atol=1e-6)
    for r, length in enumerate(lengths):  # and what each item computes alone, without any mask
        alone = attention.attend(*(t[r:r + 1, :, :length] for t in (q, k, v)), attention.AttentionPlan(None, "dense"))
        torch.testing.assert_close(varlen[r, :length], alone[0], rtol=1e-5, atol=1e-6)
        assert not varlen[r, length:].any()


def test_plan_loaded_from_another_sample_attends_as_that_sample():
    """What a captured graph does: its plan's tensors take the next sample's layout."""
    frames = 8
    masks = [torch.arange(frames)[None] < torch.tensor(lengths)[:, None] for lengths in ([8, 3], [5, 6])]
    q, k, v = rand_qkv(2, 2, frames, 16, seed=3)
    for kind in ("masked", "varlen"):
        held, fresh = attention.AttentionPlan(masks[0], kind), attention.AttentionPlan(masks[1], kind)
        before = held.zero_padding(attention.attend(q, k, v, held))
        held.copy_(fresh)
        after = held.zero_padding(attention.attend(q, k, v, held))
        assert torch.equal(after, fresh.zero_padding(attention.attend(q, k, v, fresh)))
        assert not torch.allclose(after, before)
    with pytest.raises(ValueError, match="cannot load"):
        attention.AttentionPlan(masks[0], "masked").copy_(attention.AttentionPlan(masks[1], "varlen"))


def test_attention_kind_follows_padding_device_and_dtype():
    assert attention.attention_kind(False, "cpu", torch.float16, varlen=True) == "dense"
    assert attention.attention_kind(True, "cpu", torch.float16) == "masked"  # flash is CUDA-only
    assert attention.attention_kind(True, "cpu", torch.float32, varlen=True) == "varlen"
    with pytest.raises(ValueError):
        attention.AttentionPlan(None, "varlen")


def test_switch_to_fused_lands_between_integrations_never_in_one():
    model = tiny_dit()
    y, step_cond, text, mask, t = sample([12, 9, 4])
    runner = fast.BucketedStepRunner(model, use_graphs=False)
    unfused_calls = []  # the unfused step calls each AdaLayerNorm module; the fused one only its linear
    model.transformer_blocks[0].attn_norm.register_forward_hook(lambda *_: unfused_calls.append(1))

    def switch_from_another_thread(*_):
        if not runner._wanted[0]:
            thread = threading.Thread(target=runner.use_fused_kernels)
            thread.start()
            thread.join()

    with torch.inference_mode():
        unfused_runner = fast.BucketedStepRunner(model, use_graphs=False)
        expected_unfused = unfused_runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
        unfused_calls.clear()
        hook = model.proj_out.register_forward_hook(switch_from_another_thread)  # during the first step
        first = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
        hook.remove()
        assert runner._wanted[0] and not runner.fused and len(unfused_calls) == 2  # once per step
        assert torch.equal(first, expected_unfused)  # the whole integration stayed unfused
        unfused_calls.clear()
        second = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
    assert runner.fused and not unfused_calls
    assert rel_l2(second[mask], first[mask]) <= REL_L2


def test_warm_runs_every_kernel_the_fused_step_runs(monkeypatch):
    model = tiny_dit()
    called: dict[str, set] = {"warm": set(), "step": set()}
    phase = ["warm"]
    for name in KERNEL_WRAPPERS:
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kw):
            called[phase[0]].add(_name)
            return _real(*args, **kw)
        monkeypatch.setattr(kernels, name, spy)
    fast.warm_fused_kernels(model, torch.float32, "cpu")
    phase[0] = "step"
    y, step_cond, text, mask, t = sample([12, 9, 4])
    with torch.inference_mode():
        for cfg_strength in (2.0, 0.0):
            fast.BucketedStepRunner(model, use_graphs=False, fused=True).integrate(y, step_cond, text, mask, t, 2,
                                                                                   cfg_strength)
    assert called["step"] == {"layernorm_modulate", "gated_residual_layernorm_modulate", "gelu_tanh", "rotary_qkv",
                              "cfg_euler"}
    assert called["warm"] == called["step"]


def test_fused_refuses_a_block_it_does_not_implement():
    model = tiny_dit()
    model.transformer_blocks[1].ff.ff[0][1].approximate = "none"
    with pytest.raises(ValueError, match="F5TTS_v1"):
        fast.BucketedStepRunner(model, use_graphs=False, fused=True)
    runner = fast.BucketedStepRunner(model, use_graphs=False)
    with pytest.raises(ValueError, match="F5TTS_v1"):
        runner.use_fused_kernels()


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreted tests")
def test_fused_step_under_triton_interpreter():
    run_interpreted(__file__, "TestFusedUnderInterpreter")


# --- 2. the Triton kernels themselves (collected only under the interpreter) --------------------

class TestFusedUnderInterpreter:
    __test__ = INTERPRETED

    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("cfg_strength", [2.0, 0.0])
    @pytest.mark.parametrize("arch", ["v1", "v0"])
    def test_fused_step_with_triton_kernels_equals_unfused(self, case, cfg_strength, arch, monkeypatch):
        assert type(kernels._rows_kernel).__name__ == "InterpretedFunction"
        model = tiny_dit(arch=TINY_V0_ARCH if arch == "v0" else None)

        def refuse(*_, **__):
            raise AssertionError("use_triton=True ran a torch reference")
        # the unfused path never calls the kernels module; the fused one must not fall back
        for name in dir(kernels):
            if name.endswith("_reference"):
                monkeypatch.setattr(kernels, name, refuse)
        fused, unfused = integrate_both(model, CASES[case], cfg_strength, use_triton=True)
        assert rel_l2(fused, unfused) <= REL_L2
