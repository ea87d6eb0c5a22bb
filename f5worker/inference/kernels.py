"""Fused Triton kernels for the elementwise chains of one F5-TTS DiT step.

Why this module exists: with the step replayed as a CUDA graph, launch overhead is gone, but each
DiT layer is still mostly small elementwise ops (AdaLN modulation around a LayerNorm, rotary
embedding of q and k, GELU, gated residual adds; counted with a torch dispatch mode on the CPU,
one DiTBlock with fast.py's fused attention runs 39 non-view ops, 6 of them matmuls or attention),
each a full read and write of the activations; each step then ends with the guidance mix and the
Euler update. Here each chain is one kernel: one read of its inputs, one write of its outputs.

Every public function has a plain-torch ``*_reference`` with the same signature next to it that
defines what it computes (tests prove the references equal f5-tts's and x_transformers' own
modules). The public function runs the Triton kernel when its tensors are on CUDA, or when
``use_triton=True`` (the tests force it under Triton's interpreter on the CPU); otherwise it
runs the reference. Inside the kernels all arithmetic is fp32 with one rounding to the output
dtype (fp16, bf16 or fp32); LayerNorm statistics are fp32, as torch's LayerNorm keeps them.

CUDA graphs: the wrappers only allocate outputs and launch (no host sync, no branch on tensor
values); step size and guidance strength may be device tensors, read inside the kernel. A kernel
compiles on its first call: run the step once before capturing it (fast.py's warm-up runs do).

On a GPU: nothing here has been run or timed on one (written on a machine without a GPU). Expected
from the code alone: per layer, the two modulated norms, the two gated residuals and the rotary
embedding of q and k become four kernels, each moving its tensors once; ``gelu_tanh`` saves at most
the bias pass (cuBLAS often adds a Linear's bias itself). Time it against the torch path first.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
try:
    import triton
    import triton.language as tl
except ImportError:  # a torch build without Triton (CPU-only wheels, some platforms): references only
    triton = tl = None

TRITON_AVAILABLE = triton is not None

log = logging.getLogger(__name__)

_FLAT_BLOCK = 1024  # elements per program in the flat kernels


def _jit(kernel):
    """``triton.jit`` where Triton is installed; without it the kernels are never launched."""
    return triton.jit(kernel) if TRITON_AVAILABLE else kernel


def _triton_wanted(use_triton: bool | None, tensor: torch.Tensor) -> bool:
    if use_triton is None:
        return tensor.is_cuda and TRITON_AVAILABLE
    if use_triton and not TRITON_AVAILABLE:
        raise RuntimeError("Triton is not installed")
    return use_triton


# --- LayerNorm + AdaLN modulation, gated residual ----------------------------------------------

@_jit
def _rows_kernel(x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, h_ptr, out_ptr, rows_per_batch, D,
                 gate_stride, shift_stride, scale_stride, eps,
                 RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    h = tl.load(x_ptr + row * D + cols, mask=keep, other=0.0).to(tl.float32)
    if RESIDUAL:
        gate = tl.load(gate_ptr + batch * gate_stride + cols, mask=keep, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * D + cols, mask=keep, other=0.0).to(tl.float32)
        stored = (h + gate * y).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + cols, stored, mask=keep)
        h = stored.to(tl.float32)  # the norm sees the stored h, as a separate LayerNorm would
    if NORM:
        mean = tl.sum(h, axis=0) / D
        centred = tl.where(keep, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
        shift = tl.load(shift_ptr + batch * shift_stride + cols, mask=keep, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + batch * scale_stride + cols, mask=keep, other=0.0).to(tl.float32)
        out = centred * rstd * (1.0 + scale) + shift
        tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=keep)


def _run_rows(x, gate, y, shift, scale, eps, residual: bool, norm: bool):
    """x, y [B, N, D]; gate, shift, scale [B, D] or None. Returns (h, out), either of them x if unused."""
    x = x.contiguous()
    batch, n, dim = x.shape
    h = torch.empty_like(x) if residual else x
    out = torch.empty_like(x) if norm else h
    if x.numel() == 0:
        return h, out
    # per-batch vectors may be chunks of one projection (row stride 6*D): only their last dim must be dense
    gate, shift, scale = (x if v is None else v if v.stride(-1) == 1 else v.contiguous()
                          for v in (gate, shift, scale))
    y = y.contiguous() if residual else x
    block = triton.next_power_of_2(dim)
    _rows_kernel[(batch * n,)](x, gate, y, shift, scale, h, out, n, dim,
                               gate.stride(0), shift.stride(0), scale.stride(0), eps,
                               RESIDUAL=residual, NORM=norm, BLOCK_D=block, num_warps=8 if block >= 2048 else 4)
    return h, out


def layernorm_modulate_reference(x, shift, scale, eps=1e-6, use_triton=None):
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def layernorm_modulate(x, shift, scale, eps=1e-6, use_triton=None):
    """LayerNorm (no affine) over the last dim of x [B, N, D], then ``* (1 + scale) + shift`` ([B, D])."""
    if not _triton_wanted(use_triton, x):
        return layernorm_modulate_reference(x, shift, scale, eps)
    return _run_rows(x, None, None, shift, scale, eps, residual=False, norm=True)[1]


def gated_residual_reference(x, gate, y, use_triton=None):
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


def gated_residual(x, gate, y, use_triton=None):
    """``x + gate[:, None] * y`` for x, y [B, N, D] and gate [B, D]."""
    if not _triton_wanted(use_triton, x):
        return gated_residual_reference(x, gate, y)
    return _run_rows(x, gate, y, None, None, 0.0, residual=True, norm=False)[0]


def gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps=1e-6, use_triton=None):
    h = gated_residual_reference(x, gate, y)
    return h, layernorm_modulate_reference(h, shift, scale, eps)


def gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps=1e-6, use_triton=None):
    """``h = x + gate * y`` and the modulated LayerNorm of h, in one pass: returns (h, out)."""
    if not _triton_wanted(use_triton, x):
        return gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps)
    return _run_rows(x, gate, y, shift, scale, eps, residual=True, norm=True)


# --- GELU (tanh approximation), optionally with the preceding Linear's bias --------------------

@_jit
def _gelu_tanh_kernel(x_ptr, bias_ptr, out_ptr, numel, D, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < numel
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % D, mask=keep, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi), as torch's GELU
    # tanh from exp(-2|z|): no overflow at any z
    decay = tl.exp(-2.0 * tl.abs(inner))
    tanh = (1.0 - decay) / (1.0 + decay)
    tanh = tl.where(inner >= 0, tanh, -tanh)
    tl.store(out_ptr + offs, (0.5 * x * (1.0 + tanh)).to(out_ptr.dtype.element_ty), mask=keep)


def gelu_tanh_reference(x, bias=None, use_triton=None):
    xf = x.float() if bias is None else x.float() + bias.float()
    return F.gelu(xf, approximate="tanh").to(x.dtype)


def gelu_tanh(x, bias=None, use_triton=None):
    """``GELU(x + bias, approximate="tanh")``; bias (optional) broadcasts over the last dim."""
    if not _triton_wanted(use_triton, x):
        return gelu_tanh_reference(x, bias)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        bias_or_x = x if bias is None else bias.contiguous()  # an unused pointer must still be a tensor
        _gelu_tanh_kernel[(triton.cdiv(x.numel(), _FLAT_BLOCK),)](x, bias_or_x, out, x.numel(), x.shape[-1],
                                                                  HAS_BIAS=bias is not None, BLOCK=_FLAT_BLOCK)
    return out


# --- rotary embedding (x_transformers' interleaved pairs) ---------------------------------------

@_jit
def _rotary_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, N, J, D, R, H, P, t_sb, t_sj, t_sn, o_sb, o_sj, o_sn,
                   tab_sb, tab_sn, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (batch, position): all J head slots there share one row of the tables. The
    # slots are groups of H heads (q's, then k's); the first P of each group are rotated, the
    # others copied (f5-tts's pe_attn_head), as are the dims past R.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    j = tl.arange(0, BLOCK_J)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    keep = (j < J) & (d < D)
    rotated = (d < R) & (j % H < P)
    src = t_ptr + b * t_sb + n * t_sn + j * t_sj
    x = tl.load(src + d, mask=keep, other=0.0).to(tl.float32)
    partner = tl.load(src + (d ^ 1), mask=keep & rotated, other=0.0).to(tl.float32)
    table = b * tab_sb + n * tab_sn + d
    cos = tl.load(cos_ptr + table, mask=d < R, other=1.0)
    sin = tl.load(sin_ptr + table, mask=d < R, other=0.0)
    # rotate_half on pairs (2i, 2i+1): (-x[2i+1], x[2i])
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    out = tl.where(rotated, x * cos + sign * partner * sin, x)
    tl.store(out_ptr + b * o_sb + n * o_sn + j * o_sj + d, out.to(out_ptr.dtype.element_ty), mask=keep)


def rope_tables(freqs):
    """fp32 (cos, sin) of x_transformers' rotary freqs ([N, R] or [Bf, N, R]) as [Bf, N, R]."""
    freqs = (freqs if freqs.dim() == 3 else freqs[None]).float()
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _rotate_half(t):
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _rotary_from_tables(t, cos, sin, rotary_heads: int | None = None):
    """fp32 apply_rotary_pos_emb on t [B, H, N, Dh] with tables [Bf, Nf, R] (last N positions), on
    the first ``rotary_heads`` heads (None: all), the others passed through."""
    if rotary_heads is not None:
        return torch.cat((_rotary_from_tables(t[:, :rotary_heads], cos, sin), t[:, rotary_heads:]), dim=1)
    rot, n = cos.shape[-1], t.shape[-2]
    cos, sin = cos[:, None, -n:], sin[:, None, -n:]
    head, rest = t[..., :rot].float(), t[..., rot:]
    return torch.cat(((head * cos + _rotate_half(head) * sin).to(t.dtype), rest), dim=-1)


