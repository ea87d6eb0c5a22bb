"""The fast DiT path: the same function as f5-tts's DiT forward, with the GPU kept busy.

Why this module exists: stock f5-tts spends most of an H100's time launching kernels (one DiT step:
37.5 ms eager, 10.7 ms of it real work). This path changes how the step is run, not what it
computes:

- ``FusedAttnProcessor`` replaces f5-tts's attention processor on the worker's own model: one QKV
  matmul instead of three, and the padding mask broadcast (``b 1 1 n``) instead of expanded to
  ``b h n n``, which lets SDPA use its memory-efficient kernel for padded batches;
- the text embeddings and rotary tables are computed once per sample, as f5-tts's cache does;
- ``BucketedStepRunner`` captures a whole ODE step (DiT with classifier-free guidance and the Euler
  update, step index advanced on the device) into a CUDA graph per (batch, frames) bucket, then
  replays it ``nfe_step`` times. Buckets are captured on first use (tens of milliseconds) and share
  one memory pool, so a new length never re-captures an old one and memory stays one step's worth.

Padding to a bucket is exact: padded frames are masked out of attention and convolutions, so they
do not change the valid frames (tests compare with stock f5-tts on the same weights).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from f5worker.dit import apply_rotary
from f5worker.job_plan import MAX_NFE_STEP

log = logging.getLogger(__name__)

FRAME_BUCKET = 128  # batches are compute-bound: pad little
SINGLE_FRAME_BUCKET = 512  # one job is launch-bound: a step costs about the same at any length, so
# few buckets, all captured while the worker is idle, beat many captured during jobs
SINGLE_MAX_FRAMES = 3072  # ~33 s: past f5-tts's chunk lengths (22 s of text plus the reference)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_frames(frames: int, batch: int = 2) -> int:
    step = SINGLE_FRAME_BUCKET if batch == 1 else FRAME_BUCKET
    return -(-frames // step) * step


def bucket_batch(batch: int) -> int:
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    return batch


class FusedAttnProcessor:
    """f5-tts's AttnProcessor (torch backend) with QKV fused and the mask broadcast."""

    def __init__(self, attn, pe_attn_head=None):
        if attn.q_norm is not None or pe_attn_head is not None:
            raise ValueError("fused attention supports the F5TTS_v1 layout (no qk_norm, rope on all heads)")
        self.qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
        self.qkv_bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]).detach()

    def __call__(self, attn, x, mask=None, rope=None):
        batch = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        head_dim = attn.inner_dim // attn.heads
        query, key, value = qkv.view(batch, -1, 3, attn.heads, head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            freqs, _ = rope
            query = apply_rotary(query, freqs)
            key = apply_rotary(key, freqs)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        if mask is not None:
            out = out.masked_fill(~mask.unsqueeze(-1), 0.0)
        return out


def install_fused_attention(transformer) -> None:
    for block in transformer.transformer_blocks:
        proc = block.attn.processor
        block.attn.processor = FusedAttnProcessor(block.attn, getattr(proc, "pe_attn_head", None))


class _SampleState:
    """Per-sample tensors the step reads: fixed for all steps of one integration."""

    def __init__(self, transformer, step_cond, text, mask, cfg: bool):
        tr = transformer
        seq_len, frames = mask.sum(dim=1), step_cond.shape[1]

        def embed(drop_text):
            # f5-tts embeds up to the longest item; zeros beyond it, as for any shorter item
            te = tr.text_embed(text, seq_len=seq_len, drop_text=drop_text)
            return F.pad(te, (0, 0, 0, frames - te.shape[1]))

        self.text_cond = embed(False)
        self.text_uncond = embed(True) if cfg else None
        self.rope = tr.rotary_embed.forward_from_seq_len(frames)


def dit_step(transformer, x, step_cond, mask, time, state: _SampleState, cfg_strength):
    """DiT.forward(cfg_infer=True) followed by the guidance mix, using the per-sample state."""
    tr = transformer
    t = tr.time_embed(time.expand(x.shape[0]))
    x_cond = tr.input_embed(x, step_cond, state.text_cond, drop_audio_cond=False, audio_mask=mask)
    if state.text_uncond is None:
        h, t2, mask2 = x_cond, t, mask
    else:
        x_uncond = tr.input_embed(x, step_cond, state.text_uncond, drop_audio_cond=True, audio_mask=mask)
        h, t2, mask2 = torch.cat((x_cond, x_uncond)), torch.cat((t, t)), torch.cat((mask, mask))
    for block in tr.transformer_blocks:
        h = block(h, t2, mask=mask2, rope=state.rope)
    out = tr.proj_out(tr.norm_out(h, t2))
    if state.text_uncond is None:
        return out
    pred, null_pred = torch.chunk(out, 2, dim=0)
    return pred + (pred - null_pred) * cfg_strength


class _Graph:
    """One captured Euler step for a (batch, frames, guided) bucket, with its static buffers."""

    def __init__(self, transformer, batch, frames, text_len, guided, dtype, device, pool):
        self.tr = transformer
        n_mel = transformer.proj_out.out_features
        self.x = torch.zeros(batch, frames, n_mel, device=device, dtype=dtype)
        self.step_cond = torch.zeros_like(self.x)
        self.mask = torch.ones(batch, frames, device=device, dtype=torch.bool)
        self.text = torch.zeros(batch, text_len, device=device, dtype=torch.long)
        self.t_grid = torch.zeros(MAX_NFE_STEP + 1, device=device, dtype=dtype)
        self.index = torch.zeros((), device=device, dtype=torch.long)
        self.cfg = torch.zeros((), device=device, dtype=dtype)
        self.guided = guided
        self.state = None
        self.graph = torch.cuda.CUDAGraph()
        self._capture(pool)

    def _body(self):
        # index_select, not t_grid[index]: a tensor index must not turn into a host sync mid-capture
        t0 = torch.index_select(self.t_grid, 0, self.index.view(1))
        dt = torch.index_select(self.t_grid, 0, (self.index + 1).view(1)) - t0
        pred = dit_step(self.tr, self.x, self.step_cond, self.mask, t0, self.state, self.cfg)
        self.x.copy_(self.x + dt * pred)
        self.index.add_(1)

    def _capture(self, pool):
        self.t_grid.copy_(torch.linspace(0, 1, MAX_NFE_STEP + 1, device=self.t_grid.device, dtype=self.t_grid.dtype))
        self.state = _SampleState(self.tr, self.step_cond, self.text, self.mask, self.guided)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, SDPA kernel choice) off the graph
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
        # The text embedding does not depend on x or t: computed once, outside the graph, into the
        # very tensors the graph reads.
        fresh = _SampleState(self.tr, self.step_cond, self.text, self.mask, self.guided)
        self.state.text_cond.copy_(fresh.text_cond)
        if self.guided:
            self.state.text_uncond.copy_(fresh.text_uncond)
        self.t_grid[: t.shape[0]].copy_(t)
        self.index.zero_()
        self.cfg.fill_(cfg_strength)


