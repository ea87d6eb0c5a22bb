"""The fast DiT path: the same function as f5-tts's DiT forward, with the GPU kept busy.

Why this module exists: stock f5-tts spends most of an H100's time launching kernels, and once
launches are gone (CUDA graphs) most of what is left is unfused elementwise work and masked
attention (bench/RESULTS.md has the measured figures). This path changes how the step is run, not
what it computes:

- ``BucketedStepRunner`` captures a whole ODE step (DiT with classifier-free guidance and the Euler
  update, step index advanced on the device) into a CUDA graph per (batch, frames) bucket, then
  replays it ``nfe_step`` times. Buckets are captured on first use (tens of milliseconds) and share
  one memory pool, so a new length never re-captures an old one and memory stays one step's worth;
- per sample, not per step or layer: the text embeddings, the rotary tables and the attention
  plan (f5worker.attention: a padded batch runs variable-length flash attention on the valid
  tokens only, where CUDA and fp16/bf16 allow; masked SDPA elsewhere, no mask without padding);
- two step bodies. *Unfused* (what the worker serves on from the start): DiTBlock's own torch ops
  with QKV fused into one matmul. *Fused* (``fused=True``, or ``use_fused_kernels()`` once
  ``warm_fused_kernels`` has compiled them): each layer's elementwise chains as the Triton kernels of
  f5worker.kernels (modulated LayerNorm; rotary on the fused QKV; GELU with the bias; gated residual
  fused with the next modulated norm, the last one with the final norm) and the guidance mix with
  the Euler update as one kernel.

Padding to a bucket is exact: padded frames are masked out of attention and convolutions, so they
do not change the valid frames (tests compare with stock f5-tts on the same weights, and the fused
and variable-length paths with the unfused masked one, on the CPU; the Triton kernels under
Triton's interpreter).

Measured vs not: nothing of the fused step or of variable-length attention has been run or timed on
a GPU yet (written without one): tests/test_gpu.py checks both there; speed is for the bench to say.
"""
from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from f5worker import kernels
from f5worker.attention import (AttentionPlan, FusedAttnProcessor, attend, attention_kind, fused_qkv,
                                install_fused_attention, split_rotate)
from f5worker.options import MAX_NFE_STEP

log = logging.getLogger(__name__)

__all__ = ["BucketedStepRunner", "FusedAttnProcessor", "bucket_batch", "bucket_frames", "dit_step",
           "euler_integrate", "warm_fused_kernels"]

FRAME_BUCKET = 128  # batches are compute-bound: pad little
SINGLE_FRAME_BUCKET = 512  # one job is launch-bound: a step costs about the same at any length, so
# few buckets, all captured while the worker is idle, beat many captured during jobs
SINGLE_MAX_FRAMES = 3072  # ~33 s: past f5-tts's chunk lengths (22 s of text plus the reference)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
# Triton specialises integer arguments on divisibility by 16: every bucket's frame count is a
# multiple of 16, so warming on 16 frames compiles the specialisations the buckets use.
WARM_FRAMES = 16


