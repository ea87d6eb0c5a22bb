"""Attention for the fast DiT path: one padding plan per sample, dense, masked or variable-length.

Why this module exists: a padded batch asks SDPA for a masked attention, and with a mask torch
runs its memory-efficient kernel, not flash. Variable-length attention drops the padding instead:
the valid tokens of every row are packed one after the other ([total, H, Dh]) and flash attends
within each row's segment (cumulative sequence lengths), so each item computes what it would alone.

Under CUDA graphs every shape must be fixed: the packed buffer always holds all B*N tokens (valid
ones first, row by row, then the padding), and only the index tensors and segment bounds change
between samples. Those are computed once per sample (``plan_attention``), without a host sync, and
copied into the graph's own plan (``AttentionPlan.copy_``). Flash leaves the packed rows past the
last segment unwritten, so padded positions come back undefined: ``zero_padding`` clears them after
the output projection, as the masked path clears its padded rows.

Kinds: ``dense`` (no padding: no mask at all), ``masked`` (SDPA with a ``b 1 1 n`` mask) and
``varlen`` (torch's flash kernel, ``aten::_flash_attention_forward`` with cumulative sequence
lengths, as torch's own nested-tensor SDPA calls it; CUDA, fp16/bf16, compute capability 8+).
Elsewhere ``varlen`` runs a per-segment SDPA reference, which is how the CPU tests check the
packing. The flash call itself has not been run here (no GPU); tests/test_gpu.py compares it with
the masked path on a GPU.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from f5worker.model.dit import apply_rotary_heads

log = logging.getLogger(__name__)

KINDS = ("dense", "masked", "varlen")
VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def attention_kind(padded: bool, device: torch.device, dtype: torch.dtype, varlen: bool | None = None) -> str:
    """``varlen=None`` picks variable-length attention where torch's flash kernel runs it."""
    if not padded:
        return "dense"
    if varlen is None:
        device = torch.device(device)
        varlen = (device.type == "cuda" and dtype in VARLEN_DTYPES
                  and torch.cuda.get_device_capability(device)[0] >= 8)
    return "varlen" if varlen else "masked"


class AttentionPlan:
    """One sample's attention layout for rows ``mask`` [R, N] (True = a real frame)."""

    def __init__(self, mask: torch.Tensor | None, kind: str):
        if kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, not {kind!r}")
        if (mask is None) != (kind == "dense"):
            raise ValueError("dense attention takes no mask, and masked or varlen attention needs one")
        self.kind = kind
        self.padding = None if mask is None else ~mask.unsqueeze(-1)  # [R, N, 1], for masked_fill
        # its own tensor: loading another sample (copy_) must not write into the caller's mask
        self.sdpa_mask = mask[:, None, None, :].clone() if kind == "masked" else None
        if kind == "varlen":
            rows, n = mask.shape
            valid = mask.reshape(-1)
            total = valid.sum()
            # packed position of each token: valid tokens first in order, then the padding in order
            dest = torch.where(valid, valid.cumsum(0) - 1, total + (~valid).cumsum(0) - 1)
            source = torch.empty_like(dest).scatter_(0, dest, torch.arange(dest.numel(), device=dest.device))
            self.unpack_index = dest  # token i of the [R*N] layout sits at packed row dest[i]
            self.pack_row, self.pack_pos = source // n, source % n
            self.cum_seq = F.pad(mask.sum(dim=1).cumsum(0), (1, 0)).to(torch.int32)
            self.max_len = n

    def tensors(self) -> list[torch.Tensor]:
        names = ("padding", "sdpa_mask", "unpack_index", "pack_row", "pack_pos", "cum_seq")
        return [t for t in (getattr(self, name, None) for name in names) if t is not None]

    def copy_(self, other: AttentionPlan) -> None:
        """Take another sample's layout into these tensors (a captured graph reads these)."""
        if other.kind != self.kind:
            raise ValueError(f"cannot load a {other.kind} plan into a {self.kind} one")
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)

    def zero_padding(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.padding is None else out.masked_fill(self.padding, 0.0)


def varlen_attention_reference(q, k, v, cum_seq, max_len: int):
    """Each segment [cum_seq[i], cum_seq[i+1]) of the packed [T, H, Dh] rows attends to itself;
    rows past the last segment stay zero (flash leaves them unwritten)."""
    out = torch.zeros_like(q)
    bounds = cum_seq.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - start > max_len:
            raise ValueError(f"a segment of {end - start} tokens exceeds max_len {max_len}")
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, Dh]
        out[start:end] = F.scaled_dot_product_attention(*seg).transpose(0, 1)
    return out


