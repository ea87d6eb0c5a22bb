"""The log-mel spectrogram F5-TTS and Vocos work in, in plain torch.

Why this module exists: f5-tts computes a reference voice's mel with torchaudio's MelSpectrogram
(``MelSpec(mel_spec_type="vocos")``), and importing torchaudio is a noticeable part of a cold start
for one STFT and one matrix product. This module does the same arithmetic in the same order
(``torch.stft`` with a Hann window, centred with reflect padding; magnitude; the HTK mel filterbank
without normalisation; ``clamp(min=1e-5).log()``), so its output equals f5-tts's.

Its submodules and buffers are named as torchaudio names them (``mel_spec.spectrogram.window``,
``mel_spec.mel_scale.fb``), so the same module is the Vocos checkpoint's ``feature_extractor``
(f5worker.model.vocoder) and loads the filterbank that checkpoint carries.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from f5worker.model.constants import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE

# f5-tts's floor before the log; Vocos's own feature extractor uses 1e-7 (f5worker.model.vocoder).
F5_LOG_FLOOR = 1e-5


def hz_to_mel(freq: float) -> float:
    """HTK mel scale (computed in double precision, as torchaudio does)."""
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters, [n_freqs, n_mels]: torchaudio's ``melscale_fbanks`` with norm=None and
    mel_scale="htk", step for step (float32, same operation order)."""
    f_max = float(sample_rate // 2) if f_max is None else f_max
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    f_pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1), torch.min(down_slopes, up_slopes))


class Spectrogram(nn.Module):
    """Magnitude STFT, centred with reflect padding, unnormalised: [B, T] -> [B, n_fft // 2 + 1, frames]."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=self.window, center=True, pad_mode="reflect", normalized=False,
                          onesided=True, return_complex=True)
        return spec.abs()


class MelScale(nn.Module):
    def __init__(self, n_mels: int, sample_rate: int, n_freqs: int):
        super().__init__()
        self.register_buffer("fb", mel_filterbank(n_freqs, n_mels, sample_rate))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)


class MelSpectrogram(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        self.spectrogram = Spectrogram(n_fft, hop_length)
        self.mel_scale = MelScale(n_mels, sample_rate, n_fft // 2 + 1)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel_scale(self.spectrogram(waveform))


class LogMelSpectrogram(nn.Module):
    """Waveform [B, T] (or [B, 1, T]) -> log mel [B, n_mels, frames], frames = T // hop_length + 1.

    Defaults are f5-tts's vocos mel. Like f5-tts's MelSpec, it moves itself to the waveform's device
    (the worker builds it on the CPU and hands it waveforms on the GPU)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                 n_mels: int = N_MELS, log_floor: float = F5_LOG_FLOOR):
        super().__init__()
        self.sample_rate, self.hop_length, self.n_mels = sample_rate, hop_length, n_mels
        self.log_floor = log_floor
        self.mel_spec = MelSpectrogram(sample_rate, n_fft, hop_length, n_mels)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 3:
            waveform = waveform.squeeze(1)
        if waveform.dim() != 2:
            raise ValueError(f"Expected a waveform of shape [B, T] or [B, 1, T], not {list(waveform.shape)}.")
        if self.mel_spec.spectrogram.window.device != waveform.device:
            self.to(waveform.device)
        return self.mel_spec(waveform).clamp(min=self.log_floor).log()