def bucket_frames(frames: int, batch: int = 2) -> int:
    step = SINGLE_FRAME_BUCKET if batch == 1 else FRAME_BUCKET
    return -(-frames // step) * step


def bucket_batch(batch: int) -> int:
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    return batch


class _SampleState:
    """Per-sample tensors the step reads: fixed for all steps of one integration. ``mask`` None means
    no padding; ``attention`` is the attention kind (default: masked SDPA wherever there is a mask)."""

    def __init__(self, transformer, step_cond, text, mask, cfg: bool, attention: str | None = None):
        tr = transformer
        frames = step_cond.shape[1]
        seq_len = frames if mask is None else mask.sum(dim=1)

        def embed(drop_text):
            # f5-tts embeds up to the longest item; zeros beyond it, as for any shorter item
            te = tr.text_embed(text, seq_len=seq_len, drop_text=drop_text)
            return F.pad(te, (0, 0, 0, frames - te.shape[1]))

        self.text_cond = embed(False)
        self.text_uncond = embed(True) if cfg else None
        self.rope = tr.rotary_embed.forward_from_seq_len(frames)
        self.cos, self.sin = kernels.rope_tables(self.rope[0])  # fp32, for the fused rotary kernel
        rows = None if mask is None else torch.cat((mask, mask)) if cfg else mask
        self.attention = AttentionPlan(rows, attention or ("dense" if mask is None else "masked"))

    def copy_(self, other: _SampleState) -> None:
        """Take another sample's tensors into these (a captured graph reads these very tensors)."""
        for name in ("text_cond", "text_uncond", "cos", "sin"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(other, name))
        self.attention.copy_(other.attention)


def _attention(attn, x, state: _SampleState, fused: bool, use_triton):
    qkv = F.linear(x, *fused_qkv(attn))
    if fused:
        q, k, v = kernels.rotary_qkv(qkv, attn.heads, state.cos, state.sin, use_triton=use_triton)
    else:
        q, k, v = split_rotate(attn, qkv, state.rope[0])
    return state.attention.zero_padding(attn.to_out[0](attend(q, k, v, state.attention)))


def _blocks_unfused(tr, h, t, state):
    for block in tr.transformer_blocks:
        # DiTBlock.forward, op for op, with the attention reading the per-sample plan
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm(h, emb=t)
        h = h + gate_msa.unsqueeze(1) * _attention(block.attn, norm, state, False, None)
        norm = block.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp.unsqueeze(1) * block.ff(norm)
    return tr.proj_out(tr.norm_out(h, t))


def _blocks_fused(tr, h, t, state, use_triton):
    """The same function from the kernels: each gated residual also computes the next modulated
    norm (the next layer's attention norm, or after the last layer the final norm)."""
    silu_t = F.silu(t)  # every AdaLayerNorm applies SiLU to the same t
    blocks = tr.transformer_blocks
    mods = [block.attn_norm.linear(silu_t).chunk(6, dim=1) for block in blocks]
    final_scale, final_shift = tr.norm_out.linear(silu_t).chunk(2, dim=1)
    norms = [(mod[0], mod[1], block.attn_norm.norm.eps) for mod, block in zip(mods[1:], blocks[1:])]
    norms.append((final_shift, final_scale, tr.norm_out.norm.eps))
    norm = kernels.layernorm_modulate(h, mods[0][0], mods[0][1], blocks[0].attn_norm.norm.eps, use_triton=use_triton)
    for block, mod, (next_shift, next_scale, next_eps) in zip(blocks, mods, norms):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        ff_in, ff_out = block.ff.ff[0][0], block.ff.ff[2]
        out = _attention(block.attn, norm, state, True, use_triton)
        h, norm = kernels.gated_residual_layernorm_modulate(h, gate_msa, out, shift_mlp, scale_mlp,
                                                            block.ff_norm.eps, use_triton=use_triton)
        hidden = kernels.gelu_tanh(F.linear(norm, ff_in.weight), ff_in.bias, use_triton=use_triton)
        h, norm = kernels.gated_residual_layernorm_modulate(h, gate_mlp, ff_out(hidden), next_shift, next_scale,
                                                            next_eps, use_triton=use_triton)
    return tr.proj_out(norm)


def dit_flow(transformer, x, step_cond, mask, time, state: _SampleState, fused=False, use_triton=None):
    """DiT.forward(cfg_infer=True) with the per-sample state: (cond, uncond) rows stacked when
    guided, else the conditioned flow alone."""
    tr = transformer
    t = tr.time_embed(time.expand(x.shape[0]))
    h = tr.input_embed(x, step_cond, state.text_cond, drop_audio_cond=False, audio_mask=mask)
    if state.text_uncond is not None:
        x_uncond = tr.input_embed(x, step_cond, state.text_uncond, drop_audio_cond=True, audio_mask=mask)
        h, t = torch.cat((h, x_uncond)), torch.cat((t, t))
    return _blocks_fused(tr, h, t, state, use_triton) if fused else _blocks_unfused(tr, h, t, state)


def dit_step(transformer, x, step_cond, mask, time, state: _SampleState, cfg_strength, fused=False, use_triton=None):
    """The flow after the guidance mix (as CFM.sample's ODE function returns it)."""
    out = dit_flow(transformer, x, step_cond, mask, time, state, fused, use_triton)
    if state.text_uncond is None:
        return out
    pred, null_pred = torch.chunk(out, 2, dim=0)
    return pred + (pred - null_pred) * cfg_strength


def euler_step(transformer, x, step_cond, mask, t0, dt, state, cfg_strength, fused=False, use_triton=None, out=None):
    """``x + dt * f(t0, x)``, into ``out`` if given; fused and guided, mix and update are one kernel."""
    if fused and state.text_uncond is not None:
        flow = dit_flow(transformer, x, step_cond, mask, t0, state, fused, use_triton)
        return kernels.cfg_euler(x, flow, dt, cfg_strength, out=out, use_triton=use_triton)
    stepped = x + dt * dit_step(transformer, x, step_cond, mask, t0, state, cfg_strength, fused, use_triton)
    return stepped if out is None else out.copy_(stepped)


def euler_integrate(transformer, y, step_cond, text, mask, t, steps, cfg_strength, attention=None, fused=False,
                    use_triton=None):
    """All ``steps`` Euler steps, eagerly, at the given length (``mask`` None: no padding)."""
    state = _SampleState(transformer, step_cond, text, mask, cfg_strength >= 1e-5, attention)
    for i in range(steps):
        y = euler_step(transformer, y, step_cond, mask, t[i], t[i + 1] - t[i], state, cfg_strength, fused, use_triton)
    return y


def check_fusable(transformer) -> None:
    """The fused step assumes f5-tts's DiTBlock: tanh GELU, no qk-norm."""
    for block in transformer.transformer_blocks:
        if getattr(block.ff.ff[0][1], "approximate", None) != "tanh" or block.attn.q_norm is not None:
            raise ValueError("the fused DiT step supports the F5TTS_v1 block layout only")


@torch.inference_mode()
def warm_fused_kernels(transformer, dtype, device, use_triton=None) -> None:
    """Run the fused step once on a small guided sample (and an unguided one): compiles every Triton
    kernel specialisation the graphs will launch. Safe to call from a background thread; Triton
    caches compiled kernels on disk (``TRITON_CACHE_DIR``). ``use_triton`` as for the kernels."""
    check_fusable(transformer)
    n_mel = transformer.proj_out.out_features
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, WARM_FRAMES, n_mel, device=device, dtype=dtype, generator=gen)
    text = torch.zeros(1, 4, device=device, dtype=torch.long)
    mask = torch.ones(1, WARM_FRAMES, device=device, dtype=torch.bool)
    t_grid = torch.tensor([0.0, 0.5], device=device, dtype=dtype)
    cfg = torch.tensor(2.0, device=device, dtype=dtype)  # a device scalar, as the graphs hold it
    for guided in (True, False):
        state = _SampleState(transformer, x, text, mask, guided)
        t0 = torch.index_select(t_grid, 0, torch.zeros(1, device=device, dtype=torch.long))
        euler_step(transformer, x, x, mask, t0, t_grid[1:] - t0, state, cfg if guided else 0.0, True, use_triton)
    log.info("fused DiT kernels ready (%s on %s)", dtype, device)


