"""What one model call is asked for: chunk items, the frames each integrates, the step bound.

Why this module exists: the job plan above makes items and the sampler, batcher and fast path
below consume them; defined here, at the bottom of the inference layer, so the plan imports
inference and never the other way. Torch-free at import (the tensor is only an annotation), since
the input rules read ``MAX_NFE_STEP`` at start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from f5worker.model.constants import HOP_LENGTH, TARGET_RMS

# The most ODE steps a job may ask for; the fast path's on-device time grid holds MAX_NFE_STEP + 1.
MAX_NFE_STEP = 64


@dataclass
class ChunkItem:
    """One chunk of one job: everything the sampler needs, nothing about the job around it."""

    cond_wave: torch.Tensor  # [1, samples] at 24 kHz, RMS-normalised, on the CPU
    text: list[str]  # the model's symbols for ref_text + chunk text (pinyin for Chinese)
    duration: int  # total frames, reference included
    ref_frames: int
    ref_rms: float
    seed: int
    steps: int
    cfg_strength: float
    sway_sampling_coef: float
    model: str = ""  # the registered model that samples it (f5worker.model.registry); "": the default

    @property
    def batch_key(self) -> tuple:
        """Items may share a model call only when one model integrates the same ODE grid for them."""
        return (self.model, self.steps, self.cfg_strength, self.sway_sampling_coef)


def item_frames(item: ChunkItem) -> int:
    """The frames the sampler will integrate for ``item``: its duration, raised (as CFM.sample
    does) to cover every text token and the reference."""
    return max(item.duration, len(item.text) + 1, item.ref_frames + 2)


def item_work(item: ChunkItem) -> int:
    """Steps x frames: what sampling ``item`` costs, as the batcher's shortest-work-first rule counts it."""
    return item.steps * item_frames(item)


def item_output_samples(item: ChunkItem) -> int:
    """The samples of 24 kHz audio ``item`` comes out as: Vocos turns n frames into (n - 1) hops,
    and the reference's frames are cut off."""
    return max(0, item_frames(item) - item.ref_frames - 1) * HOP_LENGTH



def at_output_level(item: ChunkItem, wave):
    """The model's output ``wave`` (tensor or array) as the job gets it: a reference quieter than
    ``TARGET_RMS`` was raised to it for the model, and its output is lowered by as much (f5-tts's
    rule, in its order of operations), so that it sounds like its voice."""
    return wave * item.ref_rms / TARGET_RMS if item.ref_rms < TARGET_RMS else wave


def at_model_level(item: ChunkItem, wave):
    """``at_output_level`` undone: the output at the level the model made it (a silent reference's
    output stays as it is, silent)."""
    return wave * TARGET_RMS / item.ref_rms if 0 < item.ref_rms < TARGET_RMS else wave
