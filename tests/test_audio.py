"""Audio in and out: formats, channel mixing, length checks from the header, silence rules."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from f5worker import audio
from f5worker.engine import TTSEngine
from f5worker.job_plan import SynthesisRequest
from f5worker.errors import InputError
from f5worker.model_store import resolve_tts_files
from f5worker.settings import Settings
from tests.fixtures_models import SR, speechlike


@pytest.mark.parametrize("fmt,subtype,rate", [("FLAC", "PCM_16", 44100), ("OGG", "VORBIS", 48000),
                                              ("WAV", "FLOAT", 16000), ("MP3", "MPEG_LAYER_III", 44100)])
def test_formats_rates_and_stereo_decode_to_mono(tmp_path, fmt, subtype, rate):
    t = np.arange(int(2.0 * rate)) / rate
    left, right = 0.3 * np.sin(2 * np.pi * 220 * t), 0.1 * np.sin(2 * np.pi * 330 * t)
    path = tmp_path / f"v.{fmt.lower()}"
    sf.write(str(path), np.stack([left, right], axis=1), rate, format=fmt, subtype=subtype)
    samples, sr = audio.decode(path)
    assert sr == rate and samples.ndim == 1 and samples.dtype == np.float32
    assert abs(len(samples) / sr - 2.0) < 0.1
    if fmt in ("FLAC", "WAV"):  # lossless: the mono mix is exact
        assert np.allclose(samples, ((left + right) / 2).astype(np.float32), atol=1e-4)


def test_length_is_refused_from_the_header(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(str(path), np.zeros(int(61 * 8000), dtype=np.float32), 8000, format="FLAC")
    with pytest.raises(InputError, match=r"between 1 and 60 seconds long \(it is 61\.0 s\)"):
        audio.decode(path)


def test_garbage_is_not_audio():
    with pytest.raises(InputError, match="not decodable audio"):
        audio.decode(b"definitely not audio" * 10)


def test_remove_silences_shortens_long_pauses_only():
    clip = np.concatenate([speechlike(1.0, seed=1), np.zeros(3 * SR, dtype=np.float32), speechlike(1.0, seed=2),
                           np.zeros(int(0.4 * SR), dtype=np.float32), speechlike(1.0, seed=3)])
    out = audio.remove_silences(clip, SR)
    removed = (len(clip) - len(out)) / SR
    assert 1.5 < removed < 2.1  # the 3 s pause keeps about 0.5 s each side; the 0.4 s pause stays


def test_cross_fade_join():
    a, b = np.ones(1000, dtype=np.float32), np.ones(800, dtype=np.float32)
    joined = audio.cross_fade_join([a, b], 1000, 0.1)
    assert len(joined) == 1700 and np.allclose(joined, 1.0)
    assert len(audio.cross_fade_join([a, b], 1000, 0.0)) == 1800


def test_resampled_reference_and_options_synthesise(tiny_models, tmp_path):
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)
    t = np.arange(int(3 * 44100)) / 44100
    ref = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    request = SynthesisRequest(ref_audio=ref, ref_sr=44100, ref_text="A reference.", gen_text="Hello there.",
                               seed=3, nfe_step=2, remove_silence=True, cross_fade_duration=0.0)
    wave = engine.synthesize(request)
    assert wave.dtype == np.float32 and len(wave) > 0 and np.isfinite(wave).all()