class _Graph:
    """One captured Euler step for a (batch, frames, guided, attention, fused) bucket, with its
    static buffers."""

    def __init__(self, transformer, batch, frames, guided, attention, fused, use_triton, dtype, device, pool):
        self.tr = transformer
        n_mel = transformer.proj_out.out_features
        self.x = torch.zeros(batch, frames, n_mel, device=device, dtype=dtype)
        self.step_cond = torch.zeros_like(self.x)
        self.mask = torch.ones(batch, frames, device=device, dtype=torch.bool)
        self.text = torch.zeros(batch, frames, device=device, dtype=torch.long)
        self.t_grid = torch.zeros(MAX_NFE_STEP + 1, device=device, dtype=dtype)
        self.index = torch.zeros((), device=device, dtype=torch.long)
        self.cfg = torch.zeros((), device=device, dtype=dtype)
        self.guided, self.attention, self.fused, self.use_triton = guided, attention, fused, use_triton
        self.state = None
        self.graph = torch.cuda.CUDAGraph()
        self._capture(pool)

    def _sample_state(self) -> _SampleState:
        mask = None if self.attention == "dense" else self.mask
        return _SampleState(self.tr, self.step_cond, self.text, mask, self.guided, self.attention)

    def _body(self):
        # index_select, not t_grid[index]: a tensor index must not turn into a host sync mid-capture
        t0 = torch.index_select(self.t_grid, 0, self.index.view(1))
        dt = torch.index_select(self.t_grid, 0, (self.index + 1).view(1)) - t0
        mask = None if self.attention == "dense" else self.mask
        euler_step(self.tr, self.x, self.step_cond, mask, t0, dt, self.state, self.cfg, self.fused,
                   self.use_triton, out=self.x)
        self.index.add_(1)

    def _capture(self, pool):
        self.t_grid.copy_(torch.linspace(0, 1, MAX_NFE_STEP + 1, device=self.t_grid.device, dtype=self.t_grid.dtype))
        self.state = self._sample_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, kernel choice, Triton compiles) off the graph
                self.index.zero_()
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: another thread's CUDA call (a job being planned) must not void the capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self._body()

    def load(self, y, step_cond, text, mask, t, cfg_strength):
        """Copy one batch's inputs into the static buffers (rows past the batch repeat row 0)."""
        b = y.shape[0]
        for dst, src in ((self.x, y), (self.step_cond, step_cond), (self.mask, mask)):
            dst[:b].copy_(src)
            dst[b:].copy_(src[:1].expand_as(dst[b:]))
        self.text.fill_(-1)
        self.text[:b, : text.shape[1]].copy_(text)
        self.text[b:, : text.shape[1]].copy_(text[:1].expand(self.text.shape[0] - b, -1))
        # Text embeddings and the attention plan do not depend on x or t: computed once, outside
        # the graph, into the very tensors the graph reads.
        self.state.copy_(self._sample_state())
        self.t_grid[: t.shape[0]].copy_(t)
        self.index.zero_()
        self.cfg.fill_(cfg_strength)


