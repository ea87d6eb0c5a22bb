"""The fused DiT kernels (f5worker.inference.kernels), proved in two steps.

1. In this process: each ``*_reference`` equals what stock f5-tts and x_transformers compute, run
   from their own modules (AdaLayerNorm, AdaLayerNorm_Final, FeedForward, apply_rotary_pos_emb, a
   whole DiTBlock, and the first Euler step of CFM.sample with guidance).
2. In a subprocess under Triton's interpreter, which runs the kernels on CPU tensors: each Triton
   kernel equals its reference (fp32, fp16, bf16; D = 64, 100 and 1024; odd N), and a stock
   DiTBlock recomputed from the kernels equals the block. The interpreter is chosen when a kernel
   is decorated, i.e. when f5worker.inference.kernels is imported, so the variable must be set before that
   and must not leak into other tests (on a GPU machine they compile real kernels): hence the
   subprocess. Under the interpreter, casts to bf16 truncate where the GPU rounds to nearest, so
   bf16 results may differ from the reference by one bf16 step; fp16 and fp32 casts round as on
   the GPU.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.interpreter import InterpretedFunction
from x_transformers.x_transformers import RotaryEmbedding, apply_rotary_pos_emb

from f5worker.model import stock as f5_imports
from f5worker.inference import kernels
from tests.processes import INTERPRETED, run_interpreted

f5_imports.install()  # f5-tts's model modules without the trainer its package __init__ imports
from f5_tts.model.backbones.dit import DiT  # noqa: E402
from f5_tts.model.cfm import CFM  # noqa: E402
from f5_tts.model.modules import AdaLayerNorm, AdaLayerNorm_Final, DiTBlock, FeedForward  # noqa: E402

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2**-10, atol=1e-4),
             torch.bfloat16: dict(rtol=2**-7, atol=1e-3)}
REFERENCES = {name: getattr(kernels, name) for name in dir(kernels) if name.endswith("_reference")}
ROW_SHAPES = [(2, 3, 64), (1, 5, 100), (2, 1, 1024)]
# stock AttnProcessor's advice to use flash-attn on GPUs: beside the point for these checks
pytestmark = pytest.mark.filterwarnings("ignore:attn_mask_enabled=True:UserWarning")


def assert_close(actual, expected, dtype=torch.float32, **override):
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **{**TOLERANCE[dtype], **override})


def modulation(batch, dim, dtype, parts=6, seed=0):
    """The chunks of one [B, parts*D] projection, as AdaLayerNorm makes them (strided views)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, parts * dim, generator=gen).to(dtype).chunk(parts, dim=1)


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def stock_block(dim=48, heads=2, dim_head=24, seed=0, pe_attn_head=None):
    torch.manual_seed(seed)
    return DiTBlock(dim=dim, heads=heads, dim_head=dim_head, ff_mult=2, dropout=0.0, pe_attn_head=pe_attn_head).eval()


def block_from_kernels(block, x, t, mask, rope, use_triton):
    """DiTBlock.forward rebuilt from the kernels (fused QKV, as fast.FusedAttnProcessor does)."""
    attn, ff_in, ff_out = block.attn, block.ff.ff[0][0], block.ff.ff[2]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm.linear(F.silu(t)).chunk(6, 1)
    norm = kernels.layernorm_modulate(x, shift_msa, scale_msa, use_triton=use_triton)
    qkv = F.linear(norm, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]),
                   torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
    cos, sin = kernels.rope_tables(rope[0])
    q, k, v = kernels.rotary_qkv(qkv, attn.heads, cos, sin, use_triton=use_triton,
                                 rotary_heads=attn.processor.pe_attn_head)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out = attn.to_out[0](out.transpose(1, 2).flatten(2)).masked_fill(~mask[..., None], 0.0)
    h, norm = kernels.gated_residual_layernorm_modulate(x, gate_msa, out, shift_mlp, scale_mlp, use_triton=use_triton)
    hidden = kernels.gelu_tanh(F.linear(norm, ff_in.weight), ff_in.bias, use_triton=use_triton)
    return kernels.gated_residual(h, gate_mlp, ff_out(hidden), use_triton=use_triton)