def _launch_rotary(src, out, cos, sin, heads_dim: int, seq_dim: int, *, group: int | None = None,
                   rotary_heads: int | None = None):
    """src and out viewed as [B, ..., Dh]; heads_dim and seq_dim name the J and N dims of both. The
    J slots are groups of ``group`` heads (default: one group of all J), of which the first
    ``rotary_heads`` (default: all) are rotated."""
    batch, n, slots, dim, rot = src.shape[0], src.shape[seq_dim], src.shape[heads_dim], src.shape[-1], cos.shape[-1]
    if cos.shape[1] < n or rot > dim or rot % 2:
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit {n} positions of head dim {dim}")
    group = slots if group is None else group
    rotated = group if rotary_heads is None else min(rotary_heads, group)
    if src.numel() == 0:
        return
    cos, sin = cos[:, -n:], sin[:, -n:]  # x_transformers takes the last N positions
    tab_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    block_j, block_d = triton.next_power_of_2(slots), triton.next_power_of_2(dim)
    _rotary_kernel[(batch * n,)](src, cos, sin, out, n, slots, dim, rot, group, rotated,
                                 src.stride(0), src.stride(heads_dim), src.stride(seq_dim),
                                 out.stride(0), out.stride(heads_dim), out.stride(seq_dim),
                                 tab_sb, cos.stride(1), BLOCK_J=block_j, BLOCK_D=block_d,
                                 num_warps=8 if block_j * block_d >= 2048 else 4)


