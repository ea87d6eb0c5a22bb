"""The guard against F5-TTS's known failures, on request (``"verify": true``): is a chunk's audio
what its text says?

Why this module exists: F5-TTS sometimes swallows words, cuts an ending off, repeats itself or
rushes a sentence into a fraction of its time, and its maintainers' answer is to sample again with
another seed. Here each chunk is judged as it is sampled: first the audio itself (finite, not
silent, not clipped, its speech not squeezed into a small part of the time the plan gave it),
then the worker's Whisper's transcript against the chunk's text, both normalised the same way
(case, punctuation, numbers as words): the word error rate, or the character error rate for
scripts written without spaces, and whether the text's last word was heard at the end. A chunk
that fails is sampled again with another seed (``retry_seed``), up to the job's bound, and the
best try is kept (``Try.rank``). Which chunks, how many tries and why, goes into the result.

The thresholds are not tuned on F5-TTS's real output (no real weights reach the machines this was
built on): the defaults are conservative, so that only plain failures are retried.
"""
from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Protocol

import jiwer
import numpy as np

from f5worker.inference.batcher import JobTurn
from f5worker.inference.items import ChunkItem, at_model_level, item_output_samples, item_work
from f5worker.inference.transcriber import Heard
from f5worker.jobs.audio import chunk_dbfs
from f5worker.jobs.normalize import language_of, normalize
from f5worker.jobs.options import VERIFY_DEFAULT_MAX_ERROR, VERIFY_DEFAULT_RETRIES
from f5worker.model.constants import SAMPLE_RATE