def block_inputs(block, batch=2, frames=7, seed=1):
    x, t = rand(batch, frames, block.attn.inner_dim, seed=seed), rand(batch, block.attn.inner_dim, seed=seed + 1)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    mask[-1, frames - 2:] = False  # padded frames, as in a batch of unequal lengths
    rope = RotaryEmbedding(block.attn.inner_dim // block.attn.heads).forward_from_seq_len(frames)
    return x, t, mask, rope


# --- 1. the references are what stock computes --------------------------------------------------

@pytest.mark.parametrize("dim", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layernorm_modulate_is_stock_adalayernorm(dim, dtype):
    torch.manual_seed(0)
    ada, final = AdaLayerNorm(dim).to(dtype), AdaLayerNorm_Final(dim).to(dtype)
    x, emb = rand(2, 5, dim, dtype=dtype, seed=1), rand(2, dim, dtype=dtype, seed=2)
    # stock rounds after every op in fp16; the reference rounds once
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        shift, scale = ada.linear(ada.silu(emb)).chunk(6, dim=1)[:2]
        assert_close(kernels.layernorm_modulate_reference(x, shift, scale), ada(x, emb)[0], dtype, **tol)
        scale, shift = final.linear(final.silu(emb)).chunk(2, dim=1)
        assert_close(kernels.layernorm_modulate_reference(x, shift, scale), final(x, emb), dtype, **tol)


def test_gelu_tanh_is_stock_feedforward_projection():
    torch.manual_seed(0)
    project_in = FeedForward(dim=40, mult=2, approximate="tanh").ff[0]
    x = rand(2, 5, 40, seed=1, scale=3.0)
    with torch.no_grad():
        assert_close(kernels.gelu_tanh_reference(F.linear(x, project_in[0].weight), project_in[0].bias), project_in(x))


@pytest.mark.parametrize("shape, freqs_shape", [((2, 2, 5, 64), (1, 9, 64)), ((1, 3, 7, 100), (1, 7, 64)),
                                                ((2, 1, 3, 64), (2, 3, 64))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_is_x_transformers_apply_rotary_pos_emb(shape, freqs_shape, dtype):
    t = rand(*shape, dtype=dtype, seed=1)
    freqs = rand(*freqs_shape, seed=2, scale=10.0)  # angles well past 2*pi, as at late positions
    assert_close(kernels.rotary_reference(t, freqs), apply_rotary_pos_emb(t, freqs, 1.0), dtype)


@pytest.mark.parametrize("pe_attn_head", [None, 1])  # v1's rotary on every head; v0's on the first
def test_block_from_references_is_stock_dit_block(pe_attn_head):
    block = stock_block(heads=3, dim_head=16, pe_attn_head=pe_attn_head)
    x, t, mask, rope = block_inputs(block)
    with torch.no_grad():
        expected = block(x, t, mask=mask, rope=rope)
        assert_close(block_from_kernels(block, x, t, mask, rope, use_triton=False), expected, atol=2e-5)


def test_cfg_euler_is_the_first_euler_step_of_stock_cfm_sample():
    torch.manual_seed(0)
    cfm = CFM(transformer=DiT(dim=32, depth=1, heads=2, dim_head=16, ff_mult=2, text_dim=16, conv_layers=1,
                              text_num_embeds=12, mel_dim=100))
    with torch.no_grad():
        for p in cfm.parameters():  # DiT zero-initialises its output projection: a zero flow proves nothing
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.5)
    flows = []
    cfm.transformer.register_forward_hook(lambda module, args, output: flows.append(output))
    with torch.no_grad():
        _, trajectory = cfm.sample(rand(1, 4, 100, seed=1), torch.randint(0, 12, (1, 6)), 9, steps=2,
                                   cfg_strength=2.0, sway_sampling_coef=None, use_epss=False, seed=3)
    assert flows[0].shape == (2, 9, 100)  # (cond, uncond) stacked
    assert_close(kernels.cfg_euler_reference(trajectory[0], flows[0], 0.5, 2.0), trajectory[1])


@pytest.mark.parametrize("name", ["layernorm_modulate", "gated_residual", "gelu_tanh", "cfg_euler"])
def test_cpu_tensors_take_the_reference_path(name):
    x, y, pred_both = rand(2, 3, 100, seed=1), rand(2, 3, 100, seed=2), rand(4, 3, 100, seed=3)
    shift, scale, gate = modulation(2, 100, torch.float32)[:3]
    args = {"layernorm_modulate": (x, shift, scale), "gated_residual": (x, gate, y), "gelu_tanh": (x,),
            "cfg_euler": (x, pred_both, 0.1, 2.0)}[name]
    assert torch.equal(getattr(kernels, name)(*args), getattr(kernels, name + "_reference")(*args))


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreted tests")
def test_triton_kernels_under_interpreter():
    run_interpreted(__file__, "TestTritonUnderInterpreter")


# --- 2. the Triton kernels are their references (collected only under the interpreter) ----------

@contextmanager
def references_refused():
    """A kernel call that fell back to its torch reference would prove nothing: meanwhile they raise."""
    def refuse(*_, **__):
        raise AssertionError("use_triton=True ran a torch reference")
    with pytest.MonkeyPatch.context() as patch:
        for reference in REFERENCES:
            patch.setattr(kernels, reference, refuse)
        yield


def triton(name, *args, **kwargs):
    with references_refused():
        return getattr(kernels, name)(*args, use_triton=True, **kwargs)


class TestTritonUnderInterpreter:
    __test__ = INTERPRETED

    def test_the_gates_probe_compiles_and_launches_a_kernel(self):
        from f5worker.inference.kernel_switch import triton_probe

        assert triton_probe("cpu") is None

    def test_kernels_are_interpreted(self):
        for name in ("_rows_kernel", "_gelu_tanh_kernel", "_rotary_kernel", "_cfg_euler_kernel"):
            assert isinstance(getattr(kernels, name), InterpretedFunction)

    @pytest.mark.parametrize("shape", ROW_SHAPES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_rows(self, shape, dtype):
        batch, n, dim = shape
        x, y = rand(*shape, dtype=dtype, seed=1), rand(*shape, dtype=dtype, seed=2)
        shift, scale, gate = modulation(batch, dim, dtype)[:3]
        assert_close(triton("layernorm_modulate", x, shift, scale),
                     kernels.layernorm_modulate_reference(x, shift, scale), dtype)
        assert_close(triton("gated_residual", x, gate, y),
                     kernels.gated_residual_reference(x, gate, y), dtype)
        h, out = triton("gated_residual_layernorm_modulate", x, gate, y, shift, scale)
        assert_close(h, kernels.gated_residual_reference(x, gate, y), dtype)
        # the norm of the h it stored (not of the reference's h: under the interpreter a bf16 h is
        # truncated, and the norm magnifies that one step)
        assert_close(out, kernels.layernorm_modulate_reference(h, shift, scale), dtype)

    @pytest.mark.parametrize("shape", [(2, 3, 100), (1, 5, 64), (1, 2, 1024)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_gelu_tanh(self, shape, dtype):
        x = rand(*shape, dtype=dtype, seed=1, scale=4.0)  # reaches the saturated tails of tanh
        bias = rand(shape[-1], dtype=dtype, seed=2)
        for b in (None, bias):
            assert_close(triton("gelu_tanh", x, b), kernels.gelu_tanh_reference(x, b), dtype)

    @pytest.mark.parametrize("shape, freqs_shape", [((2, 2, 5, 64), (1, 9, 64)), ((1, 3, 7, 100), (7, 64)),
                                                    ((2, 1, 3, 64), (2, 3, 64))])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_rotary(self, shape, freqs_shape, dtype):
        t, freqs = rand(*shape, dtype=dtype, seed=1), rand(*freqs_shape, seed=2, scale=10.0)
        expected = kernels.rotary_reference(t, freqs)
        assert_close(triton("rotary", t, freqs), expected, dtype)
        strided = t.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, N, Dh] viewed from [B, N, H, Dh]
        assert_close(triton("rotary", strided, freqs), expected, dtype)

    @pytest.mark.parametrize("batch, n, heads, dim, rot", [(2, 5, 2, 64, 64), (1, 3, 3, 100, 64), (1, 1, 1, 64, 64)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("rotary_heads", [None, 1])
    def test_rotary_qkv(self, batch, n, heads, dim, rot, dtype, rotary_heads):
        qkv = rand(batch, n, 3 * heads * dim, dtype=dtype, seed=1)
        cos, sin = kernels.rope_tables(rand(1, n + 2, rot, seed=2, scale=10.0))
        expected = kernels.rotary_qkv_reference(qkv, heads, cos, sin, rotary_heads=rotary_heads)
        if rotary_heads is not None and heads > 1:  # heads past the first are q's and k's as projected
            plain = qkv.reshape(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
            assert torch.equal(expected[0][:, 1:], plain[0][:, 1:]) and torch.equal(expected[1][:, 1:], plain[1][:, 1:])
        actuals = triton("rotary_qkv", qkv, heads, cos, sin, rotary_heads=rotary_heads)
        for actual, wanted in zip(actuals, expected):
            assert actual.shape == (batch, heads, n, dim)
            assert_close(actual, wanted, dtype)
        with pytest.raises(ValueError):
            triton("rotary_qkv", qkv, heads, cos[:, : n - 1], sin[:, : n - 1])

    @pytest.mark.parametrize("shape", [(1, 5, 100), (2, 3, 64), (1, 2, 1024)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_cfg_euler(self, shape, dtype):
        x, pred_both = rand(*shape, dtype=dtype, seed=1), rand(2 * shape[0], *shape[1:], dtype=dtype, seed=2)
        expected = kernels.cfg_euler_reference(x, pred_both, 0.125, 2.0)
        # dt and cfg as the CUDA graph holds them (device tensors, 0-dim or one element) or as floats
        for dt, cfg in ((torch.tensor([0.125], dtype=dtype), torch.tensor(2.0, dtype=dtype)), (0.125, 2.0)):
            assert_close(triton("cfg_euler", x, pred_both, dt, cfg), expected, dtype)
        in_place = x.clone()
        assert triton("cfg_euler", in_place, pred_both, 0.125, 2.0, out=in_place) is in_place
        assert_close(in_place, expected, dtype)
        with pytest.raises(ValueError):
            triton("cfg_euler", x, pred_both[1:], 0.125, 2.0)

    @pytest.mark.parametrize("pe_attn_head", [None, 1])
    def test_dit_block_from_kernels_is_stock(self, pe_attn_head):
        block = stock_block(heads=3, dim_head=16, pe_attn_head=pe_attn_head)
        x, t, mask, rope = block_inputs(block)
        with torch.no_grad(), references_refused():
            actual = block_from_kernels(block, x, t, mask, rope, use_triton=True)
        with torch.no_grad():
            assert_close(actual, block(x, t, mask=mask, rope=rope), atol=2e-5)
