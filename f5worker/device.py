"""Which device and number format the models run in, for the TTS engine and Whisper alike.

Why this module exists: both models follow one rule, and the transcriber must not import the TTS
engine (and through it f5-tts) just to learn it.
"""
from __future__ import annotations

import torch


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str) -> torch.dtype:
    """f5-tts's rule: fp16 on CUDA cards of compute capability 7 or more, else fp32."""
    if device.startswith("cuda") and torch.cuda.get_device_properties(device).major >= 7:
        return torch.float16
    return torch.float32
