"""F5-TTS inference: one small class that loads the model once and turns requests into waveforms.

Why this module exists: it is the only place that touches torch for synthesis. It computes what
f5-tts's ``F5TTS.infer`` computes (``infer_process`` -> ``infer_batch_process`` -> ``CFM.sample``
with the Euler solver), split into steps a batcher can share between jobs:

- ``plan`` turns one request into chunk items (reference prepared, text chunked, durations fixed);
- ``run_items`` samples any list of items in one model call, whatever job each came from;
- ``finish`` joins a job's chunk waveforms with cross-fades.

The sampler generates each item's starting noise from its own seeded generator (chunk ``i`` of a
job with seed ``s`` uses ``s + i``), so an item's result does not depend on what it is batched with;
chunk 0 uses exactly the noise f5-tts draws after ``seed_everything(s)``. Items of different lengths
share a call with padding masks applied in attention, which f5-tts leaves off by default and which
makes a padded item compute the same function as the item alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from f5worker.audio import TARGET_SAMPLE_RATE, cross_fade_join, joined_length, prepare_reference, remove_silences
from f5worker.checkpoint import (
    VOCODER_WEIGHTS,
    VOCOS_ARCHITECTURE,
    build_cfm,
    build_vocos,
    cfm_subject,
    ema_entries,
    ema_weights,
    model_name,
    read_model_config,
    require_finite,
    require_fit,
    shapes,
    vocos_subject,
)
from f5worker.chunking import chunk_for_model, utf8_len
from f5worker.device import pick_device, pick_dtype
from f5worker.errors import InputError
from f5worker.model_store import ModelFiles

log = logging.getLogger(__name__)

# f5-tts's inference constants (f5_tts.infer.utils_infer)
HOP_LENGTH = 256
N_MEL = 100
TARGET_RMS = 0.1
MEL_SPEC_KWARGS = dict(n_fft=1024, hop_length=HOP_LENGTH, win_length=1024, n_mel_channels=N_MEL,
                       target_sample_rate=TARGET_SAMPLE_RATE, mel_spec_type="vocos")
MAX_FRAMES = 65536  # CFM.sample's max_duration
# f5-tts sizes chunks so that reference plus chunk last about 22 s. Nothing longer than this ever
# reaches the model: it stays inside the largest single-job graph bucket (fast.SINGLE_MAX_FRAMES)
# and far inside the text embedding's position table (8192).
CHUNK_TARGET_SECONDS = 22
MAX_CHUNK_SECONDS = 30
MAX_CHUNK_FRAMES = MAX_CHUNK_SECONDS * TARGET_SAMPLE_RATE // HOP_LENGTH


@dataclass
class SynthesisRequest:
    ref_audio: np.ndarray  # mono float32, as decoded
    ref_sr: int
    ref_text: str
    gen_text: str
    seed: int
    speed: float = 1.0
    nfe_step: int = 32
    cfg_strength: float = 2.0
    sway_sampling_coef: float = -1.0
    cross_fade_duration: float = 0.15
    remove_silence: bool = False


@dataclass
class ChunkItem:
    """One chunk of one job: everything the sampler needs, nothing about the job around it."""

    cond_wave: torch.Tensor  # [1, samples] at 24 kHz, RMS-normalised, on the CPU
    text: list[str]  # pinyin-converted ref_text + chunk text, as CFM.sample takes it
    duration: int  # total frames, reference included
    ref_frames: int
    ref_rms: float
    seed: int
    steps: int
    cfg_strength: float
    sway_sampling_coef: float

    @property
    def batch_key(self) -> tuple:
        """Items may share a model call only when they integrate the same ODE grid."""
        return (self.steps, self.cfg_strength, self.sway_sampling_coef)


@dataclass
class JobPlan:
    items: list[ChunkItem]
    request: SynthesisRequest
    timings: dict[str, float] = field(default_factory=dict)


def item_frames(item: ChunkItem) -> int:
    """The frames the sampler will integrate for ``item``: its duration, raised (as CFM.sample
    does) to cover every text token and the reference."""
    return max(item.duration, len(item.text) + 1, item.ref_frames + 2)


def check_item_fits(item: ChunkItem) -> None:
    """Refuse, before anything reaches the model, an item longer than the model takes at once."""
    frames = item_frames(item)
    if frames > MAX_CHUNK_FRAMES:
        seconds = frames * HOP_LENGTH / TARGET_SAMPLE_RATE
        raise InputError(
            f"This text cannot be cut into pieces the model can speak with this voice: one piece would "
            f"need {seconds:.0f} s of audio and at most {MAX_CHUNK_SECONDS} s fit (check that the "
            "voice's transcript matches its audio).")


def planned_samples(plan: JobPlan) -> int:
    """The samples ``TTSEngine.finish`` returns for ``plan`` when silence is not removed (removing
    it only shortens), known before any model call: Vocos turns n frames into (n - 1) hops of audio,
    and chunks are joined with cross-fades."""
    lengths = [max(0, item_frames(item) - item.ref_frames - 1) * HOP_LENGTH for item in plan.items]
    return joined_length(lengths, TARGET_SAMPLE_RATE, plan.request.cross_fade_duration)


def normalise_ref_text(ref_text: str) -> str:
    """End the transcript with sentence punctuation, as preprocess_ref_audio_text does."""
    if not ref_text.endswith(". ") and not ref_text.endswith("。"):
        ref_text += " " if ref_text.endswith(".") else ". "
    return ref_text


def import_inference_modules() -> None:
    """The f5-tts and Vocos modules inference needs, without f5-tts's training imports."""
    from f5worker import f5_imports

    f5_imports.install()
    import f5_tts.model.backbones.dit  # noqa: F401
    import f5_tts.model.cfm  # noqa: F401
    import vocos  # noqa: F401


