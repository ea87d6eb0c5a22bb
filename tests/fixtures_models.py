"""Tiny randomly initialised models (real f5-tts and Vocos classes) and a speech-like reference clip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.random_models import TINY_V0_ARCH, write_model_set

SR = 24000


def speechlike(seconds: float, seed: int = 0, sr: int = SR, lead_silence: float = 0.0,
               tail_silence: float = 0.0) -> np.ndarray:
    """A voiced, syllable-modulated tone quantised to 16 bits (what a WAV upload holds)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    wave = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)))
    wave = 0.25 * wave * (0.2 + 0.8 * envelope) + 0.005 * rng.standard_normal(len(t))
    wave = np.concatenate([np.zeros(int(lead_silence * sr)), wave, np.zeros(int(tail_silence * sr))])
    return np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Env vars (F5_CKPT_FILE, F5_VOCAB_FILE, F5_MODEL_CONFIG, F5_VOCODER_DIR) of a tiny model set."""
    return write_model_set(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_v0_models(tmp_path_factory) -> dict[str, str]:
    """The same variables for a tiny model of F5TTS_Base's (v0) layout."""
    return write_model_set(tmp_path_factory.mktemp("tiny-v0-models"), arch=TINY_V0_ARCH)


@pytest.fixture(scope="session")
def ref_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("voices") / "ref.wav"
    sf.write(str(path), speechlike(3.0), SR, subtype="PCM_16")
    return path