def rotary_reference(t, freqs, use_triton=None):
    cos, sin = rope_tables(freqs)
    return _rotary_from_tables(t, cos, sin)


def rotary(t, freqs, use_triton=None):
    """x_transformers' ``apply_rotary_pos_emb(t, freqs, 1.0)`` for t [B, H, N, Dh]: pairs (2i, 2i+1)
    of the first R dims rotated by freqs' angles ([N', R] or [Bf, N', R], last N rows used), the
    rest of each head passed through."""
    if not _triton_wanted(use_triton, t):
        return rotary_reference(t, freqs)
    t = t if t.stride(-1) == 1 else t.contiguous()
    cos, sin = rope_tables(freqs)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    _launch_rotary(t, out, cos, sin, heads_dim=1, seq_dim=2)
    return out


def rotary_qkv_reference(qkv, heads, cos, sin, use_triton=None, *, rotary_heads: int | None = None):
    batch, n = qkv.shape[:2]
    q, k, v = qkv.reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return _rotary_from_tables(q, cos, sin, rotary_heads), _rotary_from_tables(k, cos, sin, rotary_heads), v


def rotary_qkv(qkv, heads, cos, sin, use_triton=None, *, rotary_heads: int | None = None):
    """The fused QKV projection ([B, N, 3*H*Dh], q then k then v) split into q, k, v [B, H, N, Dh],
    q and k rotated in one kernel; (cos, sin) from ``rope_tables``, computed once per sample. Only
    the first ``rotary_heads`` heads of q and of k are rotated (f5-tts's ``pe_attn_head``; None: all)."""
    if not _triton_wanted(use_triton, qkv):
        return rotary_qkv_reference(qkv, heads, cos, sin, rotary_heads=rotary_heads)
    batch, n = qkv.shape[:2]
    packed = qkv.contiguous().view(batch, n, 3, heads, -1)
    dim = packed.shape[-1]
    rotated = torch.empty(batch, n, 2, heads, dim, dtype=qkv.dtype, device=qkv.device)
    qk_in = packed.view(batch, n, 3 * heads, dim)[:, :, : 2 * heads]
    _launch_rotary(qk_in, rotated.view(batch, n, 2 * heads, dim), cos, sin, heads_dim=2, seq_dim=1, group=heads,
                   rotary_heads=rotary_heads)
    q, k = rotated.permute(2, 0, 3, 1, 4)
    return q, k, packed[:, :, 2].transpose(1, 2)