RETRY_SEED_STRIDE = 1_000_003  # a prime past any job's chunk count: a retry's noise is no chunk's own
SILENT_DB = -45.0  # the whole chunk's level below this: nothing was said (outputs sit near -20 dBFS)
CLIP_LEVEL = 0.999
MAX_CLIPPED_SHARE = 0.01
VOICED_DB = -40.0  # a 10 ms step louder than this is speech
MIN_VOICED_SHARE = 0.35  # speech in less of the planned time than this: the text was rushed
DEADLINE_RESERVE = 0.1  # of the time left as sampling begins: kept for the file's end and its upload
ENDING_WINDOW_WORDS = 3  # the text's last word must be among the transcript's last few
VARIATION_SELECTORS = re.compile(r"[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
# Hebrew points and cantillation, Arabic harakat and Quranic marks: written in a text to steer its
# reading, rarely in Whisper's transcript of it, so each pointed word would count as misheard.
POINTING = re.compile(r"[\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u08d3-\u08ff]")
MAX_PERCENT_PLACES = 15
NO_SPACE_SCRIPTS = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


@dataclass(frozen=True)
class GuardOptions:
    max_error: float = VERIFY_DEFAULT_MAX_ERROR
    retries: int = VERIFY_DEFAULT_RETRIES
    language: str = "en"  # the model's (model.registry), for numbers in both texts


@dataclass(frozen=True)
class Try:
    """One sampling of a chunk, judged."""

    seed: int
    error: float | None  # WER or CER against the text; None when the audio failed before transcription
    reason: str | None  # why it is rejected; None: accepted

    @property
    def rank(self) -> tuple:
        """Smaller is better: accepted before rejected, a judged transcript before a failed audio,
        then the lower error."""
        return (self.reason is not None, self.error is None, self.error or 0.0)


@dataclass
class ChunkReport:
    tries: list[Try] = field(default_factory=list)
    kept: int = 0  # index into tries
    out_of_time: bool = False  # retries it had left were not made: the job's deadline was near

    @property
    def best(self) -> Try:
        return self.tries[self.kept]

    def as_result(self) -> dict:
        best = self.best
        return {"error": None if best.error is None else round(best.error, 3), "tries": len(self.tries),
                "kept_try": self.kept + 1, "retried_because": [t.reason for t in self.tries if t.reason],
                **({"out_of_time": True} if self.out_of_time else {})}


def retry_seed(seed: int, attempt: int, max_seed: int) -> int:
    return (seed + attempt * RETRY_SEED_STRIDE) % (max_seed + 1)


def audio_fault(wave: np.ndarray, planned_samples: int) -> str | None:
    """Why ``wave`` (24 kHz) cannot be what was asked, before anything is transcribed; None if it may be."""
    if not np.isfinite(wave).all():
        return "its audio has samples that are not finite numbers"
    if len(wave) == 0 or _level_db(wave) < SILENT_DB:
        return "it is silent"
    clipped = float(np.mean(np.abs(wave) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_SHARE:
        return f"{clipped:.1%} of its samples are clipped"
    voiced = float(np.sum(chunk_dbfs(wave, SAMPLE_RATE) > VOICED_DB)) * SAMPLE_RATE // 100
    if planned_samples > 0 and voiced / planned_samples < MIN_VOICED_SHARE:
        return f"its speech fills only {voiced / planned_samples:.0%} of its time (rushed)"
    return None


def _level_db(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def comparable(text: str, language: str) -> str:
    """``text`` as the two sides are compared: numbers as words, compatibility forms folded,
    lower case, punctuation and symbols gone, one space between words; what is never said
    (soft hyphens, zero-width joiners and spaces, emoji variation selectors) gone without a trace,
    so it neither splits a word nor stands as one; nor Hebrew and Arabic vowel points (``POINTING``)."""
    text = unicodedata.normalize("NFKC", normalize(text, language).text).lower()
    text = "".join("" if unicodedata.category(c) == "Cf" or VARIATION_SELECTORS.match(c) or _is_pointing(c)
                   else " " if unicodedata.category(c)[0] in "PSZ" or c.isspace() else c for c in text)
    return " ".join(text.split())


def _is_pointing(c: str) -> bool:
    return unicodedata.category(c) == "Mn" and POINTING.match(c) is not None


def transcript_error(said: str, heard: str, language: str) -> tuple[float, bool]:
    """The error of ``heard`` against ``said`` (WER, or CER for scripts without spaces) and
    whether the text's ending was heard."""
    return comparable_error(comparable(said, language), comparable(heard, language))


def comparable_error(said: str, heard: str) -> tuple[float, bool]:
    """``transcript_error`` of two texts already ``comparable``."""
    if not said:
        return 0.0, True
    if NO_SPACE_SCRIPTS.search(said):
        said_chars, heard_chars = said.replace(" ", ""), heard.replace(" ", "")
        error = jiwer.cer(said_chars, heard_chars) if heard_chars else 1.0
        ending = said_chars[-2:] in heard_chars[-(2 * ENDING_WINDOW_WORDS):]
        return float(error), ending
    error = jiwer.wer(said, heard) if heard else 1.0
    return float(error), said.split()[-1] in heard.split()[-ENDING_WINDOW_WORDS:]


def percents(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` as percentages with the fewest decimals that tell them apart, so a
    rejection never reads "by 30% (more than 30%)"."""
    for places in range(MAX_PERCENT_PLACES + 1):  # a float's 17 digits tell any two apart by then
        shown, bound = f"{value:.{places}%}", f"{limit:.{places}%}"
        if shown != bound:
            break
    return shown, bound


def judge(wave: np.ndarray, text: str, heard: str | None, *, seed: int, planned_samples: int,
          options: GuardOptions) -> Try:
    """One try of a chunk judged; ``heard`` is None when the audio already failed (``audio_fault``)."""
    fault = audio_fault(wave, planned_samples)
    if fault is not None or heard is None:
        return Try(seed, None, fault or "it was not transcribed")
    language = language_of(text, options.language)
    said, heard = comparable(text, language), comparable(heard, language)
    error, ending = comparable_error(said, heard)
    if said and not heard:
        return Try(seed, error, "nothing was heard in it")
    if error > options.max_error:
        shown, limit = percents(error, options.max_error)
        return Try(seed, error, f"its transcript differs from its text by {shown} (more than {limit})")
    if not ending:
        return Try(seed, error, "its last words were not heard")
    return Try(seed, error, None)


def job_summary(reports: list[ChunkReport]) -> dict:
    """The result's ``verify``: the worst chunk kept, and how many were retried or still fail."""
    worst = max(range(len(reports)), key=lambda i: reports[i].best.rank)
    return {"worst_chunk": worst, "worst_error": reports[worst].as_result()["error"],
            "retried_chunks": sum(len(r.tries) > 1 for r in reports),
            "failed_chunks": sum(r.best.reason is not None for r in reports),
            "out_of_time_chunks": sum(r.out_of_time for r in reports)}


class Sampler(Protocol):
    """What samples items: ``inference.batcher.Batcher``."""

    def enqueue(self, items: list[ChunkItem], turn: JobTurn | None = None) -> list[asyncio.Future]: ...

    async def sampled(self, future: asyncio.Future) -> np.ndarray: ...

    def withdraw(self, futures: list[asyncio.Future]) -> None: ...


class GuardedSampling:
    """A job's chunks sampled in windows of ``window``, each chunk judged (``judge``) as its window
    comes back; the rejected ones of a window sampled again together (one model call), each with
    its next ``retry_seed``, until accepted or out of retries; then the window's best tries handed
    on in order, each with what its transcription kept (``Heard.encoded``: the alignment reuses
    it). ``transcribe(wave, language)`` runs the worker's Whisper on a chunk (on the model thread),
    told the language of the chunk's text (``normalize.language_of``).

    ``time_left()``: seconds to the job's deadline (None: no deadline). A retry round is begun
    only if, at the pace of the window's first round, it and the first rounds of the windows after
    it still end ``DEADLINE_RESERVE`` of the time then left before the deadline: retries spend spare
    time, and never turn a job that would have finished into one stopped with nothing."""

    def __init__(self, sampler: Sampler, transcribe: Callable[[np.ndarray, str], Awaitable[Heard]], *,
                 options: GuardOptions, window: int, max_seed: int,
                 time_left: Callable[[], float] | None = None):
        self.sampler, self.transcribe = sampler, transcribe
        self.options, self.window, self.max_seed = options, window, max_seed
        self.time_left = time_left
        self.turn = JobTurn()

    async def run(self, items: list[ChunkItem], texts: list[str],
                  chunk_done: Callable[[np.ndarray, object | None], Awaitable[None]]) -> list[ChunkReport]:
        reports: list[ChunkReport] = []
        reserve = None if self.time_left is None else DEADLINE_RESERVE * self.time_left()
        for start in range(0, len(items), self.window):
            part, said = items[start:start + self.window], texts[start:start + self.window]
            self.turn.work_after = sum(map(item_work, items[start + self.window:]))
            began = time.perf_counter()
            best = await self._together(part)
            judged = [await self._judged(item, text, wave) for item, text, wave in zip(part, said, best)]
            part_reports = [ChunkReport([tried]) for tried, _ in judged]
            kept = [encoded for _, encoded in judged]
            windows_after = -(-(len(items) - start - len(part)) // self.window)
            # a retry round, then the first round of each window after it, at this window's pace
            needed_s = (time.perf_counter() - began) * (1 + windows_after)
            await self._retried(part, said, part_reports, best, kept, needed_s=needed_s, reserve=reserve)
            for wave, encoded in zip(best, kept):
                await chunk_done(wave, encoded)
            reports += part_reports
        return reports

    async def _retried(self, part: list[ChunkItem], said: list[str], reports: list[ChunkReport],
                       best: list[np.ndarray], kept: list[object | None], *, needed_s: float,
                       reserve: float | None) -> None:
        """A window's rejected chunks sampled again, round by round, while retries last and
        ``needed_s`` still leaves ``reserve`` before the deadline; each one's best try put in
        ``best`` and ``kept`` (what its transcription kept)."""
        for attempt in range(1, self.options.retries + 1):
            rejected = [k for k, report in enumerate(reports) if report.best.reason is not None]
            if not rejected:
                return
            if reserve is not None and self.time_left() - needed_s < reserve:
                for k in rejected:
                    reports[k].out_of_time = True
                return
            again = [replace(part[k], seed=retry_seed(part[k].seed, attempt, self.max_seed)) for k in rejected]
            for k, item, wave in zip(rejected, again, await self._together(again)):
                report = reports[k]
                tried, encoded = await self._judged(item, said[k], wave)
                report.tries.append(tried)
                if tried.rank < report.best.rank:
                    report.kept, best[k], kept[k] = len(report.tries) - 1, wave, encoded

    async def _together(self, items: list[ChunkItem]) -> list[np.ndarray]:
        futures = self.sampler.enqueue(items, self.turn)
        try:
            return [await self.sampler.sampled(future) for future in futures]
        finally:
            self.sampler.withdraw(futures)  # a failed or cancelled job leaves the queue

    async def _judged(self, item: ChunkItem, text: str, wave: np.ndarray) -> tuple[Try, object | None]:
        """The try judged, and what its transcription kept for the alignment. The audio checks read
        the model's own level: a quiet voice's output is lowered to its reference's loudness,
        which no other seed changes, and is no fault."""
        planned, made = item_output_samples(item), at_model_level(item, wave)
        language = language_of(text, self.options.language)
        heard = None if audio_fault(made, planned) else await self.transcribe(wave, language)
        verdict = judge(made, text, None if heard is None else heard.text, seed=item.seed, planned_samples=planned,
                        options=self.options)
        return verdict, None if heard is None else heard.encoded
