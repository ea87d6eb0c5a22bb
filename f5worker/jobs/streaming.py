"""A TTS job's audio as pieces sent while it is being synthesised (``"stream": true``).

Why this module exists: a streamed job sends its audio as raw 16-bit PCM while later chunks are
still being sampled, and a caller who concatenates the pieces must hold exactly the samples of the
stored file. ``AudioStream`` takes the job's chunk waveforms in order and gives out the pieces:

* Cross-fades: chunks are joined as ``jobs.plan.finish`` joins them (``jobs.assembly.CrossFadeJoin``),
  so the last cross-fade window of what has been joined so far is held back until the next chunk
  arrives (it is faded into that chunk's start), and sent at the end.
* Sample rate: pieces are resampled with soxr's streaming resampler at the quality the stored file
  is resampled with (``resampling.from_model_rate``); soxr gives the same samples fed in pieces as in one
  call, so the streamed audio equals the stored audio at any of the job's sample rates.
* PCM: the float samples become 16-bit PCM by ``encoding.pcm16``, the conversion the stored WAV
  and FLAC are written from, so a streamed sample equals the stored file's sample exactly.
* Size: runpod streams each yielded item as one HTTP message and RunPod keeps stream items well
  under 1 MB; a piece's base64 is at most ``MAX_PIECE_BASE64_BYTES`` (a long chunk is sent as
  several pieces). runpod also keeps every yielded item in the job's output (the endpoint's
  ``return_aggregate_stream``), which is one RunPod result of at most ``F5_MAX_RESULT_BYTES``: the
  pieces' share of it is known from the job's plan (``planned_output_bytes``), so a job
  whose pieces cannot fit is refused before its model calls, and counted as they go
  (``AudioStream.output_bytes``) for the room left to the result.

Removing silences works on the whole joined waveform, so it cannot be streamed (refused earlier).
"""
from __future__ import annotations

import json
import logging
from typing import Protocol

import numpy as np

from f5worker.jobs.assembly import CrossFadeJoin
from f5worker.jobs.encoding import pcm16, size_text, to_base64
from f5worker.settings import ENV_MAX_RESULT_BYTES
from f5worker.jobs.resampling import OutputStream
from f5worker.model.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

PCM_FORMAT = "pcm_s16le"  # signed 16-bit little-endian samples, mono, no header
PCM_BYTES_PER_SAMPLE = 2
MAX_PIECE_BASE64_BYTES = 256 * 1024
# The most samples one piece holds so that its base64 stays within MAX_PIECE_BASE64_BYTES.
MAX_PIECE_SAMPLES = MAX_PIECE_BASE64_BYTES // 4 * 3 // PCM_BYTES_PER_SAMPLE
LIST_SEPARATOR_BYTES = len(", ")  # between the items of the job's output list, as json.dumps writes it


def piece(index: int, sample_rate: int, audio_base64: str, seconds: float) -> dict:
    """One stream piece as it is yielded."""
    return {"chunk": index, "format": PCM_FORMAT, "sample_rate": sample_rate, "channels": 1,
            "audio_base64": audio_base64, "seconds": seconds}


def output_bytes(item: dict) -> int:
    """What ``item`` adds to the job's output list, serialised as the runpod SDK does (JSON, UTF-8)."""
    return len(json.dumps(item, ensure_ascii=False).encode("utf-8")) + LIST_SEPARATOR_BYTES


