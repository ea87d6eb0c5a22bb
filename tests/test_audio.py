"""Audio in and out: formats, channel mixing, length checks from the header, silence rules, and the
stored voice: its transcript chunk, its header summary, loudness and rate."""
from __future__ import annotations

import dataclasses
import io
import json
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs import resampling
from f5worker.jobs import plan as job_plan
from f5worker.jobs import audio
from f5worker.inference.engine import TTSEngine
from f5worker.jobs.plan import SynthesisRequest
from f5worker.errors import InputError
from f5worker.model.store import resolve_tts_files
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
    wave = job_plan.synthesize(engine, request)
    assert wave.dtype == np.float32 and len(wave) > 0 and np.isfinite(wave).all()

    # A reference prepared beforehand (a cached voice) gives exactly what plan() would prepare.
    clip = resampling.to_model_rate(speechlike(3.0, seed=4), SR)
    fresh = SynthesisRequest(ref_audio=clip, ref_sr=SR, ref_text="A reference.", gen_text="Hello there.",
                             seed=3, nfe_step=2)
    prepared = dataclasses.replace(fresh, prepared_ref=audio.prepare_reference(clip, SR))
    assert np.array_equal(job_plan.synthesize(engine, fresh), job_plan.synthesize(engine, prepared))


# --- stored voices: the transcript chunk, the header summary, loudness -----------------------------
def _old_layout(samples: np.ndarray, text: str) -> bytes:
    """A voice as earlier versions stored it: the transcript chunk after the audio."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SR, subtype="PCM_16", format="WAV")
    payload = json.dumps({"ref_text": text}).encode()
    data = bytearray(buffer.getvalue() + b"f5tx" + struct.pack("<I", len(payload)) + payload
                     + b"\0" * (len(payload) % 2))
    data[4:8] = struct.pack("<I", len(data) - 8)
    return bytes(data)


def _reads(data: bytes):
    calls = []

    def read_range(start, length):
        calls.append((start, length))
        return data[start:start + length]
    return read_range, calls


def test_transcript_chunk_goes_before_the_audio_and_players_skip_it():
    clip = speechlike(2.5, seed=1)
    text = "Grüße aus 世界, said twice."
    data = audio.voice_wav_bytes(clip, SR, text)
    chunks = []
    offset = 12
    while offset < len(data):
        size = struct.unpack("<I", data[offset + 4:offset + 8])[0]
        chunks.append(data[offset:offset + 4])
        offset += 8 + size + size % 2
    assert chunks == [b"fmt ", b"f5tx", b"data"] and offset == len(data)
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SR and np.array_equal(decoded, clip)
    with wave.open(io.BytesIO(data)) as reader:  # Python's own reader agrees
        assert reader.getnframes() == len(clip) and reader.getframerate() == SR
    assert audio.embedded_transcript(data) == text
    assert audio.embedded_transcript(_old_layout(clip, "Older layout.")) == "Older layout."


def test_wav_summary_reads_a_stored_voice_in_one_range():
    clip = speechlike(4.0, seed=2)
    data = audio.voice_wav_bytes(clip, SR, "Four seconds of speech.")
    read_range, calls = _reads(data)
    summary = audio.wav_summary(read_range, len(data))
    assert summary == audio.WavSummary(SR, 1, 4.0, "Four seconds of speech.")
    assert calls == [(0, audio.SUMMARY_READ_BYTES)]

    old = _old_layout(clip, "After the audio.")  # one more read, at the chunk after the audio
    read_range, calls = _reads(old)
    assert audio.wav_summary(read_range, len(old)).transcript == "After the audio."
    assert len(calls) == 2 and calls[1][0] == 44 + len(clip) * 2

    buffer = io.BytesIO()  # a WAV put in storage by hand: 44.1 kHz stereo, no transcript
    sf.write(buffer, np.zeros((44100 * 3, 2), dtype=np.float32), 44100, subtype="PCM_24", format="WAV")
    read_range, calls = _reads(buffer.getvalue())
    assert audio.wav_summary(read_range, len(buffer.getvalue())) == audio.WavSummary(44100, 2, 3.0, None)
    assert len(calls) == 1

    flac = io.BytesIO()
    sf.write(flac, clip, SR, format="FLAC")
    read_range, _ = _reads(flac.getvalue())
    assert audio.wav_summary(read_range, len(flac.getvalue())) is None
    assert audio.wav_summary(lambda start, length: b"", 0) is None


def _riff(*chunks: tuple[bytes, bytes]) -> bytes:
    body = b"WAVE" + b"".join(cid + struct.pack("<I", len(p)) + p + b"\0" * (len(p) % 2) for cid, p in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_summary_of_a_file_it_cannot_read_whole_is_none_not_a_crash():
    """Files placed by hand: one cut off inside its format chunk, one whose format chunk lies past
    the reads a summary may make (libsndfile reads it), one whose transcript chunk is JSON nested
    past the parser's depth. Each used to raise (struct.error, RecursionError) and fail a whole
    list_voices page; each is now described as far as its header says."""
    fmt = struct.pack("<HHIIHH", 1, 1, SR, 2 * SR, 2, 16)
    pcm = np.zeros(2 * SR, dtype="<i2").tobytes()
    cut = _riff((b"fmt ", fmt), (b"data", pcm))[:30]
    far = _riff((b"JUNK", bytes(5000)), (b"JUNK", bytes(5000)), (b"JUNK", bytes(4080)), (b"fmt ", fmt), (b"data", pcm))
    assert sf.info(io.BytesIO(far)).duration == 2.0
    deep = _riff((b"fmt ", fmt), (audio.TRANSCRIPT_CHUNK_ID, b"[" * 60_000), (b"data", pcm))
    for data, expected in ((cut, None), (far, None), (deep, audio.WavSummary(SR, 1, 2.0, None))):
        read_range, _ = _reads(data)
        assert audio.wav_summary(read_range, len(data)) == expected
    assert audio.embedded_transcript(deep) is None


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.5])
def test_loudness_normalised_to_the_rms_synthesis_targets(scale):
    clip = np.clip(speechlike(3.0, seed=5) * scale, -1, 1).astype(np.float32)
    normalised, gain = audio.normalise_loudness(clip, SR, 0.1)
    padded = np.concatenate([normalised, np.zeros(int(SR * audio.REFERENCE_PAD_SECONDS), dtype=np.float32)])
    assert np.sqrt(np.mean(np.square(padded, dtype=np.float64))) == pytest.approx(0.1, rel=1e-4)
    assert np.allclose(normalised, clip * gain, atol=1e-6)
    assert np.max(np.abs(normalised)) <= audio.PEAK_LIMIT + 1e-6


def test_loudness_normalisation_never_pushes_a_peak_past_minus_1_dbfs():
    clip = 0.01 * speechlike(3.0, seed=6)
    clip[SR] = 0.5  # one click: RMS 0.1 would push it far past full scale
    normalised, gain = audio.normalise_loudness(clip, SR, 0.1)
    assert np.max(np.abs(normalised)) == pytest.approx(audio.PEAK_LIMIT, rel=1e-6)
    assert gain == pytest.approx(audio.PEAK_LIMIT / 0.5, rel=1e-6)
    silent = np.zeros(SR, dtype=np.float32)
    assert audio.normalise_loudness(silent, SR, 0.1)[1] == 1.0


@pytest.mark.parametrize("spike, refused", [(1.0, False), (4.0, False), (50.0, True), (1e30, True)])
def test_loudness_normalisation_refuses_a_spike_that_would_silence_the_speech(spike, refused):
    """Speech at a peak of 0.41 with one sample at ``spike``: lowered to -1 dBFS at that sample, the
    speech falls below check_speech's threshold from a spike of about 50 on; below that it is kept."""
    clip = speechlike(3.0, seed=1)
    clip[SR] = spike
    if not refused:
        normalised, _ = audio.normalise_loudness(clip, SR, 0.1)
        assert len(audio.check_speech(normalised, SR)) > SR
        return
    with pytest.raises(InputError, match=r"^The voice's loudest samples \(peak [0-9.e+]+ times full scale\)"):
        audio.normalise_loudness(clip, SR, 0.1)


def test_resample_to_24k_keeps_the_length_and_the_pitch():
    rate = 44100
    t = np.arange(2 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = resampling.to_model_rate(tone, rate)
    assert out.dtype == np.float32 and len(out) == 2 * SR
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * SR / len(out)
    assert abs(peak_hz - 440) <= 1
    assert resampling.to_model_rate(tone, SR) is tone  # already at the rate: untouched


@pytest.mark.parametrize("rate", [16000, 22050, 44100, 48000])
def test_voices_are_resampled_as_f5_tts_resamples_a_reference(rate):
    """One resampler for the upload and the job: f5-tts's own (infer_batch_process's
    ``torchaudio.transforms.Resample``). The functional form the upload used before differs from it
    in the last bits (up to 7e-6 here), so a voice resampled at upload was not the job's voice."""
    import torch
    import torchaudio

    clip = speechlike(1.5, seed=rate)
    stock = torchaudio.transforms.Resample(rate, SR)(torch.from_numpy(clip).unsqueeze(0))[0].numpy()
    assert np.array_equal(resampling.to_model_rate(clip, rate), stock)
