"""The F5-TTS DiT backbone for inference, in plain torch, loading f5-tts checkpoints by key.

Why this module exists: f5-tts's DiT imports x_transformers (and through it einx and torch._dynamo)
and, next to it, the text front end's dictionaries: seconds of a cold start for a few hundred lines
of model. This module computes the same function with the same module tree and parameter and buffer
names, importing only torch, so a checkpoint (or a stock model's state dict) loads into it strictly.
It covers every DiT layout f5-tts ships (v1 Base and Small; v0 Base and Small, which rotate the
first attention head only, ``pe_attn_head: 1``, and leave text padding unmasked);
``unsupported_reason`` says what it does not cover, and the engine falls back to stock f5-tts for that.

Numerics follow stock op for op (tests compare with f5-tts in fp32 and fp16). That includes stock's
precision quirks: the rotary ``inv_freq`` and the text ``freqs_cis`` are buffers cast with the model,
so in fp16 the rotary angles are computed in fp16, as stock computes them.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Arch settings implemented only at these values (anything else is stock f5-tts's job) ...
FIXED_SETTINGS = {
    "text_embedding_average_upsampling": (False,),
    "qk_norm": (None,),
    "attn_backend": ("torch",),
    "long_skip_connection": (False,),
}
# ... and those implemented at any value. checkpoint_activations only trades memory in a backward
# pass; the forward computes the same with it on or off.
FREE_SETTINGS = frozenset({
    "dim", "depth", "heads", "dim_head", "dropout", "ff_mult", "mel_dim", "text_num_embeds", "text_dim",
    "text_mask_padding", "conv_layers", "attn_mask_enabled", "checkpoint_activations", "pe_attn_head",
})
TEXT_MAX_POS = 8192  # stock's text position table: ~87 s of 24 kHz audio


def unsupported_reason(arch: dict) -> str | None:
    """Why this module cannot build ``arch`` (an f5-tts config's model.arch), or None if it can."""
    for key, value in arch.items():
        if key in FIXED_SETTINGS and value not in FIXED_SETTINGS[key]:
            return (f"the worker's own DiT implements {key} only as {FIXED_SETTINGS[key][0]!r}, "
                    f"and the config sets {value!r}")
        if key not in FIXED_SETTINGS and key not in FREE_SETTINGS:
            return f"the worker's own DiT does not know the arch setting {key!r}"
    return None


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """f5-tts's sinusoidal text position table, [end, dim]: cosines then sines."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    angles = torch.outer(torch.arange(end, device=freqs.device), freqs).float()
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): x_transformers' interleaved pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x_transformers' ``apply_rotary_pos_emb(t, freqs, 1.0)``; t is [b, h, n, d] or [b, n, d]."""
    rot_dim, seq_len, dtype = freqs.shape[-1], t.shape[-2], t.dtype
    freqs = freqs[:, -seq_len:, :]
    if t.ndim == 4 and freqs.ndim == 3:
        freqs = freqs.unsqueeze(1)  # one table for every head
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    rot = rot * freqs.cos() + rotate_half(rot) * freqs.sin()
    out = torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
    return out.to(dtype)


def apply_rotary_heads(t: torch.Tensor, freqs: torch.Tensor, heads: int | None) -> torch.Tensor:
    """Rotary on the first ``heads`` heads of t [b, h, n, d], the others passed through (f5-tts's
    ``pe_attn_head``; None rotates every head)."""
    if heads is None:
        return apply_rotary(t, freqs)
    return torch.cat((apply_rotary(t[:, :heads], freqs), t[:, heads:]), dim=1)


class RotaryEmbedding(nn.Module):
    """x_transformers' RotaryEmbedding as DiT builds it (no xpos, no interpolation)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        # Persistent, as in x_transformers: checkpoints carry rotary_embed.inv_freq.
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward_from_seq_len(self, seq_len: int):
        return self.forward(torch.arange(seq_len, device=self.inv_freq.device))

    def forward(self, t: torch.Tensor):
        """(freqs [1, n, dim], 1.0): each angle repeated for its pair, in the buffer's dtype."""
        if t.ndim == 1:
            t = t.unsqueeze(0)
        # A plain product, not einsum: autocast leaves it alone, as x_transformers' disable_autocast does.
        freqs = t.type_as(self.inv_freq).unsqueeze(-1) * self.inv_freq
        return torch.stack((freqs, freqs), dim=-1).flatten(-2), 1.0


class SinusPositionEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        half_dim = self.dim // 2
        step = math.log(10000) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=x.device).float() * -step)
        angles = scale * x.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_embed_dim: int = 256):
        super().__init__()
        self.time_embed = SinusPositionEmbedding(freq_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(self.time_embed(timestep).to(timestep.dtype))


class GRN(nn.Module):
    """Global response normalisation (over the sequence axis, as f5-tts applies it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.grn = GRN(intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        return x + self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(h)))))


def rows_alone(embed: Callable[[torch.Tensor, int, bool], torch.Tensor]):
    """A text embedding's forward taking each row's own length (a tensor ``seq_len``, a batch of
    items), made of ``embed(text, length, drop_text)`` at one length: each row is embedded alone at
    its length, then zero-padded, so it is what it would be in a call of its own. Embedded at the
    batch's longest length, as stock f5-tts's batched forward does, a row changed with the longest
    row beside it: the text blocks' convolutions read past its end (unmasked in F5TTS_Base's
    layout), and GRN's norm spans the padding (in every layout)."""
    def forward(text: torch.Tensor, seq_len, drop_text: bool = False) -> torch.Tensor:
        if not torch.is_tensor(seq_len):
            return embed(text, int(seq_len), drop_text)
        lengths = [int(n) for n in seq_len.tolist()]
        rows = [embed(text[i:i + 1], n, drop_text) for i, n in enumerate(lengths)]
        return torch.cat([F.pad(row, (0, 0, 0, max(lengths) - n)) for row, n in zip(rows, lengths)])

    return forward


