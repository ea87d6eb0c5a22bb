"""One synthesis job as CPU work: its request, its chunk items, and the join of their waveforms.

Why this module exists: everything about a job that is not the model lives here. It computes what
f5-tts's ``infer_process`` does before and after the model:

- ``plan`` turns one request into chunk items (``inference.items``: reference prepared, text
  chunked and converted to the model's symbols, durations fixed), each refused before the model if
  it cannot fit, and the whole refused if it plans more audio or pieces than its text's length allows;
- ``plan_segments`` plans a job spoken in several voices, a request per segment, as one job;
- ``finish`` joins a job's chunk waveforms with cross-fades;
- ``synthesize`` and ``warm_up`` run one request outside the batcher (start-up, tests, benches).

The synthesis options' defaults live in the torch-free ``jobs.options``, which the input rules read too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch

from f5worker.jobs.audio import cross_fade_join, joined_length, prepare_reference, remove_silences
from f5worker.jobs.chunking import chunk_for_model, cuts_between_words, offset_after, spaced_starts, utf8_len
from f5worker.errors import InputError
from f5worker.jobs.options import OPTION_DEFAULTS
from f5worker.jobs.resampling import to_model_rate
from f5worker.model.text_tokens import text_to_symbols
from f5worker.inference.items import ChunkItem, item_frames, item_output_samples
from f5worker.model.constants import HOP_LENGTH, SAMPLE_RATE, TARGET_RMS

# f5-tts sizes chunks so that reference plus chunk last about 22 s. Nothing longer than this ever
# reaches the model: it stays inside the largest single-job graph bucket (fast.SINGLE_MAX_FRAMES)
# and far inside the text embedding's position table (8192).
CHUNK_TARGET_SECONDS = 22
MAX_CHUNK_SECONDS = 30
MAX_CHUNK_FRAMES = MAX_CHUNK_SECONDS * SAMPLE_RATE // HOP_LENGTH
# A streamed job's first chunk is at most this share of the usual chunk budget (cut at a sentence,
# a clause or a space), so its audio is ready after a short model call.
FIRST_CHUNK_SHARE = 0.25
# What a job may plan, from its text's length in UTF-8 bytes (bytes, not characters: a CJK
# character is 3 bytes and takes about as long to say as 3 Latin letters). Speech runs about 15
# bytes a second at speed 1 and 4.5 at the slowest speed (0.3); a plan past these bounds comes
# from a transcript far shorter than its voice's audio, and would sample hours of noise.
PLANNED_SECONDS_PER_BYTE = 1.0
PLANNED_SECONDS_FLOOR = 30  # a short text may always plan this much
BYTES_PER_CHUNK = 8  # f5-tts's chunks hold whole sentences: far more than this on average


@dataclass
class SynthesisRequest:
    """A job's synthesis options, with the job input's defaults (f5worker.jobs.options)."""

    ref_audio: np.ndarray  # mono float32, as decoded
    ref_sr: int
    ref_text: str
    gen_text: str
    seed: int
    speed: float = OPTION_DEFAULTS["speed"]
    nfe_step: int = OPTION_DEFAULTS["nfe_step"]
    cfg_strength: float = OPTION_DEFAULTS["cfg_strength"]
    sway_sampling_coef: float = OPTION_DEFAULTS["sway_sampling_coef"]
    cross_fade_duration: float = OPTION_DEFAULTS["cross_fade_duration"]
    remove_silence: bool = OPTION_DEFAULTS["remove_silence"]
    # ref_audio as audio.prepare_reference makes it, when the caller has it already (a voice kept
    # prepared by f5worker.jobs.voices); plan() then skips that step. Not a job option.
    prepared_ref: np.ndarray | None = None
    model: str = ""  # the registered model that speaks it (f5worker.model.registry); "": the default
    # A streamed job's: the first chunk is cut short (FIRST_CHUNK_SHARE). Not a job option.
    short_first_chunk: bool = False


@dataclass
class JobPlan:
    items: list[ChunkItem]
    request: SynthesisRequest
    timings: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # each item's own text, as the job's segments say it
    # For each item, whether whitespace came before its text in its segment's text; None for a
    # segment's first (a new voice's turn): a subtitle cue joining two chunks reads as the text.
    spaced: list[bool | None] = field(default_factory=list)


def check_item_fits(item: ChunkItem) -> None:
    """Refuse, before anything reaches the model, an item longer than the model takes at once."""
    frames = item_frames(item)
    if frames > MAX_CHUNK_FRAMES:
        seconds = frames * HOP_LENGTH / SAMPLE_RATE
        raise InputError(
            f"This text cannot be cut into pieces the model can speak with this voice: one piece would "
            f"need {seconds:.0f} s of audio and at most {MAX_CHUNK_SECONDS} s fit (check that the "
            "voice's transcript matches its audio).")


def check_plan_bounds(plan: JobPlan, text: str, *, parts: int = 1, size: int | None = None) -> None:
    """Refuse, before any model call, a plan longer than its text can take (the bounds above);
    ``parts``: the voices' parts the text was in (each is planned as a text of its own); ``size``:
    the bytes the bounds are reckoned from, when not ``text``'s own."""
    size = utf8_len(text) if size is None else size
    seconds = planned_samples(plan) / SAMPLE_RATE
    most_seconds = max(PLANNED_SECONDS_FLOOR, PLANNED_SECONDS_PER_BYTE * size)
    most_chunks = 1 + size // BYTES_PER_CHUNK
    if seconds > most_seconds or len(plan.items) > most_chunks:
        raise InputError(
            f"For this voice the text would take {seconds:.0f} s of audio in {len(plan.items)} pieces, more than a "
            f"text of {size} bytes may ({most_seconds:.0f} s, {most_chunks} pieces): the voice's transcript is far "
            "shorter than its audio (check ref_text), or the speed is very low"
            + (f", or the text switches voices too often ({parts} parts, each at least one piece)." if parts > 1
               else "."))