class BucketedStepRunner:
    """Integrates a batch padded to its (batch, frames) bucket: replayed CUDA graphs on a GPU, the
    same step run eagerly elsewhere (which is how the CPU tests check this path's arithmetic).

    ``fused``: the step body from f5worker.kernels (``use_fused_kernels()`` switches later).
    ``varlen``: variable-length attention for padded batches (None: where flash runs it; True also
    on the CPU, through the per-segment reference). ``use_triton``: passed to the kernels (None:
    Triton on CUDA tensors, the torch references elsewhere)."""

    def __init__(self, transformer, use_graphs: bool | None = None, fused: bool = False,
                 varlen: bool | None = None, use_triton: bool | None = None):
        self.tr = transformer
        install_fused_attention(transformer)
        if fused:
            check_fusable(transformer)
        self.use_graphs = torch.cuda.is_available() if use_graphs is None else use_graphs
        self.fused, self.varlen, self.use_triton = fused, varlen, use_triton
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._switch_lock = threading.Lock()
        self._wanted = (fused, varlen)

    def use_fused_kernels(self) -> None:
        """Serve on the fused step from the next integration on (any thread may call this; run
        ``warm_fused_kernels`` first, or the first fused capture compiles the kernels). Graphs
        captured unfused are dropped then, so each bucket is re-captured fused on its next use."""
        check_fusable(self.tr)
        with self._switch_lock:
            self._wanted = (True, self._wanted[1])

    def use_varlen_attention(self, varlen: bool | None = None) -> None:
        """Padded batches on variable-length attention (None: where flash runs it) from the next
        integration on; graphs of the other attention kind are simply no longer used."""
        with self._switch_lock:
            self._wanted = (self._wanted[0], varlen)

    def _take_switch(self) -> bool:
        """On the model thread, between integrations: apply a requested switch."""
        with self._switch_lock:
            fused, self.varlen = self._wanted
        if fused != self.fused:
            self.fused = fused
            self.graphs = {key: graph for key, graph in self.graphs.items() if key[-1] == fused}
            log.info("DiT step switched to %s kernels", "fused" if fused else "unfused")
        return self.fused

    def single_job_buckets(self) -> list[int]:
        return list(range(SINGLE_FRAME_BUCKET, SINGLE_MAX_FRAMES + 1, SINGLE_FRAME_BUCKET)) if self.use_graphs else []

    def prepare(self, batch, frames, dtype, device) -> None:
        """Capture the (guided, padded) graph for a bucket ahead of the first job that needs it."""
        fused = self._take_switch()
        attention = attention_kind(True, device, dtype, self.varlen)
        with torch.inference_mode():
            self.graph_for(bucket_batch(batch), bucket_frames(frames, batch), True, attention, fused, dtype, device)

    def graph_for(self, batch, frames, guided, attention, fused, dtype, device) -> _Graph:
        key = (batch, frames, guided, attention, fused)
        graph = self.graphs.get(key)
        if graph is None:
            graph = _Graph(self.tr, batch, frames, guided, attention, fused, self.use_triton, dtype, device, self.pool)
            self.graphs[key] = graph
            log.info("captured DiT step graph for batch %d x %d frames (guided=%s, %s attention, fused=%s)", *key)
        return graph

    def integrate(self, y, step_cond, text, mask, t, steps, cfg_strength):
        """All ``steps`` Euler steps; returns the final y for the real rows and frames."""
        fused = self._take_switch()  # once per integration: a switch never lands mid-way
        b, n, _ = y.shape
        guided = cfg_strength >= 1e-5
        pad = bucket_frames(n, b) - n
        padded = pad > 0 or (mask is not None and not bool(mask.all()))
        attention = attention_kind(padded, y.device, y.dtype, self.varlen)
        if mask is None:
            mask = torch.ones(b, n, device=y.device, dtype=torch.bool)
        y, step_cond, mask = F.pad(y, (0, 0, 0, pad)), F.pad(step_cond, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        if not self.use_graphs:
            return euler_integrate(self.tr, y, step_cond, text, mask if padded else None, t, steps, cfg_strength,
                                   attention, fused, self.use_triton)[:, :n]
        graph = self.graph_for(bucket_batch(b), n + pad, guided, attention, fused, y.dtype, y.device)
        graph.load(y, step_cond, text, mask, t, cfg_strength)
        for _ in range(steps):
            graph.graph.replay()
        return graph.x[:b, :n].clone()
