"""A TTS job's audio as pieces sent while it is being synthesised (``"stream": true``).

Why this module exists: a streamed job sends its audio as raw 16-bit PCM while later chunks are
still being sampled, and a caller who concatenates the pieces must hold exactly the samples of the
stored file. ``AudioStream`` takes the job's chunk waveforms in order and gives out the pieces:

* Cross-fades: chunks are joined as ``job_plan.finish`` joins them (``audio.cross_fade_join``), so
  the last cross-fade window of what has been joined so far is held back until the next chunk
  arrives (it is faded into that chunk's start), and sent at the end.
* Sample rate: pieces are resampled with soxr's streaming resampler at the quality the stored file
  is resampled with (``encoding.resample``); soxr gives the same samples fed in pieces as in one
  call, so the streamed audio equals the stored audio at any of the job's sample rates.
* PCM: the float samples become 16-bit PCM through libsndfile, the conversion that writes the
  stored WAV, so a streamed sample equals the stored WAV's sample exactly.
* Size: runpod streams each yielded item as one HTTP message and RunPod keeps stream items well
  under 1 MB; a piece's base64 is at most ``MAX_PIECE_BASE64_BYTES`` (a long chunk is sent as
  several pieces).

Removing silences works on the whole joined waveform, so it cannot be streamed (refused earlier).
"""
from __future__ import annotations

import io
import logging

import numpy as np
import soundfile as sf
import soxr

from f5worker.audio import TARGET_SAMPLE_RATE
from f5worker.encoding import to_base64

log = logging.getLogger(__name__)

PCM_FORMAT = "pcm_s16le"  # signed 16-bit little-endian samples, mono, no header
PCM_BYTES_PER_SAMPLE = 2
MAX_PIECE_BASE64_BYTES = 256 * 1024
# The most samples one piece holds so that its base64 stays within MAX_PIECE_BASE64_BYTES.
MAX_PIECE_SAMPLES = MAX_PIECE_BASE64_BYTES // 4 * 3 // PCM_BYTES_PER_SAMPLE
RESAMPLE_QUALITY = "HQ"  # encoding.resample's


def pcm_s16le(samples: np.ndarray, sample_rate: int) -> bytes:
    """``samples`` (float) as headerless 16-bit PCM, converted as libsndfile converts for a WAV."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="RAW", subtype="PCM_16", endian="LITTLE")
    return buffer.getvalue()


class AudioStream:
    """One job's chunk waveforms (24 kHz, in order) in, stream pieces (dicts) out."""

    def __init__(self, sample_rate: int, cross_fade_seconds: float):
        self.sample_rate = sample_rate
        self.fade = int(cross_fade_seconds * TARGET_SAMPLE_RATE)  # cross_fade_join's window
        self.held = np.zeros(0, dtype=np.float32)  # the join's last samples, exactly as it holds them
        self.joined = 0  # samples of the join so far, held ones included
        self.resampler = (None if sample_rate == TARGET_SAMPLE_RATE else
                          soxr.ResampleStream(TARGET_SAMPLE_RATE, sample_rate, 1, dtype="float32",
                                              quality=RESAMPLE_QUALITY))
        self.pieces = 0
        self.samples_sent = 0

    def add(self, wave: np.ndarray) -> list[dict]:
        """The pieces that ``wave`` (the next chunk) completes."""
        if self.joined == 0:
            region = wave
        else:  # cross_fade_join's step, on the part of the join that can still change
            n = min(self.fade, self.joined, len(wave))
            if n <= 0:
                region = np.concatenate([self.held, wave])
            else:
                faded = self.held[-n:] * np.linspace(1, 0, n) + wave[:n] * np.linspace(0, 1, n)
                region = np.concatenate([self.held[:-n], faded, wave[n:]])
            self.joined -= n
        self.joined += len(wave)
        keep = min(self.fade, self.joined)
        ready, self.held = region[:len(region) - keep], region[len(region) - keep:]
        return self._pieces(ready, last=False)

    def close(self) -> list[dict]:
        """The pieces of what was held back: the end of the audio."""
        held, self.held = self.held, np.zeros(0, dtype=np.float32)
        return self._pieces(held, last=True)

    def _pieces(self, samples: np.ndarray, *, last: bool) -> list[dict]:
        samples = samples.astype(np.float32)  # job_plan.finish's type
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples, last=last)
        pieces = []
        for start in range(0, len(samples), MAX_PIECE_SAMPLES):
            part = samples[start:start + MAX_PIECE_SAMPLES]
            pieces.append({"chunk": self.pieces, "format": PCM_FORMAT, "sample_rate": self.sample_rate,
                           "channels": 1, "audio_base64": to_base64(pcm_s16le(part, self.sample_rate)),
                           "seconds": round(len(part) / self.sample_rate, 3)})
            self.pieces += 1
            self.samples_sent += len(part)
        return pieces