def planned_samples(plan: JobPlan) -> int:
    """The samples ``finish`` returns for ``plan`` when silence is not removed (removing it only
    shortens), known before any model call: Vocos turns n frames into (n - 1) hops of audio, and
    chunks are joined with cross-fades."""
    lengths = [item_output_samples(item) for item in plan.items]
    return joined_length(lengths, SAMPLE_RATE, plan.request.cross_fade_duration)


def normalise_ref_text(ref_text: str) -> str:
    """End the transcript with sentence punctuation, as preprocess_ref_audio_text does."""
    if not ref_text.endswith(". ") and not ref_text.endswith("。"):
        ref_text += " " if ref_text.endswith(".") else ". "
    return ref_text


def plan(req: SynthesisRequest) -> JobPlan:
    ref = req.prepared_ref if req.prepared_ref is not None else prepare_reference(req.ref_audio, req.ref_sr)
    ref_text = normalise_ref_text(req.ref_text)
    ref_seconds = len(ref) / req.ref_sr
    max_chars = int(utf8_len(ref_text) / ref_seconds * (CHUNK_TARGET_SECONDS - ref_seconds) * req.speed)
    chunks = (chunks_with_short_first(req.gen_text, max_chars) if req.short_first_chunk
              else chunk_for_model(req.gen_text, max_chars))
    if not chunks:
        raise InputError("The text has nothing to speak: it is empty once spaces are removed.")
    audio = torch.from_numpy(ref).unsqueeze(0)
    rms = float(torch.sqrt(torch.mean(torch.square(audio))))
    if rms < TARGET_RMS:
        audio = audio * TARGET_RMS / rms
    # stays on the CPU: plan() runs off the model thread, and a device allocation there could
    # land in the middle of a CUDA graph capture; the sampler moves it on the model thread
    audio = torch.from_numpy(to_model_rate(audio[0].numpy(), req.ref_sr)).unsqueeze(0)
    job = JobPlan(items=items_for(audio, rms, ref_text, chunks, req), request=req, texts=chunks,
                  spaced=[None] + spaced_starts(req.gen_text, chunks)[1:])
    check_plan_bounds(job, req.gen_text)
    return job