class TextEmbedding(nn.Module):
    def __init__(self, text_num_embeds: int, text_dim: int, mask_padding: bool = True, conv_layers: int = 0,
                 conv_mult: int = 2):
        super().__init__()
        self.text_embed = nn.Embedding(text_num_embeds + 1, text_dim)  # token 0 is the filler
        self.mask_padding = mask_padding
        self.extra_modeling = conv_layers > 0
        if self.extra_modeling:
            self.precompute_max_pos = TEXT_MAX_POS
            # Not persistent, as in stock: checkpoints do not carry it.
            self.register_buffer("freqs_cis", precompute_freqs_cis(text_dim, TEXT_MAX_POS), persistent=False)
            self.text_blocks = nn.Sequential(*[ConvNeXtV2Block(text_dim, text_dim * conv_mult)
                                               for _ in range(conv_layers)])

    def forward(self, text: torch.Tensor, seq_len, drop_text: bool = False) -> torch.Tensor:
        """[b, nt] token ids (-1 = batch padding) -> [b, n, text_dim]; n is seq_len or its maximum
        (a tensor of each row's length: ``rows_alone``)."""
        return rows_alone(self._embed)(text, seq_len, drop_text)

    def _embed(self, text: torch.Tensor, seq_len: int, drop_text: bool) -> torch.Tensor:
        """[b, nt] -> [b, seq_len, text_dim], every row at that one length (stock's forward)."""
        text = text + 1  # batch padding -1 becomes the filler 0
        text = text[:, :seq_len]  # more tokens than frames: cut
        text = F.pad(text, (0, seq_len - text.shape[1]), value=0)
        filler = (text == 0).unsqueeze(-1) if self.mask_padding else None
        if drop_text:
            text = torch.zeros_like(text)
        h = self.text_embed(text)
        if self.extra_modeling:
            h = h + self.freqs_cis[:seq_len, :]
            if filler is None:
                h = self.text_blocks(h)
            else:
                h = h.masked_fill(filler, 0.0)
                for block in self.text_blocks:
                    h = block(h).masked_fill(filler, 0.0)
        return h


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2), nn.Mish(),
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2), nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = ~mask.unsqueeze(1) if mask is not None else None  # [b, 1, n]
        x = x.transpose(1, 2)
        if padding is not None:
            x = x.masked_fill(padding, 0.0)
        for layer in self.conv1d:
            x = layer(x)
            if padding is not None and isinstance(layer, nn.Conv1d):  # padded frames must not leak in
                x = x.masked_fill(padding, 0.0)
        return x.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, text_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(mel_dim * 2 + text_dim, out_dim)
        self.conv_pos_embed = ConvPositionEmbedding(dim=out_dim)

    def forward(self, x, cond, text_embed, drop_audio_cond: bool = False, audio_mask=None) -> torch.Tensor:
        if drop_audio_cond:
            cond = torch.zeros_like(cond)
        x = self.proj(torch.cat((x, cond, text_embed), dim=-1))
        return self.conv_pos_embed(x, mask=audio_mask) + x


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNorm_Final(nn.Module):  # noqa: N801 - stock's name
    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        scale, shift = self.linear(self.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU(approximate="tanh"))
        self.ff = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.ff(x)