def planned_output_bytes(samples: int, sample_rate: int, chunks: int) -> int:
    """The most bytes the pieces of a job of ``chunks`` chunks and ``samples`` samples of audio
    (at 24 kHz: its planned length) add to the job's output: their base64 PCM at ``sample_rate``
    and each piece's other fields. Each chunk and the close give whole pieces of at most
    ``MAX_PIECE_SAMPLES``, so at most one piece each beyond the full ones; each piece's base64 is
    less than 3 bytes longer than 4/3 of its PCM; soxr's length is within a sample of the ratio's."""
    resampled = samples if sample_rate == SAMPLE_RATE else samples * sample_rate // SAMPLE_RATE + 1
    pieces = resampled // MAX_PIECE_SAMPLES + chunks + 1
    base64_bytes = 4 * -(-resampled * PCM_BYTES_PER_SAMPLE // 3) + 3 * pieces
    widest_seconds = round(MAX_PIECE_SAMPLES // sample_rate + 0.999, 3)
    return base64_bytes + pieces * output_bytes(piece(pieces, sample_rate, "", widest_seconds))


def too_long_sentence(size: int, limit: int) -> str:
    """The refusal of a streamed job whose pieces would not fit in the job's output."""
    return (f"A streamed job's output keeps every piece it sends, and this job's pieces would take about "
            f"{size_text(size)} where at most {size_text(limit)} fit in a RunPod result "
            f"({ENV_MAX_RESULT_BYTES}); send a shorter text, choose a lower sample_rate, or leave 'stream' out.")


def pcm_s16le(samples: np.ndarray) -> bytes:
    """``samples`` (float) as headerless 16-bit PCM, converted as the stored 16-bit files are
    (``encoding.pcm16``)."""
    return pcm16(samples).tobytes()


class LiveAudio(Protocol):
    """Where a job's audio goes while it is synthesised (``jobs.workflows.Worker.tts``): each
    chunk's waveform (24 kHz, in order) in, whatever the face sends out (pieces, bytes).

    ``result_bytes`` is what has been sent that a RunPod result also keeps (the queue face's
    pieces; 0 where nothing is kept), and ``planned_result_bytes`` the most it will be;
    ``samples_sent`` and ``bytes_sent`` count the audio sent, at the job's sample rate."""

    result_bytes: int
    samples_sent: int
    bytes_sent: int

    def add(self, wave: np.ndarray) -> list: ...

    def add_joined(self, samples: np.ndarray) -> list:
        """The next samples of audio already joined (24 kHz): a job whose silences are removed
        sends its audio so, as the removal makes it final, instead of its chunks."""

    def close(self) -> list: ...

    def planned_result_bytes(self, samples: int, chunks: int) -> int: ...


class JoinedAudio:
    """Chunk waveforms (24 kHz, in order) in, the joined audio at ``sample_rate`` out as it
    becomes final: the samples of the stored file, in pieces (the module docstring)."""

    def __init__(self, sample_rate: int, cross_fade_seconds: float):
        self.join = CrossFadeJoin(cross_fade_seconds)
        self.resampler = OutputStream(sample_rate)

    def add(self, wave: np.ndarray) -> np.ndarray:
        """The samples that ``wave`` (the next chunk) makes final."""
        return self._out(self.join.add(wave), last=False)

    def add_joined(self, samples: np.ndarray) -> np.ndarray:
        """Samples of audio already joined (``LiveAudio.add_joined``), resampled as the rest."""
        return self._out(samples, last=False)

    def close(self) -> np.ndarray:
        """What was held back: the end of the audio."""
        return self._out(self.join.close(), last=True)

    def _out(self, samples: np.ndarray, *, last: bool) -> np.ndarray:
        return self.resampler.resample(samples.astype(np.float32), last=last)  # plan.finish's type


class AudioStream:
    """The queue face's stream: one job's chunk waveforms in, stream pieces (dicts) out."""

    def __init__(self, sample_rate: int, cross_fade_seconds: float):
        self.sample_rate = sample_rate
        self.audio = JoinedAudio(sample_rate, cross_fade_seconds)
        self.pieces = 0
        self.samples_sent = 0
        self.result_bytes = 0  # what the pieces sent add to the job's output (runpod keeps them all)

    def add(self, wave: np.ndarray) -> list[dict]:
        """The pieces that ``wave`` (the next chunk) completes."""
        return self._pieces(self.audio.add(wave))

    def add_joined(self, samples: np.ndarray) -> list[dict]:
        return self._pieces(self.audio.add_joined(samples))

    def close(self) -> list[dict]:
        """The pieces of what was held back: the end of the audio."""
        return self._pieces(self.audio.close())

    def planned_result_bytes(self, samples: int, chunks: int) -> int:
        return planned_output_bytes(samples, self.sample_rate, chunks)

    @property
    def bytes_sent(self) -> int:  # of PCM, before base64
        return self.samples_sent * PCM_BYTES_PER_SAMPLE

    def _pieces(self, samples: np.ndarray) -> list[dict]:
        pieces = []
        for start in range(0, len(samples), MAX_PIECE_SAMPLES):
            part = samples[start:start + MAX_PIECE_SAMPLES]
            pieces.append(piece(self.pieces, self.sample_rate, to_base64(pcm_s16le(part)),
                                round(len(part) / self.sample_rate, 3)))
            self.pieces += 1
            self.result_bytes += output_bytes(pieces[-1])
            self.samples_sent += len(part)
        return pieces
