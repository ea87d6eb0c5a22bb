"""The flow-matching sampler: CFM.sample's Euler integration, for a batch of unrelated items.

Why this module exists: f5-tts's ``CFM.sample`` draws all noise from the global RNG and runs
attention unmasked, so a job's output depends on what else is in its batch. This does the same
arithmetic (same time grid, same ``y + dt * f(t, y)`` steps as torchdiffeq's Euler solver, same
classifier-free guidance) with per-item noise and padding masks, and leaves the DiT call itself to a
step runner, so the eager and the CUDA-graphed paths share everything else. An integration runs a
step at a time (``Integration``), so the batcher can run another call between two of its steps.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from f5worker.errors import check_abandoned
from f5worker.inference.items import ChunkItem
from f5worker.model.constants import MAX_FRAMES
from f5worker.model.text_tokens import symbols_to_ids

# f5-tts's Empirically Pruned Step Sampling grids (f5_tts.model.utils.get_epss_timesteps), in 32nds.
EPSS_GRIDS = {
    5: [0, 2, 4, 8, 16, 32],
    6: [0, 2, 4, 6, 8, 16, 32],
    7: [0, 2, 4, 6, 8, 16, 24, 32],
    10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32],
    12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
    16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32],
}


def timesteps(steps: int, sway: float | None, device, dtype) -> torch.Tensor:
    """CFM.sample's time grid: EPSS for the step counts it knows, linear otherwise, then sway."""
    grid = EPSS_GRIDS.get(steps)
    if grid is None:
        t = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
    else:
        t = (1 / 32) * torch.tensor(grid, device=device, dtype=dtype)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def lens_to_mask(lengths: torch.Tensor, length: int | None = None) -> torch.Tensor:
    length = int(lengths.amax()) if length is None else length
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


class Integration(Protocol):
    """One batch's ODE integration, a step at a time, so that the model thread can set it aside
    between two steps (another call runs meanwhile: ``inference.batcher``) and take it up again
    with the same result as if nothing had run between."""

    steps_left: int

    def step(self) -> None:
        """One Euler step: ``y <- y + dt * f(t, y)``."""

    def result(self) -> torch.Tensor:
        """``y`` after the last step ([batch, frames, mel])."""

    def close(self) -> None:
        """Let go of what it holds on the runner (also when it stops before its end)."""


def run_to_end(integration: Integration, abandoned: Callable[[], bool] | None = None) -> torch.Tensor:
    """Every step at once; ``abandoned`` is checked before each (f5worker.errors.check_abandoned)."""
    try:
        while integration.steps_left:
            check_abandoned(abandoned)
            integration.step()
        return integration.result()
    finally:
        integration.close()


class StepRunner(Protocol):
    """How the ODE is integrated: this module's eager runner, or the fast path's bucketed CUDA
    graphs (``inference.fast.BucketedStepRunner``). The engine and the sampler use only this."""

    def start(self, y: torch.Tensor, step_cond: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
              t: torch.Tensor, steps: int, cfg_strength: float) -> Integration:
        """``steps`` Euler steps on the grid ``t`` from ``y`` ([batch, frames, mel]), to be run."""

    def integrate(self, y: torch.Tensor, step_cond: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                  t: torch.Tensor, steps: int, cfg_strength: float, *,
                  abandoned: Callable[[], bool] | None = None) -> torch.Tensor:
        """``start(...)`` run to its end at once (``run_to_end``)."""

    def single_job_buckets(self) -> list[int]:
        """The frame lengths worth preparing ahead for one job; empty when nothing is prepared."""

    def prepare(self, batch: int, frames: int, dtype: torch.dtype, device: str) -> None:
        """Make a (batch, frames) call fast before a job needs it (a CUDA graph capture, say)."""