# --- classifier-free guidance and the Euler update ---------------------------------------------

@_jit
def _cfg_euler_kernel(x_ptr, pred_ptr, out_ptr, numel, dt, cfg,
                      DT_IN_MEMORY: tl.constexpr, CFG_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < numel
    if DT_IN_MEMORY:
        dt = tl.load(dt).to(tl.float32)
    if CFG_IN_MEMORY:
        cfg = tl.load(cfg).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    null = tl.load(pred_ptr + numel + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + dt * (pred + (pred - null) * cfg)).to(out_ptr.dtype.element_ty), mask=keep)


def cfg_euler_reference(x, pred_both, dt, cfg, out=None, use_triton=None):
    pred, null = pred_both.float().chunk(2, dim=0)
    step = (x.float() + torch.as_tensor(dt).float() * (pred + (pred - null) * torch.as_tensor(cfg).float()))
    return step.to(x.dtype) if out is None else out.copy_(step)


def cfg_euler(x, pred_both, dt, cfg, out=None, use_triton=None):
    """``x + dt * (pred + (pred - null) * cfg)`` with pred_both [2B, ...] = (cond, uncond) stacked;
    dt and cfg are floats or one-element device tensors (read in the kernel, no host sync).
    ``out=x`` updates x in place."""
    if not _triton_wanted(use_triton, x):
        return cfg_euler_reference(x, pred_both, dt, cfg, out)
    if pred_both.shape[0] != 2 * x.shape[0] or pred_both.shape[1:] != x.shape[1:]:
        raise ValueError(f"pred_both {tuple(pred_both.shape)} is not two stacked copies of x {tuple(x.shape)}")
    x, pred_both = x.contiguous(), pred_both.contiguous()
    out = torch.empty_like(x) if out is None else out
    if not out.is_contiguous() or out.shape != x.shape:  # the kernel writes flat offsets
        raise ValueError("cfg_euler writes a dense tensor of x's shape")
    if x.numel():
        _cfg_euler_kernel[(triton.cdiv(x.numel(), _FLAT_BLOCK),)](x, pred_both, out, x.numel(), dt, cfg,
                                DT_IN_MEMORY=torch.is_tensor(dt), CFG_IN_MEMORY=torch.is_tensor(cfg),
                                BLOCK=_FLAT_BLOCK)
    return out