def load_cfm(files: ModelFiles, device: str, dtype: torch.dtype):
    """Build and load the CFM model as f5-tts's load_model does, from our resolved files.

    Built directly on the target device (random init of 337 M parameters on a CPU costs seconds,
    on a GPU milliseconds) and loaded from a checkpoint read straight to that device. Weights that
    do not fit the config, or are not finite once in ``dtype``, are refused with a StorageError
    (checked on the loaded tensors: the file is read once)."""
    model_cfg = read_model_config(Path(files.model_config))
    state = read_state_dict(Path(files.ckpt), device)
    with torch.device(device):
        model = build_cfm(model_cfg, Path(files.vocab), MEL_SPEC_KWARGS)
    what = cfm_subject(files.ckpt)
    require_fit(what, model_name(model_cfg, files.model_config), shapes(model.state_dict()), shapes(state))
    model = model.to(dtype)
    model.load_state_dict(state)
    require_finite(what, model.state_dict().items(), dtype)
    return model.eval()


def read_state_dict(ckpt: Path, device: str = "cpu") -> dict:
    """EMA weights with f5-tts's key fix-ups (load_checkpoint with use_ema=True)."""
    if ckpt.suffix == ".safetensors":
        from safetensors.torch import load_file

        return ema_weights(load_file(str(ckpt), device=device))
    return ema_weights(ema_entries(torch.load(str(ckpt), map_location=device, weights_only=True), ckpt))


def load_vocos(vocoder_dir: Path, device: str):
    """Vocos from config.yaml + pytorch_model.bin, as f5-tts's load_vocoder(is_local=True) does;
    weights that do not fit the config or are not finite are refused with a StorageError."""
    vocoder = build_vocos(vocoder_dir)
    state = torch.load(str(vocoder_dir / VOCODER_WEIGHTS), map_location="cpu", weights_only=True)
    what = vocos_subject(vocoder_dir)
    require_fit(what, VOCOS_ARCHITECTURE, shapes(vocoder.state_dict()), shapes(state))
    vocoder.load_state_dict(state)
    vocoder = vocoder.eval().to(device)
    require_finite(what, vocoder.state_dict().items())
    return vocoder


def epss_or_linear_timesteps(steps: int, sway: float | None, device, dtype) -> torch.Tensor:
    from f5_tts.model.utils import get_epss_timesteps

    t = get_epss_timesteps(steps, device=device, dtype=dtype)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


