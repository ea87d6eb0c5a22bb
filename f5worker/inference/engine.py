"""F5-TTS inference: one small class that loads the model once and turns items into waveforms.

Why this module exists: it is the only place that runs the model. It computes what f5-tts's
``CFM.sample`` and vocoder compute for chunk items (``inference.items``) that any jobs planned
(``jobs.plan``): ``run_items`` samples any list of items in one model call, whatever job each came
from, and decodes each item's mel with the vocoder.

Which model code runs (the worker's own, or stock f5-tts's for a layout the own one does not
cover) is ``model.loader``'s choice; how the ODE is integrated is the step runner's
(``inference.sampler.StepRunner``): the sampler's eager one, or the fast path's bucketed CUDA
graphs (``inference.fast``).

The sampler generates each item's starting noise from its own seeded generator (chunk ``i`` of a
job with seed ``s`` uses ``s + i``), so an item's result does not depend on what it is batched with;
chunk 0 uses exactly the noise f5-tts draws after ``seed_everything(s)``. Items of different lengths
share a call with padding masks applied in attention, which f5-tts leaves off by default and which
makes a padded item compute the same function as the item alone; each item's text is embedded
at its own length (``model.dit.rows_alone``), which f5-tts's batched forward does not do.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from f5worker.errors import check_abandoned
from f5worker.inference.device import pick_device, pick_dtype
from f5worker.inference.fast import BucketedStepRunner
from f5worker.inference.items import ChunkItem, at_output_level
from f5worker.inference.kernel_switch import switch_tasks
from f5worker.inference.sampler import EagerStepRunner, MelSampling, StepRunner
from f5worker.model.loader import F5Model, load_model, load_vocoder
from f5worker.model.store import ModelFiles

log = logging.getLogger(__name__)


class TTSEngine:
    """Loads once per worker; ``run_items`` for any jobs' items (``jobs.plan`` makes and joins them)."""

    def __init__(self, model, vocoder, device: str, dtype: torch.dtype, step_runner: StepRunner | None = None):
        self.model = model
        self.vocoder = vocoder
        self.device = device
        self.dtype = dtype
        # Integrates the ODE; the fast path (f5worker.inference.fast) pads to buckets and replays CUDA graphs.
        self.step_runner = step_runner or EagerStepRunner(model.transformer)

    @classmethod
    def load(cls, files: ModelFiles, device: str | None = None, fast: bool = False, *,
             graph_memory_bytes: int | None = None, vocoder=None) -> "TTSEngine":
        """The engine of ``files``; ``vocoder``: one already loaded (every model of a worker shares one)."""
        device = pick_device(device)
        dtype = pick_dtype(device)
        started = time.perf_counter()
        model = load_model(files.model_config, files.ckpt, files.vocab, device, dtype)
        vocoder = vocoder if vocoder is not None else load_vocoder(files.vocoder_dir, device)
        step_runner = None
        # The fast path is written for the own model's layout; a stock fallback runs eagerly.
        if fast and isinstance(model, F5Model):
            # Served from the start on the unfused step with masked attention; the fused kernels and
            # variable-length attention follow once checked on this GPU (background_tasks).
            step_runner = BucketedStepRunner(model.transformer, use_graphs=device.startswith("cuda"), varlen=False,
                                             graph_memory_bytes=graph_memory_bytes)
        log.info("model %s loaded on %s (%s) in %.2f s from %s", files.model, device, dtype,
                 time.perf_counter() - started, files.sources)
        return cls(model, vocoder, device, dtype, step_runner)

    @property
    def weight_bytes(self) -> int:
        """The TTS model's weights on the device (the vocoder is shared, so not counted)."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    # --- items -> waveforms (any jobs, one model call) ------------------------------------------
    def start_call(self, items: list[ChunkItem], abandoned: Callable[[], bool] | None = None) -> EngineCall:
        """A model call for the items, to run a step at a time on the model thread (``EngineCall``)."""
        return EngineCall(self, items, abandoned)

    def run_items(self, items: list[ChunkItem], abandoned=None) -> list[np.ndarray]:
        """The items' waveforms; ``abandoned`` (a callable) is asked before each ODE step whether
        anyone still wants them (f5worker.errors.CallAbandoned when not)."""
        return self.start_call(items, abandoned).advance(lambda: False)

    def decode(self, items: list[ChunkItem], mels: list[torch.Tensor]) -> list[np.ndarray]:
        """Each item's waveform from its full mel: the vocoder on the generated frames, at the
        reference's loudness when it was quieter than the model's."""
        waves = []
        for item, mel in zip(items, mels):
            gen = mel[item.ref_frames:].to(torch.float32).T.unsqueeze(0)  # [1, mel, frames]
            wave = self.vocoder.decode(gen)
            waves.append(at_output_level(item, wave).squeeze().cpu().numpy())
        return waves

    def precapture_tasks(self) -> list:
        """Callables that each prepare one single-job length bucket (CUDA graph capture), to run
        when the GPU is idle; empty where the step runner has nothing to prepare."""
        runner = self.step_runner
        return [lambda frames=frames: runner.prepare(1, frames, self.dtype, self.device)
                for frames in runner.single_job_buckets()]

    def background_tasks(self, kernel_cache: Path | None = None, fused_kernels: bool = False) -> list:
        """What the model thread does while idle after start: capture the single-job graphs; on a
        GPU, then check and switch to variable-length attention where flash runs it and, with
        ``fused_kernels``, compile, check and switch to the fused kernels (f5worker.inference.kernel_switch),
        and capture the same buckets again on what was switched to."""
        captures = self.precapture_tasks()
        if not (captures and isinstance(self.step_runner, BucketedStepRunner)):
            return captures
        switches = switch_tasks(self.step_runner, self.dtype, self.device, kernel_cache, fused=fused_kernels)
        return [*captures, *switches, *captures]


class EngineCall:
    """One model call of an engine (``inference.batcher.ModelCall``), on the model thread: set up at
    its first ``advance``, integrated a step at a time, decoded after its last step. Between two
    ``advance`` calls other calls may run; its result is the same as if none had."""

    def __init__(self, engine: TTSEngine, items: list[ChunkItem], abandoned: Callable[[], bool] | None):
        self.engine, self.items, self.abandoned = engine, items, abandoned
        self.sampling: MelSampling | None = None
        self.steps = items[0].steps

    @property
    def steps_left(self) -> int:
        return self.steps if self.sampling is None else self.sampling.integration.steps_left

    @torch.inference_mode()
    def advance(self, set_aside: Callable[[], bool]) -> list[np.ndarray] | None:
        """Steps until the last, then the items' waveforms; or None after a step at which
        ``set_aside()`` says another call should run first. ``abandoned`` is asked before each
        step (f5worker.errors.CallAbandoned)."""
        try:
            if self.sampling is None:
                self.sampling = MelSampling(self.engine.model, self.items, self.engine.step_runner)
            integration = self.sampling.integration
            while integration.steps_left:
                check_abandoned(self.abandoned)
                integration.step()
                if integration.steps_left and set_aside():
                    return None
            mels = self.sampling.mels(integration.result())
        except BaseException:
            self.close()
            raise
        self.close()
        return self.engine.decode(self.items, mels)

    def close(self) -> None:
        if self.sampling is not None:
            self.sampling.integration.close()