class BucketedStepRunner:
    """Integrates a batch padded to its (batch, frames) bucket: replayed CUDA graphs on a GPU, the
    same step run eagerly elsewhere (which is how the CPU tests check this path's arithmetic)."""

    def __init__(self, transformer, use_graphs: bool | None = None):
        self.tr = transformer
        install_fused_attention(transformer)
        self.use_graphs = torch.cuda.is_available() if use_graphs is None else use_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def single_job_buckets(self) -> list[int]:
        return list(range(SINGLE_FRAME_BUCKET, SINGLE_MAX_FRAMES + 1, SINGLE_FRAME_BUCKET)) if self.use_graphs else []

    def prepare(self, batch, frames, dtype, device) -> None:
        """Capture the (guided) graph for a bucket ahead of the first job that needs it."""
        with torch.inference_mode():
            self.graph_for(bucket_batch(batch), bucket_frames(frames, batch), True, dtype, device)

    def graph_for(self, batch, frames, guided, dtype, device) -> _Graph:
        key = (batch, frames, guided)
        graph = self.graphs.get(key)
        if graph is None:
            graph = _Graph(self.tr, batch, frames, frames, guided, dtype, device, self.pool)
            self.graphs[key] = graph
            log.info("captured DiT step graph for batch %d x %d frames (guided=%s)", *key)
        return graph

    def integrate(self, y, step_cond, text, mask, t, steps, cfg_strength):
        """All ``steps`` Euler steps; returns the final y for the real rows and frames."""
        b, n, _ = y.shape
        if mask is None:
            mask = torch.ones(b, n, device=y.device, dtype=torch.bool)
        guided = cfg_strength >= 1e-5
        pad = bucket_frames(n, b) - n
        y, step_cond, mask = F.pad(y, (0, 0, 0, pad)), F.pad(step_cond, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        if not self.use_graphs:
            state = _SampleState(self.tr, step_cond, text, mask, guided)
            for i in range(steps):
                y = y + (t[i + 1] - t[i]) * dit_step(self.tr, y, step_cond, mask, t[i], state, cfg_strength)
            return y[:, :n]
        graph = self.graph_for(bucket_batch(b), n + pad, guided, y.dtype, y.device)
        graph.load(y, step_cond, text, mask, t, cfg_strength)
        for _ in range(steps):
            graph.graph.replay()
        return graph.x[:b, :n].clone()