def varlen_attention(q, k, v, cum_seq, max_len: int):
    """Packed q, k, v [T, H, Dh]: torch's flash kernel on CUDA, the per-segment reference elsewhere."""
    if not q.is_cuda:
        return varlen_attention_reference(q, k, v, cum_seq, max_len)
    # (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask)
    out = torch.ops.aten._flash_attention_forward(q, k, v, cum_seq, cum_seq, max_len, max_len, 0.0, False, False,
                                                  scale=q.shape[-1] ** -0.5)[0]
    return out


def attend(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    """Attention of q, k, v [B, H, N, Dh] (any strides) under the plan; returns [B, N, H*Dh]."""
    batch, heads, n, dim = q.shape
    if plan.kind != "varlen":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.sdpa_mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, n, heads * dim)
    # advanced indices around a slice put the token axis first: [B*N, H, Dh], dense
    packed = [t[plan.pack_row, :, plan.pack_pos] for t in (q, k, v)]
    out = varlen_attention(*packed, plan.cum_seq, plan.max_len)
    return out.index_select(0, plan.unpack_index).view(batch, n, heads * dim)


def fused_qkv(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """The q, k, v projections as one (weight, bias): cached by FusedAttnProcessor, else built."""
    proc = attn.processor
    if isinstance(proc, FusedAttnProcessor):
        return proc.qkv_weight, proc.qkv_bias
    return (torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]),
            torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))


def rotary_heads(attn) -> int | None:
    """How many leading heads an attention layer rotates (f5-tts's ``pe_attn_head``; None: all).
    Every processor the worker installs or builds (own, stock, fused) keeps it under that name."""
    return attn.processor.pe_attn_head


def split_rotate(attn, qkv, freqs):
    """The fused projection [B, N, 3*H*Dh] as q, k, v [B, H, N, Dh], q and k rotated (plain torch)."""
    batch, head_dim, heads = qkv.shape[0], attn.inner_dim // attn.heads, rotary_heads(attn)
    query, key, value = qkv.view(batch, -1, 3, attn.heads, head_dim).permute(2, 0, 3, 1, 4)
    return apply_rotary_heads(query, freqs, heads), apply_rotary_heads(key, freqs, heads), value


class FusedAttnProcessor:
    """f5-tts's AttnProcessor (torch backend) with QKV fused and the mask broadcast."""

    def __init__(self, attn, pe_attn_head=None):
        if attn.q_norm is not None:
            raise ValueError("fused attention supports f5-tts's DiT layouts without qk_norm")
        self.pe_attn_head = pe_attn_head
        self.qkv_weight, self.qkv_bias = (t.detach() for t in fused_qkv(attn))

    def __call__(self, attn, x, mask=None, rope=None):
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        if rope is None:
            head_dim = attn.inner_dim // attn.heads
            q, k, v = qkv.view(x.shape[0], -1, 3, attn.heads, head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = split_rotate(attn, qkv, rope[0])
        plan = AttentionPlan(mask, "dense" if mask is None else "masked")
        return plan.zero_padding(attn.to_out[0](attend(q, k, v, plan)))


def install_fused_attention(transformer) -> None:
    for block in transformer.transformer_blocks:
        block.attn.processor = FusedAttnProcessor(block.attn, rotary_heads(block.attn))