class AttnProcessor:
    """f5-tts's AttnProcessor, torch backend: rotary on the first ``pe_attn_head`` heads (None: on
    every head). ``attn_mask_enabled`` masks padded keys (f5-tts's configs leave it off; the sampler
    turns it on for padded batches)."""

    def __init__(self, attn_mask_enabled: bool = False, pe_attn_head: int | None = None):
        self.pe_attn_head = pe_attn_head
        self.attn_backend = "torch"
        self.attn_mask_enabled = attn_mask_enabled

    def __call__(self, attn: Attention, x, mask=None, rope=None) -> torch.Tensor:
        batch, head_dim = x.shape[0], attn.inner_dim // attn.heads

        def split_heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(attn.to_q(x)), split_heads(attn.to_k(x)), split_heads(attn.to_v(x))
        if rope is not None:
            heads = self.pe_attn_head
            query, key = apply_rotary_heads(query, rope[0], heads), apply_rotary_heads(key, rope[0], heads)
        # Broadcast [b, 1, 1, n], not expanded to [b, h, n, n]: same result, lets SDPA pick a fused kernel.
        attn_mask = mask[:, None, None, :] if self.attn_mask_enabled and mask is not None else None
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.inner_dim)))
        if mask is not None:
            out = out.masked_fill(~mask.unsqueeze(-1), 0.0)
        return out


class Attention(nn.Module):
    def __init__(self, processor: AttnProcessor, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.processor = processor
        self.dim, self.heads, self.inner_dim, self.dropout = dim, heads, dim_head * heads, dropout
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_dim)
        self.to_v = nn.Linear(dim, self.inner_dim)
        self.q_norm = self.k_norm = None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim), nn.Dropout(dropout)])

    def forward(self, x, mask=None, rope=None):
        return self.processor(self, x, mask=mask, rope=rope)


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, ff_mult=4, dropout=0.1, attn_mask_enabled=False, pe_attn_head=None):
        super().__init__()
        self.attn_norm = AdaLayerNorm(dim)
        self.attn = Attention(AttnProcessor(attn_mask_enabled, pe_attn_head), dim=dim, heads=heads, dim_head=dim_head,
                              dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, mult=ff_mult, dropout=dropout)

    def forward(self, x, t, mask=None, rope=None):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, emb=t)
        x = x + gate_msa.unsqueeze(1) * self.attn(x=norm, mask=mask, rope=rope)
        norm = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(norm)


