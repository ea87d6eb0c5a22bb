"""Every sample-rate conversion a job makes, into the model's 24 kHz and out of it.

Why this module exists: a voice is resampled into 24 kHz once at upload and, for a voice stored at
another rate, at every job; the two must give the same samples, so they are one function here,
f5-tts's own (``infer_batch_process``: ``torchaudio.transforms.Resample``, windowed sinc with its
defaults). Output at another rate is soxr's (already installed as librosa's dependency; it imports
in milliseconds), whole or streamed at one quality, so a streamed job's pieces are the samples of
its stored file.
"""
from __future__ import annotations

import numpy as np
import soxr

from f5worker.model.constants import SAMPLE_RATE

OUTPUT_QUALITY = "HQ"  # soxr's, for every rate a job's output may ask for


def to_model_rate(samples: np.ndarray, sr: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``sr`` as 24 kHz, as f5-tts resamples a reference."""
    if sr == SAMPLE_RATE:
        return samples
    # torch and torchaudio only for audio not at 24 kHz (stored voices are): off the start path.
    import torch
    import torchaudio

    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).unsqueeze(0)
    return torchaudio.transforms.Resample(sr, SAMPLE_RATE)(wave)[0].numpy()


def from_model_rate(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """The model's 24 kHz output at ``sample_rate``; the duration is kept to within one sample."""
    if sample_rate == SAMPLE_RATE:
        return samples
    return soxr.resample(samples, SAMPLE_RATE, sample_rate, quality=OUTPUT_QUALITY).astype(np.float32, copy=False)


def least_output_length(samples: int, sample_rate: int) -> int:
    """At least as many samples as ``from_model_rate`` returns for ``samples`` samples (soxr rounds
    to a neighbouring whole sample; this is the lower one)."""
    return samples * sample_rate // SAMPLE_RATE


def most_output_length(samples: int, sample_rate: int) -> int:
    """At most as many samples as ``from_model_rate`` returns for ``samples`` samples (the upper
    neighbour, and one more)."""
    return -(-samples * sample_rate // SAMPLE_RATE) + 1


class OutputStream:
    """``from_model_rate`` fed in pieces: soxr's streaming resampler gives the same samples."""

    def __init__(self, sample_rate: int):
        self.stream = (None if sample_rate == SAMPLE_RATE else
                       soxr.ResampleStream(SAMPLE_RATE, sample_rate, 1, dtype="float32", quality=OUTPUT_QUALITY))

    def resample(self, samples: np.ndarray, *, last: bool) -> np.ndarray:
        return samples if self.stream is None else self.stream.resample_chunk(samples, last=last)