def plan_segments(requests: list[SynthesisRequest], *, written_bytes: int = 0) -> JobPlan:
    """One job of several segments, each with its own voice (a request each, in order), as one
    plan: each segment is planned as ``plan`` plans a job, with its chunks numbered on from the
    segments before it, so every item's seed is the job's seed plus its index over the whole job
    (no two items share noise, and a job of one segment is planned exactly as before). ``finish``
    joins all the items in order, with the first request's cross-fade and silence removal (the
    job's own, the same in every request). ``written_bytes``: the job's text as sent, its voice
    tags included, which the whole plan's bounds are reckoned from where it is longer than the
    parts' texts joined: every part is at least one piece, so a dialogue of short lines
    ("[alice] Hi! [bob] Hello.") was refused by a bound that left its tags out."""
    items: list[ChunkItem] = []
    texts: list[str] = []
    spaced: list[bool | None] = []
    for req in requests:
        part = plan(replace(req, seed=req.seed + len(items)))
        items += part.items
        texts += part.texts
        spaced += part.spaced
    job = JobPlan(items=items, request=requests[0], texts=texts, spaced=spaced)
    if len(requests) > 1:  # each part met its own bounds, floors included; the job meets its text's
        joined = " ".join(req.gen_text for req in requests)
        check_plan_bounds(job, joined, parts=len(requests), size=max(utf8_len(joined), written_bytes))
    return job


def chunks_with_short_first(text: str, max_chars: int) -> list[str]:
    """``chunk_for_model``'s chunks, except that the first is at most ``FIRST_CHUNK_SHARE`` of
    ``max_chars`` bytes; the rest of the text, from where that chunk ends in ``text`` itself, is
    chunked as usual. A short first chunk that would end inside a word (one longer than the short
    budget) is not taken: the job is chunked as if not streamed, since text is never cut where the
    unstreamed job keeps it whole."""
    first = chunk_for_model(text, max(1, int(max_chars * FIRST_CHUNK_SHARE)))[:1]
    if not first:
        return []
    end = offset_after(text, first[0])
    if not cuts_between_words(text, end):  # "https://downloads." of a long address is no clause
        return chunk_for_model(text, max_chars)
    return first + chunk_for_model(text[end:], max_chars)


def items_for(audio: torch.Tensor, rms: float, ref_text: str, chunks: list[str],
              req: SynthesisRequest) -> list[ChunkItem]:
    """infer_batch_process's per-chunk text and duration rules."""
    if len(ref_text[-1].encode("utf-8")) == 1:
        ref_text = ref_text + " "
    ref_frames = audio.shape[-1] // HOP_LENGTH
    ref_len = len(ref_text.encode("utf-8"))
    items = []
    for index, chunk in enumerate(chunks):
        local_speed = 0.3 if len(chunk.encode("utf-8")) < 10 else req.speed
        duration = ref_frames + int(ref_frames / ref_len * len(chunk.encode("utf-8")) / local_speed)
        item = ChunkItem(
            cond_wave=audio, text=text_to_symbols(ref_text + chunk), duration=duration,
            ref_frames=ref_frames, ref_rms=rms, seed=req.seed + index, steps=req.nfe_step,
            cfg_strength=req.cfg_strength, sway_sampling_coef=req.sway_sampling_coef, model=req.model)
        check_item_fits(item)
        items.append(item)
    return items


def finish(job: JobPlan, waves: list[np.ndarray]) -> np.ndarray:
    wave = cross_fade_join(waves, SAMPLE_RATE, job.request.cross_fade_duration)
    if job.request.remove_silence:
        wave = remove_silences(wave, SAMPLE_RATE)
    return wave.astype(np.float32)


class ItemRunner(Protocol):
    """What runs chunk items: ``inference.engine.TTSEngine`` (any jobs' items in one model call)."""

    def run_items(self, items: list[ChunkItem], abandoned: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """Each item's waveform at 24 kHz, in order."""


def synthesize(runner: ItemRunner, req: SynthesisRequest) -> np.ndarray:
    """One request end to end in one model call, outside the batcher: the warm-up, tests, benches."""
    job = plan(req)
    return finish(job, runner.run_items(job.items))


def warm_up(runner: ItemRunner) -> float:
    """One short synthesis so the first job pays no lazy initialisation; its seconds."""
    started = time.perf_counter()
    t = np.arange(SAMPLE_RATE * 2, dtype=np.float32) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    synthesize(runner, SynthesisRequest(ref_audio=tone, ref_sr=SAMPLE_RATE, ref_text="Warm up.",
                                        gen_text="Warm up.", seed=0, nfe_step=2))
    return time.perf_counter() - started