class DiT(nn.Module):
    """f5-tts's DiT (same constructor arguments, module tree, state-dict keys and forward)."""

    def __init__(self, *, dim, depth=8, heads=8, dim_head=64, dropout=0.1, ff_mult=4, mel_dim=100,
                 text_num_embeds=256, text_dim=None, text_mask_padding=True, text_embedding_average_upsampling=False,
                 qk_norm=None, conv_layers=0, pe_attn_head=None, attn_backend="torch", attn_mask_enabled=False,
                 long_skip_connection=False, checkpoint_activations=False):
        super().__init__()
        reason = unsupported_reason(dict(
            text_embedding_average_upsampling=text_embedding_average_upsampling, qk_norm=qk_norm,
            attn_backend=attn_backend, long_skip_connection=long_skip_connection))
        if reason:
            raise ValueError(reason)
        text_dim = mel_dim if text_dim is None else text_dim
        self.time_embed = TimestepEmbedding(dim)
        self.text_embed = TextEmbedding(text_num_embeds, text_dim, mask_padding=text_mask_padding,
                                        conv_layers=conv_layers)
        self.input_embed = InputEmbedding(mel_dim, text_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.dim, self.depth = dim, depth
        self.transformer_blocks = nn.ModuleList([
            DiTBlock(dim, heads, dim_head, ff_mult=ff_mult, dropout=dropout, attn_mask_enabled=attn_mask_enabled,
                     pe_attn_head=pe_attn_head)
            for _ in range(depth)])
        self.norm_out = AdaLayerNorm_Final(dim)
        self.proj_out = nn.Linear(dim, mel_dim)
        # A fresh model starts as stock's does: modulation and output projections at zero.
        for layer in [b.attn_norm.linear for b in self.transformer_blocks] + [self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _text_cache(self) -> dict:
        # Per thread, as stock's: two threads sampling with one model must not read each other's text.
        # Made on first use, so a model that never caches stays deep-copyable.
        local = self.__dict__.get("_cache_local")
        if local is None:
            local = self.__dict__["_cache_local"] = threading.local()
        if not hasattr(local, "embeds"):
            local.embeds = {}
        return local.embeds

    def clear_cache(self) -> None:
        self._text_cache().clear()

    def get_input_embed(self, x, cond, text, drop_audio_cond=False, drop_text=False, cache=True, audio_mask=None):
        embeds = self._text_cache() if cache else {}
        text_embed = embeds.get(drop_text)
        if text_embed is None:
            seq_len = x.shape[1] if audio_mask is None else audio_mask.sum(dim=1)
            text_embed = embeds[drop_text] = self.text_embed(text, seq_len=seq_len, drop_text=drop_text)
        return self.input_embed(x, cond, text_embed, drop_audio_cond=drop_audio_cond, audio_mask=audio_mask)

    def forward(self, x, cond, text, time, mask=None, drop_audio_cond=False, drop_text=False, cfg_infer=False,
                cache=False):
        """Predicted flow [b, n, mel_dim]; with cfg_infer, conditioned rows then unconditioned ([2b, ...])."""
        batch, seq_len = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.repeat(batch)
        t = self.time_embed(time)
        if cfg_infer:  # both guidance passes in one batch: b -> 2b
            x = torch.cat((self.get_input_embed(x, cond, text, False, False, cache, mask),
                           self.get_input_embed(x, cond, text, True, True, cache, mask)), dim=0)
            t = torch.cat((t, t), dim=0)
            mask = torch.cat((mask, mask), dim=0) if mask is not None else None
        else:
            x = self.get_input_embed(x, cond, text, drop_audio_cond, drop_text, cache, mask)
        rope = self.rotary_embed.forward_from_seq_len(seq_len)
        for block in self.transformer_blocks:
            x = block(x, t, mask=mask, rope=rope)
        return self.proj_out(self.norm_out(x, t))
