"""The fast DiT path: the same function as f5-tts's DiT forward, with the GPU kept busy.

Why this module exists: stock f5-tts spends most of an H100's time launching kernels, and once
launches are gone (CUDA graphs) most of what is left is unfused elementwise work and masked
attention (bench/RESULTS.md has the measured figures). This path changes how the step is run, not
what it computes:

- ``BucketedStepRunner`` captures a whole ODE step (DiT with classifier-free guidance and the Euler
  update, step index advanced on the device) into a CUDA graph per (batch, frames) bucket, then
  replays it ``nfe_step`` times, one replay per ``step()`` of an integration, so that the batcher
  may set a call aside between two steps; integrations of one bucket share its graph, each saving
  its ``y`` out of the static buffers when another takes them (``_Graph.take``). Buckets are captured on first use (one step, on the runner's own
  capture stream, without a device-wide sync) and share one memory pool, held alive by a keeper
  graph so graphs can be dropped (a switch, the ``graph_memory_bytes`` budget, least recently used
  first) and captured again; batch sizes are bucketed finely (at most 15 % padding rows);
- per sample, not per step or layer: the text embeddings, the rotary tables and the attention
  plan (f5worker.inference.attention: a padded batch runs variable-length flash attention on the valid
  tokens only, where CUDA and fp16/bf16 allow; masked SDPA elsewhere, no mask without padding);
- two step bodies. *Unfused* (what the worker serves on from the start): DiTBlock's own torch ops
  with QKV fused into one matmul. *Fused* (``fused=True``, or ``use_fused_kernels()`` once
  ``warm_fused_kernels`` has compiled them): each layer's elementwise chains as the Triton kernels of
  f5worker.inference.kernels (modulated LayerNorm; rotary on the fused QKV; GELU with the bias; gated residual
  fused with the next modulated norm, the last one with the final norm) and the guidance mix with
  the Euler update as one kernel.

Padding to a bucket is exact: padded frames are masked out of attention and convolutions, so they
do not change the valid frames (tests compare with stock f5-tts on the same weights, and the fused
and variable-length paths with the unfused masked one, on the CPU; the Triton kernels under
Triton's interpreter).

A fault of the fast path itself (f5worker.inference.gpu_faults) never fails a job: the runner steps down
fused -> unfused graphed -> eager for the rest of the process and runs the items again; CUDA
device faults and out-of-memory errors are raised, for the worker to be replaced.

Measured vs not: nothing of the fused step or of variable-length attention has been run or timed on
a GPU yet (written without one): tests/test_gpu.py checks both there; speed is for the bench to say.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from f5worker.inference import kernels
from f5worker.inference.attention import (AttentionPlan, FusedAttnProcessor, attend, attention_kind, fused_qkv,
                                install_fused_attention, rotary_heads, split_rotate)
from f5worker.errors import CallAbandoned, check_abandoned
from f5worker.inference.gpu_faults import fast_path_fault
from f5worker.inference.items import MAX_NFE_STEP
from f5worker.inference.sampler import run_to_end

log = logging.getLogger(__name__)

__all__ = ["BucketedStepRunner", "FusedAttnProcessor", "StepTally", "bucket_batch", "bucket_frames", "dit_step",
           "euler_integrate", "warm_fused_kernels"]

FRAME_BUCKET = 128  # batches are compute-bound: pad little
SINGLE_FRAME_BUCKET = 512  # one job is launch-bound: a step costs about the same at any length, so
# few buckets, all captured while the worker is idle, beat many captured during jobs
SINGLE_MAX_FRAMES = 3072  # ~33 s: past f5-tts's chunk lengths (22 s of text plus the reference)
# Padding rows repeat row 0 and are computed in full: every batch up to 32 wastes at most 15 % of
# its rows (9 -> 10, 17 -> 20). Captures are cheap (one step each), so many sizes cost little.
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)
LEVELS = ("fused", "graphed", "eager")  # what the runner may use, fastest first; faults step down
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
        q, k, v = kernels.rotary_qkv(qkv, attn.heads, state.cos, state.sin, use_triton=use_triton,
                                     rotary_heads=rotary_heads(attn))
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


def dit_flow(transformer, x, step_cond, mask, time, state: _SampleState, *, fused: bool = False, use_triton=None):
    """DiT.forward(cfg_infer=True) with the per-sample state: (cond, uncond) rows stacked when
    guided, else the conditioned flow alone."""
    tr = transformer
    t = tr.time_embed(time.expand(x.shape[0]))
    h = tr.input_embed(x, step_cond, state.text_cond, drop_audio_cond=False, audio_mask=mask)
    if state.text_uncond is not None:
        x_uncond = tr.input_embed(x, step_cond, state.text_uncond, drop_audio_cond=True, audio_mask=mask)
        h, t = torch.cat((h, x_uncond)), torch.cat((t, t))
    return _blocks_fused(tr, h, t, state, use_triton) if fused else _blocks_unfused(tr, h, t, state)


def dit_step(transformer, x, step_cond, mask, time, state: _SampleState, *, cfg_strength, fused: bool = False,
             use_triton=None):
    """The flow after the guidance mix (as CFM.sample's ODE function returns it)."""
    out = dit_flow(transformer, x, step_cond, mask, time, state, fused=fused, use_triton=use_triton)
    if state.text_uncond is None:
        return out
    pred, null_pred = torch.chunk(out, 2, dim=0)
    return pred + (pred - null_pred) * cfg_strength


def euler_step(transformer, x, step_cond, mask, t0, dt, state, *, cfg_strength, fused: bool = False, use_triton=None,
               out=None):
    """``x + dt * f(t0, x)``, into ``out`` if given; fused and guided, mix and update are one kernel."""
    if fused and state.text_uncond is not None:
        flow = dit_flow(transformer, x, step_cond, mask, t0, state, fused=fused, use_triton=use_triton)
        return kernels.cfg_euler(x, flow, dt, cfg_strength, out=out, use_triton=use_triton)
    stepped = x + dt * dit_step(transformer, x, step_cond, mask, t0, state, cfg_strength=cfg_strength, fused=fused,
                                use_triton=use_triton)
    return stepped if out is None else out.copy_(stepped)


def euler_integrate(transformer, y, step_cond, text, mask, t, *, steps: int, cfg_strength, attention=None,
                    fused: bool = False, use_triton=None, abandoned=None):
    """All ``steps`` Euler steps, eagerly, at the given length (``mask`` None: no padding);
    ``abandoned`` is checked before each (f5worker.errors.check_abandoned)."""
    state = _SampleState(transformer, step_cond, text, mask, cfg_strength >= 1e-5, attention)
    for i in range(steps):
        check_abandoned(abandoned)
        y = euler_step(transformer, y, step_cond, mask, t[i], t[i + 1] - t[i], state, cfg_strength=cfg_strength,
                       fused=fused, use_triton=use_triton)
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
        euler_step(transformer, x, x, mask, t0, t_grid[1:] - t0, state, cfg_strength=cfg if guided else 0.0, fused=True,
                   use_triton=use_triton)
    log.info("fused DiT kernels ready (%s on %s)", dtype, device)


def _capture_into(graph: torch.cuda.CUDAGraph, body, *, pool, stream: torch.cuda.Stream) -> None:
    """Capture ``body`` into ``graph`` on ``stream``: what ``torch.cuda.graph`` does, without its
    device-wide ``synchronize`` and ``empty_cache`` (a capture may happen inside a job). The capture
    is always ended, so a body that fails leaves no stream capturing."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # thread_local: another thread's CUDA call (a job being planned) must not void the capture
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)


class _PoolKeeper:
    """Keeps the graphs' shared memory pool alive for the runner's whole life.

    The caching allocator counts the graphs captured into a pool and, once that count falls to 0,
    refuses any new capture into the pool for as long as a block is still allocated in it
    (``TORCH_INTERNAL_ASSERT(it->second->use_count > 0)`` in CUDACachingAllocator.cpp). Such blocks
    exist: the first cuBLAS call on a (thread, stream) pair inside a capture allocates its workspace
    in the pool and never frees it. Dropping every graph (a switch to the fused kernels, an
    eviction) would then break every later capture. A tiny graph of its own, captured into the pool
    first and never released, holds the count above 0, so graphs can come and go."""

    def __init__(self, *, device):
        self.stream = torch.cuda.Stream(device=device)  # every capture of the runner: one stream, one pool
        self.pool = torch.cuda.graph_pool_handle()
        self._tensor = torch.zeros(1, device=device)
        self._graph = torch.cuda.CUDAGraph()
        _capture_into(self._graph, lambda: self._tensor.add_(1), pool=self.pool, stream=self.stream)


class _Graph:
    """One captured Euler step for a (batch, frames, guided, attention, fused) bucket, with its
    static buffers."""

    def __init__(self, transformer, *, batch: int, frames: int, guided: bool, attention: str, fused: bool,
                 use_triton, dtype, device, pool, stream: torch.cuda.Stream, warm_steps: int = 2):
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
        self.holder: _BucketedIntegration | None = None  # the integration whose state the buffers hold
        self._capture(pool, stream, warm_steps)

    @property
    def nbytes(self) -> int:
        """The static buffers this graph holds outside the shared pool (what eviction gives back)."""
        tensors = [self.x, self.step_cond, self.mask, self.text, self.t_grid]
        tensors += [t for t in (self.state.text_cond, self.state.text_uncond, self.state.cos, self.state.sin)
                    if t is not None]
        tensors += self.state.attention.tensors()
        return sum(t.numel() * t.element_size() for t in tensors)

    def _sample_state(self) -> _SampleState:
        mask = None if self.attention == "dense" else self.mask
        return _SampleState(self.tr, self.step_cond, self.text, mask, self.guided, self.attention)

    def _body(self):
        # index_select, not t_grid[index]: a tensor index must not turn into a host sync mid-capture
        t0 = torch.index_select(self.t_grid, 0, self.index.view(1))
        dt = torch.index_select(self.t_grid, 0, (self.index + 1).view(1)) - t0
        mask = None if self.attention == "dense" else self.mask
        euler_step(self.tr, self.x, self.step_cond, mask, t0, dt, self.state, cfg_strength=self.cfg, fused=self.fused,
                   use_triton=self.use_triton, out=self.x)
        self.index.add_(1)

    def _capture(self, pool, stream, warm_steps: int):
        self.t_grid.copy_(torch.linspace(0, 1, MAX_NFE_STEP + 1, device=self.t_grid.device, dtype=self.t_grid.dtype))
        self.state = self._sample_state()
        self.graph = self._record(pool, stream, warm_steps)

    def _record(self, pool, stream, warm_steps: int) -> torch.cuda.CUDAGraph:
        """``_body`` captured on ``stream`` into ``pool``: each ``replay()`` is one step on the buffers."""
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # lazy initialisation (cuBLAS handles and workspaces, kernel choice, Triton compiles) off
            # the graph, on the capture stream itself
            for _ in range(warm_steps):
                self.index.zero_()
                self._body()
        graph = torch.cuda.CUDAGraph()
        _capture_into(graph, self._body, pool=pool, stream=stream)
        return graph

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

    def take(self, holder: _BucketedIntegration) -> None:
        """Load ``holder``'s state (its y so far, its step) into the buffers, once the integration
        that held them, set aside between two of its steps, has saved its y out of them."""
        if self.holder is not None and self.holder is not holder:
            self.holder.set_aside_from(self)
        self.load(holder.y, holder.step_cond, holder.text, holder.mask, holder.t, holder.cfg_strength)
        self.index.fill_(holder.done)
        self.holder = holder


@dataclass
class StepTally:
    """What the runner computed, against what the items needed: rows (batch entries, before the
    guidance doubles them) and row-frames (rows times frames), summed over integrations."""
    integrations: int = 0
    rows: int = 0
    real_rows: int = 0
    row_frames: int = 0
    real_row_frames: int = 0

    def add(self, *, rows: int, frames: int, real_rows: int, real_row_frames: int) -> None:
        self.integrations += 1
        self.rows += rows
        self.real_rows += real_rows
        self.row_frames += rows * frames
        self.real_row_frames += real_row_frames


class BucketedStepRunner:
    """Integrates a batch padded to its (batch, frames) bucket: replayed CUDA graphs on a GPU, the
    same step run eagerly elsewhere (which is how the CPU tests check this path's arithmetic).

    ``fused``: the step body from f5worker.inference.kernels (``use_fused_kernels()`` switches later).
    ``varlen``: variable-length attention for padded batches (None: where flash runs it; True also
    on the CPU, through the per-segment reference). ``use_triton``: passed to the kernels (None:
    Triton on CUDA tensors, the torch references elsewhere). ``graph_memory_bytes``: the static
    buffers of the captured graphs are kept under this, the least recently used evicted.

    A fault of the fast path itself (``f5worker.inference.gpu_faults.fast_path_fault``: a failed capture, a
    Triton or flash error) never fails the items: the runner steps down one of ``LEVELS`` for the
    rest of the process (fused -> unfused graphed -> eager), logs why, and runs them again there."""

    def __init__(self, transformer, use_graphs: bool | None = None, fused: bool = False,
                 varlen: bool | None = None, use_triton: bool | None = None, *,
                 graph_memory_bytes: int | None = None):
        self.tr = transformer
        install_fused_attention(transformer)
        if fused:
            check_fusable(transformer)
        self.use_graphs = torch.cuda.is_available() if use_graphs is None else use_graphs
        self.fused, self.varlen, self.use_triton = fused, varlen, use_triton
        self.graph_memory_bytes = graph_memory_bytes
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.tally = StepTally()
        self._keeper: _PoolKeeper | None = None  # created with the first graph
        self._switch_lock = threading.Lock()
        self._wanted = (fused, varlen)
        self._floor = 0  # index into LEVELS of the fastest level still allowed
        self.demotions = 0  # an integration set up before a demotion starts again, one level down

    # --- levels and switches ------------------------------------------------------------------
    @property
    def level(self) -> str:
        if self.fused or self.varlen is not False:
            return LEVELS[0]
        return LEVELS[1] if self.use_graphs else LEVELS[2]

    def use_fused_kernels(self) -> None:
        """Serve on the fused step from the next integration on (any thread may call this; run
        ``warm_fused_kernels`` first, or the first fused capture compiles the kernels). Graphs
        captured unfused are dropped then, so each bucket is re-captured fused on its next use.
        Ignored once a fault has demoted the runner below the fused level."""
        check_fusable(self.tr)
        with self._switch_lock:
            if self._floor == 0:
                self._wanted = (True, self._wanted[1])

    def use_varlen_attention(self, varlen: bool | None = None) -> None:
        """Padded batches on variable-length attention (None: where flash runs it) from the next
        integration on; graphs of the other attention kind are simply no longer used. Ignored once
        a fault has demoted the runner below the fused level."""
        with self._switch_lock:
            if self._floor == 0:
                self._wanted = (self._wanted[0], varlen)

    @property
    def requested_varlen(self) -> bool | None:
        """The attention switch asked for (taken at the next integration)."""
        with self._switch_lock:
            return self._wanted[1]

    def _take_switch(self) -> bool:
        """On the model thread, between integrations: apply a requested switch."""
        with self._switch_lock:
            fused, self.varlen = self._wanted
        if fused != self.fused:
            self.fused = fused
            for key in [key for key in self.graphs if key[-1] != fused]:
                del self.graphs[key]  # safe: the pool keeper holds the pool (see _PoolKeeper)
            log.info("DiT step switched to %s kernels", "fused" if fused else "unfused")
        return self.fused

    def _demote(self, err: BaseException) -> bool:
        """After a fast-path fault: step one level down for the rest of the process (True), or
        False when ``err`` is not such a fault or there is no level left below."""
        current = LEVELS.index(self.level)
        if not fast_path_fault(err) or current == len(LEVELS) - 1:
            return False
        with self._switch_lock:
            self._floor = max(self._floor, current + 1)
            self.demotions += 1
            self._wanted = (False, False)
            self.fused, self.varlen = False, False
            for key in [key for key in self.graphs if key[-1] or key[3] == "varlen"]:
                del self.graphs[key]  # never replayed again
            if self._floor >= LEVELS.index("eager"):
                self.use_graphs = False
                self.graphs.clear()
        log.warning("DiT fast path demoted from %s to %s for the rest of this process after %s: %s",
                    LEVELS[current], self.level, type(err).__name__, str(err)[:300])
        return True

    def _demoting(self, run):
        """``run()``, again one level down after each fast-path fault."""
        while True:
            try:
                return run()
            except CallAbandoned:
                raise
            except Exception as err:
                if not self._demote(err):
                    raise

    # --- graphs -------------------------------------------------------------------------------
    def single_job_buckets(self) -> list[int]:
        return list(range(SINGLE_FRAME_BUCKET, SINGLE_MAX_FRAMES + 1, SINGLE_FRAME_BUCKET)) if self.use_graphs else []

    def prepare(self, batch, frames, dtype, device) -> None:
        """Capture the (guided, padded) graph for a bucket ahead of the first job that needs it."""
        def capture():
            fused = self._take_switch()
            if not self.use_graphs:
                return
            attention = attention_kind(True, device, dtype, self.varlen)
            with torch.inference_mode():
                self.graph_for(bucket_batch(batch), bucket_frames(frames, batch), True, attention, fused, dtype, device)

        self._demoting(capture)

    def graph_for(self, batch, frames, guided, attention, fused, dtype, device) -> _Graph:
        key = (batch, frames, guided, attention, fused)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph
        if self._keeper is None:
            self._keeper = _PoolKeeper(device=device)
        # The first capture on this runner warms twice (handles, workspaces, kernel choice); later
        # ones once, as they only meet a new shape.
        graph = _Graph(self.tr, batch=batch, frames=frames, guided=guided, attention=attention, fused=fused,
                       use_triton=self.use_triton, dtype=dtype, device=device, pool=self._keeper.pool,
                       stream=self._keeper.stream, warm_steps=1 if self.graphs else 2)
        self.graphs[key] = graph
        self._evict(keep=key)
        log.info("captured DiT step graph for batch %d x %d frames (guided=%s, %s attention, fused=%s)", *key)
        return graph

    def graph_bytes(self) -> int:
        return sum(graph.nbytes for graph in self.graphs.values())

    def _evict(self, keep: tuple) -> None:
        """Drop the least recently used graphs while their buffers exceed the budget."""
        if self.graph_memory_bytes is None:
            return
        while len(self.graphs) > 1 and self.graph_bytes() > self.graph_memory_bytes:
            key = next(iter(self.graphs))
            if key == keep:
                break
            del self.graphs[key]
            log.info("evicted the DiT step graph for batch %d x %d frames (graph memory budget)", *key[:2])

    # --- integration --------------------------------------------------------------------------
    def start(self, y, step_cond, text, mask, t, steps, cfg_strength) -> _BucketedIntegration:
        """``steps`` Euler steps from ``y``, padded to its bucket, to run a step at a time."""
        return _BucketedIntegration(self, y, step_cond, text, mask, t, steps, cfg_strength)

    def integrate(self, y, step_cond, text, mask, t, steps, cfg_strength, *, abandoned=None):
        """All ``steps`` Euler steps; returns the final y for the real rows and frames. ``abandoned``
        is checked before each step (f5worker.errors.check_abandoned)."""
        return run_to_end(self.start(y, step_cond, text, mask, t, steps, cfg_strength), abandoned)


class _BucketedIntegration:
    """One integration on the bucketed runner, a step at a time (``inference.sampler.Integration``).

    Between two of its steps other integrations may run, on this very bucket's graph: whichever
    takes the graph first has this one save its y out of the static buffers (``_Graph.take``), and
    this one loads its own state back before its next step. A fast-path fault, its own or (since
    it was set up) another integration's, starts it again from its first step one level down."""

    def __init__(self, runner: BucketedStepRunner, y, step_cond, text, mask, t, steps: int, cfg_strength):
        self.runner, self.inputs, self.steps = runner, (y, step_cond, text, mask), steps
        self.t, self.cfg_strength, self.text = t, cfg_strength, text
        self.graph: _Graph | None = None
        runner._demoting(self._set_up)

    @property
    def steps_left(self) -> int:
        return self.steps - self.done

    def _set_up(self) -> None:
        runner = self.runner
        self.demotions = runner.demotions
        self.fused = runner._take_switch()  # once per integration: a switch never lands mid-way
        y, step_cond, text, mask = self.inputs
        self.b, self.n, _ = y.shape
        pad = bucket_frames(self.n, self.b) - self.n
        self.real_row_frames = self.b * self.n if mask is None else int(mask.sum())  # the one host sync here
        self.padded = pad > 0 or self.real_row_frames < self.b * self.n
        self.attention = attention_kind(self.padded, y.device, y.dtype, runner.varlen)
        if mask is None:
            mask = torch.ones(self.b, self.n, device=y.device, dtype=torch.bool)
        self.y, self.step_cond, self.mask = F.pad(y, (0, 0, 0, pad)), F.pad(step_cond, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        self.rows = bucket_batch(self.b) if runner.use_graphs else self.b
        self.done = 0
        self.close()
        if runner.use_graphs:
            self.graph = runner.graph_for(self.rows, self.n + pad, self.cfg_strength >= 1e-5, self.attention,
                                          self.fused, y.dtype, y.device)
        else:
            self.state = _SampleState(runner.tr, self.step_cond, text, self.mask if self.padded else None,
                                      self.cfg_strength >= 1e-5, self.attention)

    def step(self) -> None:
        try:
            if self.demotions != self.runner.demotions:  # another integration's fault, since set-up
                self.runner._demoting(self._set_up)
            self._step()
        except CallAbandoned:
            raise
        except Exception as err:
            if not self.runner._demote(err):
                raise
            self.runner._demoting(self._set_up)  # from the first step again, one level down

    def _step(self) -> None:
        if self.graph is not None:
            if self.graph.holder is not self:
                self.graph.take(self)
            self.graph.graph.replay()
        else:
            i, t = self.done, self.t
            self.y = euler_step(self.runner.tr, self.y, self.step_cond, self.mask if self.padded else None, t[i],
                                t[i + 1] - t[i], self.state, cfg_strength=self.cfg_strength, fused=self.fused,
                                use_triton=self.runner.use_triton)
        self.done += 1

    def set_aside_from(self, graph: _Graph) -> None:
        """Another integration takes ``graph``: keep this one's y so far."""
        self.y = graph.x[: self.b].clone()
        graph.holder = None

    def result(self) -> torch.Tensor:
        if self.graph is not None:
            if self.graph.holder is not self:
                self.graph.take(self)
            out = self.graph.x[: self.b, : self.n].clone()
        else:
            out = self.y[:, : self.n]
        self.runner.tally.add(rows=self.rows, frames=self.y.shape[1], real_rows=self.b,
                              real_row_frames=self.real_row_frames)
        return out

    def close(self) -> None:
        """Let go of the graph (the runner may drop it and reuse its memory)."""
        if self.graph is not None and self.graph.holder is self:
            self.graph.holder = None
        self.graph = None
