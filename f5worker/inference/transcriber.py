"""Transcribe a reference voice with Whisper when a job gives no ``ref_text`` and none is stored.

Why this module exists: f5-tts's own ``transcribe`` keeps its pipeline in a module global, loads it
from the hub by repo id and is not safe to call from several threads. ``Transcriber`` does the same
work (transformers' ASR pipeline, 30 s chunks, task "transcribe", fp16 on CUDA) on the folder that
``model.store.resolve_asr_model`` found, loads it once under a lock, and reports a model that cannot
be loaded as a ``StorageError`` (the job that needed it adds what it can do instead).

Audio of one 30 s window (every chunk a job samples, most reference clips) is transcribed with the
encoder run once, by hand: the pipeline would run it twice (once to detect the language, once to
generate), and a verified, word-timed job would run it a third time to align the chunk. ``hear``
returns that encoder output with the text (``Heard``) for ``align`` to reuse. Longer audio goes
through the pipeline's own 30 s chunking, as before.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from f5worker.inference.alignment import align_words, encode, language_token, token_room, word_token_ids
from f5worker.inference.device import pick_device, pick_dtype
from f5worker.errors import StorageError
from f5worker.model.store import resolve_asr_model
from f5worker.settings import Settings

log = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
CHUNK_SECONDS = 30
# What transformers' ASR pipeline adds to a checkpoint's generation config where the checkpoint does
# not set it (openai-whisper's beam of 5; the real checkpoints set max_length, so only the beams
# apply): one window transcribed by hand decodes as the pipeline would
# (tests/test_transcriber.py holds the two to the same text and these to the pipeline's own).
PIPELINE_GENERATION_DEFAULTS = {"max_new_tokens": 256, "num_beams": 5}


@dataclass(frozen=True)
class Heard:
    """A transcript, and the encoder output it was read from, for ``Transcriber.align`` of the same
    audio to reuse (None when not asked to keep it, or past one window)."""

    text: str
    encoded: object | None = None


class Transcriber:
    def __init__(self, settings: Settings, device: str | None = None):
        self.settings = settings
        self.device = pick_device(device or settings.device)
        self._pipe = None
        self._lock = threading.Lock()  # guards loading and the pipeline, which is not thread-safe
        self._stream = None

    def _own_stream(self):
        """On a GPU, Whisper's own CUDA stream: copying its weights in (1.6 GB) and transcribing
        then never queue behind, or in front of, the TTS graphs on the model thread's stream."""
        if not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(self._stream)

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def _load_locked(self):
        if self._pipe is not None:
            return self._pipe
        folder = resolve_asr_model(self.settings)  # raises StorageError itself
        dtype = pick_dtype(self.device)
        started = time.perf_counter()
        try:
            from transformers import pipeline

            with self._own_stream():
                self._pipe = pipeline("automatic-speech-recognition", model=str(folder), dtype=dtype,
                                      device=self.device)
        except Exception as exc:
            raise StorageError(
                f"The transcription model in {folder} could not be loaded ({type(exc).__name__})."
            ) from exc
        log.info("transcriber loaded from %s on %s (%s) in %.2f s", folder, self.device, dtype,
                 time.perf_counter() - started)
        return self._pipe

    def load(self):
        """The loaded pipeline; loads it on first use."""
        with self._lock:
            return self._load_locked()

    def transcribe(self, samples: np.ndarray, sr: int) -> str:
        """Mono float samples at any rate -> the stripped transcript."""
        return self.hear(samples, sr).text

    def hear(self, samples: np.ndarray, sr: int, *, keep: bool = False, language: str | None = None) -> Heard:
        """``transcribe``, and with ``keep`` the encoder output it read, for ``align`` of the same
        samples (it holds a window's encoder states on the model's device until dropped).
        ``language``: the code of the language the audio is known to be in (a chunk's text's), where
        the model has it; else Whisper detects it (unreliable on a second or two of speech)."""
        audio = at_whisper_rate(samples, sr)
        with self._lock:
            pipe = self._load_locked()
            told = generation_language(pipe.model, language)
            with torch.inference_mode(), self._own_stream():
                if len(audio) > pipe.feature_extractor.n_samples:
                    return Heard(self._long_form(pipe, audio, told))
                encoded = encode(pipe.model, pipe.feature_extractor, audio)
                return Heard(self._generate(pipe, encoded, told), encoded if keep else None)

    @staticmethod
    def _generate(pipe, encoded, told: dict) -> str:
        """One window's transcript from its encoder output (the language detected from it too,
        unless ``told``: ``generation_language``'s)."""
        model = pipe.model
        given = model.generation_config.to_diff_dict()
        added = {key: value for key, value in PIPELINE_GENERATION_DEFAULTS.items()
                 if key not in given and not (key == "max_new_tokens" and "max_length" in given)}
        ids = model.generate(encoder_outputs=encoded, task="transcribe", **told, **added)
        return pipe.tokenizer.decode(ids[0], skip_special_tokens=True).strip()

    @staticmethod
    def _long_form(pipe, audio: np.ndarray, told: dict) -> str:
        result = pipe({"raw": audio, "sampling_rate": WHISPER_SAMPLE_RATE}, chunk_length_s=CHUNK_SECONDS,
                      batch_size=16, generate_kwargs={"task": "transcribe", **told}, return_timestamps=False,
                      ignore_warning=True)
        return result["text"].strip()

    def align(self, samples: np.ndarray, sr: int, words: list[str], language: str, *,
              encoded: object | None = None) -> list[tuple[float, float]]:
        """Each word's (start, end) in seconds in ``samples`` (at most 30 s at any rate), by forced
        alignment (``inference.alignment``); ``words`` as ``jobs.words.Word.as_said`` gives them;
        ``encoded``: ``hear(samples, sr, keep=True).encoded`` of these same samples, if at hand."""
        audio = at_whisper_rate(samples, sr)
        with self._lock:
            pipe = self._load_locked()
            with self._own_stream():
                return align_words(pipe.model, pipe.tokenizer, pipe.feature_extractor, audio, words, language,
                                   encoded=encoded)

    def alignment_tokens(self, chunks: list[list[str]], languages: list[str]) -> list[tuple[int, int]]:
        """For each chunk's words (in its language), how many tokens they take and how many one
        alignment pass reads (``token_room``); under the lock once for all chunks."""
        with self._lock:
            pipe = self._load_locked()
            return [(sum(map(len, word_token_ids(pipe.tokenizer, words))), token_room(pipe.model, pipe.tokenizer, language))
                    for words, language in zip(chunks, languages)]


def generation_language(model, language: str | None) -> dict:
    """``generate``'s ``language`` for a language code the model has a token for, else nothing
    (an English-only model, or a language Whisper lacks: it is detected, as before)."""
    if not language:
        return {}
    token = language_token(language)
    return {"language": token} if token in (getattr(model.generation_config, "lang_to_id", None) or {}) else {}


def at_whisper_rate(samples: np.ndarray, sr: int) -> np.ndarray:
    """Mono float32 at Whisper's 16 kHz."""
    audio = np.asarray(samples, dtype=np.float32)
    if sr != WHISPER_SAMPLE_RATE:
        import torchaudio.functional as AF

        audio = AF.resample(torch.from_numpy(audio), sr, WHISPER_SAMPLE_RATE).numpy()
    return audio
