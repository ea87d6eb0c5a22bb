"""The transcriber loads a Whisper folder once, offline, and reports missing or broken models as StorageError."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from f5worker.errors import StorageError
from f5worker.model.store import resolve_asr_model
from f5worker.inference.transcriber import Transcriber
from tests.helpers import whisper_settings


def _tone(seconds: float = 2.0, sr: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_transcribes_and_loads_once(tiny_whisper, tmp_path):
    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cpu")
    assert not transcriber.loaded
    first = transcriber.transcribe(_tone(), 24000)  # 24 kHz in: resampled to 16 kHz inside
    assert isinstance(first, str) and first and first == first.strip()
    model = transcriber.load().model
    second = transcriber.transcribe(_tone(), 24000)
    assert transcriber.load().model is model  # not reloaded
    assert second == first  # greedy decoding: same input, same text


def test_concurrent_first_calls_load_once(tiny_whisper, tmp_path, monkeypatch):
    import transformers

    calls = []
    real_pipeline = transformers.pipeline
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: calls.append(1) or real_pipeline(*a, **k))
    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cpu")
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: transcriber.transcribe(_tone(1.0, 16000), 16000), range(4)))
    assert len(calls) == 1 and len(set(texts)) == 1


def test_broken_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "broken-whisper"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(StorageError, match="could not be loaded") as info:
        Transcriber(whisper_settings(tmp_path, str(folder)), device="cpu").transcribe(_tone(), 24000)
    assert str(folder) in str(info.value)


def test_uncached_repo_offline_is_a_storage_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    settings = whisper_settings(tmp_path, "openai/whisper-tiny")
    with pytest.raises(StorageError, match="openai/whisper-tiny"):
        resolve_asr_model(settings)
    with pytest.raises(StorageError):
        Transcriber(settings, device="cpu").transcribe(_tone(), 24000)


def test_the_transcriber_does_not_import_the_tts_engine():
    import subprocess
    import sys

    code = "import sys, f5worker.inference.transcriber; print('f5worker.inference.engine' in sys.modules, 'f5_tts' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