class EagerStepRunner:
    """f5-tts's own DiT forward, called as CFM.sample calls it (a ``StepRunner``)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.current: _EagerIntegration | None = None  # whose text embeddings the DiT's cache holds

    def __call__(self, x, step_cond, text, t, mask, cfg_strength):
        tr = self.transformer
        if cfg_strength < 1e-5:
            return tr(x=x, cond=step_cond, text=text, time=t, mask=mask, drop_audio_cond=False,
                      drop_text=False, cache=True)
        pred_cfg = tr(x=x, cond=step_cond, text=text, time=t, mask=mask, cfg_infer=True, cache=True)
        pred, null_pred = torch.chunk(pred_cfg, 2, dim=0)
        return pred + (pred - null_pred) * cfg_strength

    def begin(self, integration: _EagerIntegration) -> None:
        """Make the shared DiT ready for ``integration``'s next step: its cache (text embeddings,
        computed again on that step) and its attention mask switch."""
        self.transformer.clear_cache()
        for block in self.transformer.transformer_blocks:
            # f5-tts's v1 config leaves attention unmasked; a padded item needs it masked.
            block.attn.processor.attn_mask_enabled = integration.mask is not None
        self.current = integration

    def end(self, integration: _EagerIntegration) -> None:
        if self.current is integration:
            self.transformer.clear_cache()
            self.current = None

    def single_job_buckets(self) -> list[int]:
        return []  # eager: nothing to prepare

    def prepare(self, batch: int, frames: int, dtype: torch.dtype, device: str) -> None:
        return None

    def start(self, y, step_cond, text, mask, t, steps, cfg_strength) -> _EagerIntegration:
        return _EagerIntegration(self, y, step_cond, text, mask, t, steps, cfg_strength)

    def integrate(self, y, step_cond, text, mask, t, steps, cfg_strength, *, abandoned=None):
        return run_to_end(self.start(y, step_cond, text, mask, t, steps, cfg_strength), abandoned)


class _EagerIntegration:
    """torchdiffeq's Euler solver on f5-tts's grid, a step at a time (an ``Integration``). The DiT's
    cache belongs to one integration at a time: a step after another integration's steps makes
    the DiT ready again (``EagerStepRunner.begin``)."""

    def __init__(self, runner: EagerStepRunner, y, step_cond, text, mask, t, steps: int, cfg_strength: float):
        self.runner, self.y, self.step_cond, self.text, self.mask, self.t = runner, y, step_cond, text, mask, t
        self.steps, self.cfg_strength, self.done = steps, cfg_strength, 0

    @property
    def steps_left(self) -> int:
        return self.steps - self.done

    def step(self) -> None:
        if self.runner.current is not self:
            self.runner.begin(self)
        i, t = self.done, self.t
        self.y = self.y + (t[i + 1] - t[i]) * self.runner(self.y, self.step_cond, self.text, t[i], self.mask,
                                                          self.cfg_strength)
        self.done += 1

    def result(self) -> torch.Tensor:
        return self.y

    def close(self) -> None:
        self.runner.end(self)


class MelSampling:
    """Each item's full mel ([frames, n_mel], reference part included), from one batched
    integration: the set-up here, the steps in ``integration`` (run them, then ``mels()``)."""

    def __init__(self, model, items: list[ChunkItem], runner: StepRunner):
        _, steps, cfg_strength, sway = items[0].batch_key
        if any(item.batch_key != items[0].batch_key for item in items):
            raise ValueError("items with different sampling settings cannot share a batch")
        weight = next(model.transformer.parameters())
        dtype, device = weight.dtype, weight.device
        conds = [model.mel_spec(item.cond_wave.to(device)).permute(0, 2, 1)[0].to(dtype) for item in items]
        lens = torch.tensor([c.shape[0] for c in conds], device=device, dtype=torch.long)
        text = symbols_to_ids([item.text for item in items], model.vocab_char_map).to(device)
        duration = torch.tensor([item.duration for item in items], device=device, dtype=torch.long)
        duration = torch.maximum(torch.maximum((text != -1).sum(dim=-1), lens) + 1, duration).clamp(max=MAX_FRAMES)
        frames = int(duration.amax())
        batch = len(items)

        self.cond = torch.stack([F.pad(c, (0, 0, 0, frames - c.shape[0])) for c in conds])
        self.cond_mask = F.pad(lens_to_mask(lens), (0, frames - int(lens.amax())), value=False).unsqueeze(-1)
        step_cond = torch.where(self.cond_mask, self.cond, torch.zeros_like(self.cond))
        mask = lens_to_mask(duration) if batch > 1 else None
        self.durations = duration.tolist()

        noise = []
        for item, dur in zip(items, self.durations):
            generator = torch.Generator(device=device).manual_seed(item.seed)
            noise.append(F.pad(torch.randn(dur, model.num_channels, generator=generator, device=device, dtype=dtype),
                               (0, 0, 0, frames - dur)))
        y = torch.stack(noise)

        t = timesteps(steps, sway, device, dtype)
        self.integration = runner.start(y, step_cond, text, mask, t, steps, cfg_strength)

    def mels(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The items' mels from the integrated ``y``: the reference frames are the reference's own."""
        out = torch.where(self.cond_mask, self.cond, y)
        return [out[i, :d] for i, d in enumerate(self.durations)]