class TTSEngine:
    """Loads once per worker; ``plan``/``run_items``/``finish`` or ``synthesize`` for one job."""

    def __init__(self, model, vocoder, device: str, dtype: torch.dtype, step_runner=None):
        self.model = model
        self.vocoder = vocoder
        self.device = device
        self.dtype = dtype
        # Integrates the ODE; the fast path (f5worker.fast) pads to buckets and replays CUDA graphs.
        from f5worker.sampler import EagerStepRunner

        self.step_runner = step_runner or EagerStepRunner(model.transformer)

    @classmethod
    def load(cls, files: ModelFiles, device: str | None = None, fast: bool = False) -> "TTSEngine":
        device = pick_device(device)
        dtype = pick_dtype(device)
        started = time.perf_counter()
        model = load_cfm(files, device, dtype)
        vocoder = load_vocos(files.vocoder_dir, device)
        step_runner = None
        if fast:
            from f5worker.fast import BucketedStepRunner

            step_runner = BucketedStepRunner(model.transformer, use_graphs=device.startswith("cuda"))
        log.info("model loaded on %s (%s) in %.2f s from %s", device, dtype, time.perf_counter() - started, files.sources)
        return cls(model, vocoder, device, dtype, step_runner)

    # --- one job -> items ---------------------------------------------------------------------
    def plan(self, req: SynthesisRequest) -> JobPlan:
        ref = prepare_reference(req.ref_audio, req.ref_sr)
        ref_text = normalise_ref_text(req.ref_text)
        sr = req.ref_sr
        ref_seconds = len(ref) / sr
        max_chars = int(utf8_len(ref_text) / ref_seconds * (CHUNK_TARGET_SECONDS - ref_seconds) * req.speed)
        chunks = chunk_for_model(req.gen_text, max_chars)
        if not chunks:
            raise InputError("The text has nothing to speak: it is empty once spaces are removed.")
        audio = torch.from_numpy(ref).unsqueeze(0)
        rms = float(torch.sqrt(torch.mean(torch.square(audio))))
        if rms < TARGET_RMS:
            audio = audio * TARGET_RMS / rms
        if sr != TARGET_SAMPLE_RATE:
            import torchaudio

            audio = torchaudio.transforms.Resample(sr, TARGET_SAMPLE_RATE)(audio)
        # stays on the CPU: plan() runs off the model thread, and a device allocation there could
        # land in the middle of a CUDA graph capture; the sampler moves it on the model thread
        return JobPlan(items=self.items_for(audio, rms, ref_text, chunks, req), request=req)

    def items_for(self, audio: torch.Tensor, rms: float, ref_text: str, chunks: list[str],
                  req: SynthesisRequest) -> list[ChunkItem]:
        """infer_batch_process's per-chunk text and duration rules."""
        from f5_tts.model.utils import convert_char_to_pinyin

        if len(ref_text[-1].encode("utf-8")) == 1:
            ref_text = ref_text + " "
        ref_frames = audio.shape[-1] // HOP_LENGTH
        ref_len = len(ref_text.encode("utf-8"))
        items = []
        for index, chunk in enumerate(chunks):
            local_speed = 0.3 if len(chunk.encode("utf-8")) < 10 else req.speed
            duration = ref_frames + int(ref_frames / ref_len * len(chunk.encode("utf-8")) / local_speed)
            item = ChunkItem(
                cond_wave=audio, text=convert_char_to_pinyin([ref_text + chunk])[0], duration=duration,
                ref_frames=ref_frames, ref_rms=rms, seed=req.seed + index, steps=req.nfe_step,
                cfg_strength=req.cfg_strength, sway_sampling_coef=req.sway_sampling_coef)
            check_item_fits(item)
            items.append(item)
        return items

    # --- items -> waveforms (any jobs, one model call) ------------------------------------------
    @torch.inference_mode()
    def run_items(self, items: list[ChunkItem]) -> list[np.ndarray]:
        from f5worker.sampler import sample_mels

        mels = sample_mels(self.model, items, self.step_runner)
        waves = []
        for item, mel in zip(items, mels):
            gen = mel[item.ref_frames:].to(torch.float32).T.unsqueeze(0)  # [1, mel, frames]
            wave = self.vocoder.decode(gen)
            if item.ref_rms < TARGET_RMS:
                wave = wave * item.ref_rms / TARGET_RMS
            waves.append(wave.squeeze().cpu().numpy())
        return waves

    def finish(self, plan: JobPlan, waves: list[np.ndarray]) -> np.ndarray:
        wave = cross_fade_join(waves, TARGET_SAMPLE_RATE, plan.request.cross_fade_duration)
        if plan.request.remove_silence:
            wave = remove_silences(wave, TARGET_SAMPLE_RATE)
        return wave.astype(np.float32)

    def synthesize(self, req: SynthesisRequest) -> np.ndarray:
        plan = self.plan(req)
        return self.finish(plan, self.run_items(plan.items))

    def precapture_tasks(self) -> list:
        """Callables that each prepare one single-job length bucket (CUDA graph capture), to run
        when the GPU is idle; empty where the step runner has nothing to prepare."""
        prepare = getattr(self.step_runner, "prepare", None)
        if prepare is None:
            return []
        return [lambda frames=frames: prepare(1, frames, self.dtype, self.device)
                for frames in self.step_runner.single_job_buckets()]

    def warm_up(self) -> float:
        """One short synthesis so the first job pays no lazy initialisation."""
        started = time.perf_counter()
        t = np.arange(TARGET_SAMPLE_RATE * 2, dtype=np.float32) / TARGET_SAMPLE_RATE
        tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        self.synthesize(SynthesisRequest(ref_audio=tone, ref_sr=TARGET_SAMPLE_RATE, ref_text="Warm up.",
                                         gen_text="Warm up.", seed=0, nfe_step=2))
        return time.perf_counter() - started
