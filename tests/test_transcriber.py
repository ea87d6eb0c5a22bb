"""The transcriber loads a Whisper folder once, offline, and reports missing or broken models as StorageError."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from f5worker.errors import StorageError
from f5worker.model.store import resolve_asr_model
from f5worker.inference.transcriber import PIPELINE_GENERATION_DEFAULTS, WHISPER_SAMPLE_RATE, Transcriber
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


# --- one window, one encoder pass ------------------------------------------------------------------

def _counting_encoder(transcriber) -> list[int]:
    calls: list[int] = []
    transcriber.load().model.get_encoder().register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


def _pipeline_text(transcriber, audio: np.ndarray) -> str:
    return Transcriber._long_form(transcriber.load(), audio, {})


def _without_generation_lengths(folder: Path, tmp_path: Path) -> Path:
    """The tiny Whisper with no max_length and no beams of its own, as the real checkpoints set no
    beams: the pipeline's defaults then apply."""
    copy = tmp_path / "whisper-defaults"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.pop("max_length"), config.pop("num_beams")
    (copy / "generation_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("own_lengths", [True, False])
def test_one_window_is_heard_as_the_pipeline_hears_it_with_one_encoder_pass(tiny_whisper, tmp_path, own_lengths):
    folder = tiny_whisper if own_lengths else _without_generation_lengths(tiny_whisper, tmp_path)
    transcriber = Transcriber(whisper_settings(tmp_path, str(folder)), device="cpu")
    calls = _counting_encoder(transcriber)
    rng = np.random.default_rng(1)
    for seconds in (0.5, 7.0, 29.99):
        audio = (0.1 * rng.standard_normal(int(seconds * WHISPER_SAMPLE_RATE))).astype(np.float32)
        before = len(calls)
        expected = _pipeline_text(transcriber, audio)
        assert len(calls) - before == 2  # the pipeline: once to detect the language, once to generate
        before = len(calls)
        heard = transcriber.hear(audio, WHISPER_SAMPLE_RATE)
        assert len(calls) - before == 1 and heard.encoded is None
        assert heard.text == expected and expected, seconds


def test_the_defaults_added_are_the_pipelines_own():
    from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

    defaults = AutomaticSpeechRecognitionPipeline._default_generation_config.to_diff_dict()
    defaults.pop("transformers_version", None)
    assert defaults == PIPELINE_GENERATION_DEFAULTS


def test_audio_past_one_window_goes_through_the_pipelines_chunking(tiny_whisper, tmp_path):
    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cpu")
    audio = (0.1 * np.random.default_rng(2).standard_normal(45 * WHISPER_SAMPLE_RATE)).astype(np.float32)
    heard = transcriber.hear(audio, WHISPER_SAMPLE_RATE, keep=True)
    assert heard.encoded is None and heard.text == _pipeline_text(transcriber, audio)


def test_aligning_what_was_heard_reuses_its_encoder_pass(tiny_whisper, tmp_path):
    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cpu")
    calls = _counting_encoder(transcriber)
    wave = _tone(4.0)
    words = [" a", " tone", " for", " four", " seconds"]
    fresh = transcriber.align(wave, 24000, words, "en")
    assert len(calls) == 1
    heard = transcriber.hear(wave, 24000, keep=True)
    assert heard.text == transcriber.transcribe(wave, 24000) and len(calls) == 3
    assert transcriber.align(wave, 24000, words, "en", encoded=heard.encoded) == fresh
    assert len(calls) == 3  # no pass of its own


def test_a_chunk_is_heard_in_the_language_it_was_given(tiny_whisper, tmp_path):
    """Told a language, one window is decoded in it with no detection pass (the decoder's first
    input is the prompt, its language token second), as the pipeline told the same decodes; a
    region ('pt_BR') is Whisper's language ('pt'), and a code the model lacks is detected as before.
    (A tiny model's text is the same in any language: the decoder's inputs are what is compared.)"""
    transcriber = Transcriber(whisper_settings(tmp_path, str(tiny_whisper)), device="cpu")
    audio = (0.1 * np.random.default_rng(3).standard_normal(3 * WHISPER_SAMPLE_RATE)).astype(np.float32)
    pipe, inputs = transcriber.load(), []
    pipe.model.model.decoder.register_forward_pre_hook(lambda module, args, kw: inputs.append(kw["input_ids"][0].tolist()),
                                                       with_kwargs=True)

    def decoded(hear, *args, **kwargs) -> tuple[int, int]:
        """(decoder passes before the prompt, the prompt's language token) of ``hear(*args, **kwargs)``."""
        inputs.clear()
        hear(*args, **kwargs)
        first = next(k for k, ids in enumerate(inputs) if len(ids) > 1)
        return first, inputs[first][1]

    ids = pipe.model.generation_config.lang_to_id
    passes, detected = decoded(transcriber.hear, audio, WHISPER_SAMPLE_RATE)
    assert passes == 1  # told nothing, Whisper detects the language first
    for code in ("fr", "ja", "pt", "pt_BR"):
        token = ids[f"<|{code[:2]}|>"]
        assert decoded(transcriber.hear, audio, WHISPER_SAMPLE_RATE, language=code) == (0, token), code
        assert decoded(pipe, {"raw": audio, "sampling_rate": WHISPER_SAMPLE_RATE},
                       generate_kwargs={"task": "transcribe", "language": code[:2]}) == (0, token)
    assert decoded(transcriber.hear, audio, WHISPER_SAMPLE_RATE, language="xx") == (1, detected)
