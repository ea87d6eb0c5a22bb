"""Which device and number format the models run in, for the TTS engine and Whisper alike.

Why this module exists: both models follow one rule, and the transcriber must not import the TTS
engine (and through it f5-tts) just to learn it.
"""
from __future__ import annotations

import torch

from f5worker.errors import WorkerError
from f5worker.settings import ENV_DEVICE


def pick_device(requested: str | None = None) -> str:
    """``requested`` (``F5_DEVICE``: cpu, cuda, cuda:<index>), or the GPU when there is one.
    WorkerError (a start error) for a CUDA device this machine does not have."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise WorkerError(f"{ENV_DEVICE} is {requested}, but this machine has {count} CUDA device(s); "
                              f"unset {ENV_DEVICE} to use the GPU when there is one")
    return requested


def pick_dtype(device: str) -> torch.dtype:
    """f5-tts's rule: fp16 on CUDA cards of compute capability 7 or more, else fp32."""
    if device.startswith("cuda") and torch.cuda.get_device_properties(device).major >= 7:
        return torch.float16
    return torch.float32
