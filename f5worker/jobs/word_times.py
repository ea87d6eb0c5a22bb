"""A job's word times and subtitles (``"timestamps": "word"``, ``"subtitles": "srt"|"vtt"``):
each chunk's words aligned as it is sampled, then shaped into the result and the subtitle file.

Why this module exists: the TTS workflow stays a sequence of named steps. Here are the checks
made before any model call (the worker has the aligner, every chunk fits one alignment pass), the
alignment of one chunk on the model thread (``inference.alignment`` through the worker's
Whisper), and the result's ``words`` and subtitle text from the assembled times
(``jobs.assembly`` maps them through cross-fades, removed pauses and the output rate).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Awaitable, Callable, Protocol

import numpy as np

from f5worker.errors import InputError
from f5worker.jobs.assembly import Assembled
from f5worker.jobs.normalize import language_of
from f5worker.jobs.subtitles import build_cues, render
from f5worker.jobs.words import Word, split_words
from f5worker.model.constants import SAMPLE_RATE


class Aligner(Protocol):
    def load(self): ...

    def align(self, samples: np.ndarray, sr: int, words: list[str], language: str, *,
              encoded: object | None = None) -> list[tuple[float, float]]: ...

    def alignment_tokens(self, chunks: list[list[str]], languages: list[str]) -> list[tuple[int, int]]: ...


class ChunkWords:
    """One job's chunks' words, aligned one chunk at a time."""

    def __init__(self, aligner: Aligner | None, texts: list[str], model_language: str, *,
                 spaced: list[bool | None], on_model_thread: Callable[..., Awaitable],
                 off_loop: Callable[..., Awaitable]):
        """``spaced``: ``JobPlan.spaced``, whether whitespace came before each chunk in the text
        (None, a new voice's turn: a space unless it begins in a script written without them)."""
        self.aligner = aligner
        self.words = [split_words(text) for text in texts]
        for words, space in zip(self.words[1:], spaced[1:]):  # a cue joining two chunks reads as the text
            if words:
                words[0] = dataclasses.replace(words[0], space_before=not words[0].unspaced if space is None else space)
        self.languages = [language_of(text, model_language) for text in texts]
        self.on_model_thread = on_model_thread
        self.off_loop = off_loop

    async def check(self) -> None:
        """Refused before any model call: a worker without the aligner, or a chunk too long for
        one alignment pass (Whisper's decoder reads 448 tokens, far more than a chunk's words)."""
        if self.aligner is None:
            raise InputError("'timestamps' and 'subtitles' need the worker's transcription model, "
                             "and this worker has none.")
        await self.off_loop(self.aligner.load)
        counts = await self.off_loop(self.aligner.alignment_tokens, [[w.as_said for w in words] for words in self.words],
                                     self.languages)
        for n, (used, room) in enumerate(counts, 1):
            if used > room:
                raise InputError(f"Chunk {n} of the text takes {used} tokens, more than the {room} one alignment "
                                 "pass reads; split its sentences, or leave out 'timestamps' and 'subtitles'.")

    async def align(self, index: int, wave: np.ndarray,
                    encoded: object | None = None) -> tuple[list[Word], list[tuple[float, float]]]:
        """Chunk ``index``'s words and their (start, end) in seconds of ``wave`` (24 kHz);
        ``encoded``: what the chunk's transcription kept of ``wave``, when it was verified."""
        words = self.words[index]
        spans = await self.on_model_thread(functools.partial(self.aligner.align, encoded=encoded), wave, SAMPLE_RATE,
                                           [w.as_said for w in words], self.languages[index])
        return words, spans


def add_word_times(assembled: Assembled) -> None:
    """Each segment's ``words``: every word of its text with its start and end in the output."""
    for segment, words in zip(assembled.segments, assembled.words):
        segment["words"] = [{"word": w.word.text, "start": w.start, "end": w.end} for w in words]


def subtitle_text(assembled: Assembled, fmt: str) -> str:
    """The job's subtitle file in ``fmt`` (srt or vtt)."""
    words = [word for chunk in assembled.words for word in chunk]
    return render(build_cues(words, assembled.duration), fmt)
