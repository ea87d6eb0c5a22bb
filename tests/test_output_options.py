"""The TTS job's output options: format, sample rate, inline audio, output key, timings.

Why this module exists: what a caller gets back (the file, its format and rate, the inline copy,
where it is stored, how long each step took) is the job's contract; each promise the README makes
about it is checked here against real parts.

Jobs go through the real handler on the tiny models (``fixtures_worker``), once on a local folder
and once on the SeaweedFS S3 server over HTTPS; stored objects are read back with the fixture's own
boto3 client (the Content-Type header S3 serves included) and decoded with soundfile.
"""
from __future__ import annotations

import base64
import io
import json
import uuid

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from f5worker.jobs import resampling
from f5worker.jobs import plan as job_plan
from f5worker.jobs import audio
from f5worker.jobs import encoding
from f5worker.jobs.encoding import FORMATS, OPUS_SAMPLE_RATES, RESULT_ALLOWANCE_BYTES, SAMPLE_RATES
from f5worker.inference.engine import TTSEngine
from f5worker.inference.items import item_frames
from f5worker.jobs.plan import SynthesisRequest, planned_samples
from f5worker.errors import InputError
from f5worker.jobs.inputs import MAX_OUTPUT_KEY_CHARS, parse_job_input
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
from tests.fixtures_models import SR, speechlike
from tests.fixtures_worker import Ctx, worker_ctx
from tests.helpers import assert_one_sentence, log_record

NFE = 4
BUILTIN = "basic_ref_en.wav"
TEXT = "Hello there, this is a short test of the output options."
TIMING_KEYS = ["download_s", "transcription_s", "synthesis_s", "encoding_s", "upload_s", "total_s"]
# libsndfile's container and codec names for each output format, as sf.info reports them
SF_NAMES = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
            "opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III")}


@pytest.fixture(scope="module", params=["local", "s3"])
def ctx(request, tiny_models, tiny_whisper, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"output-{request.param}")
    s3_server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    with worker_ctx(tiny_models, tiny_whisper, folder, s3_server, prefix="output") as built:
        yield built


def tts(text=TEXT, **kw) -> dict:
    return {"text": text, "local_voice": BUILTIN, "nfe_step": NFE, "seed": 7, **kw}


def ok(ctx: Ctx, job_input: dict, job_id: str | None = None) -> tuple[str, dict]:
    job_id, result = ctx.run(job_input, job_id)
    assert "error" not in result, result
    assert ctx.tmp_files() == [], "a job left files in the temp dir"
    return job_id, result


def content_type(ctx: Ctx, key: str) -> str:
    """The Content-Type S3 serves for ``key``."""
    return ctx.s3.server.client().head_object(Bucket=ctx.s3.bucket, Key=key)["ContentType"]


def refused(ctx: Ctx, job_input: dict, expected: str) -> str:
    """The job is refused with one sentence starting ``expected`` and writes nothing."""
    before = ctx.keys()
    job_id, result = ctx.run(job_input)
    message = assert_one_sentence(result)
    assert message.startswith(expected), message
    assert ctx.keys() == before, "a refused job changed voices/ or output/"
    assert ctx.tmp_files() == [], "a refused job left files in the temp dir"
    assert log_record(ctx, job_id)["error"] == message
    return message


# --- the format table against the installed libsndfile (no worker) --------------------------------
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_and_rate_it_allows_encodes_and_decodes(name):
    fmt = FORMATS[name]
    assert sf.check_format(fmt.sf_format, fmt.sf_subtype)  # the installed libsndfile writes it
    wave = speechlike(1.0, seed=1)
    for rate in fmt.sample_rates:
        samples = resampling.from_model_rate(wave, rate)
        data = encoding.encode(samples, rate, fmt)
        info = sf.info(io.BytesIO(data))
        assert (info.format, info.subtype, info.samplerate, info.channels) == (*SF_NAMES[name], rate, 1)
        assert abs(info.frames / rate - 1.0) <= 1 / rate, (rate, info.frames)
        if fmt.pcm_bytes_per_sample:
            assert len(data) == fmt.least_bytes(len(samples))  # the WAV size the early refusal uses
    refused_rates = set(SAMPLE_RATES) - set(fmt.sample_rates)
    for rate in refused_rates:  # what the input rules refuse really cannot be written
        with pytest.raises(sf.LibsndfileError):
            encoding.encode(resampling.from_model_rate(wave, rate), rate, fmt)
    assert refused_rates == (set(SAMPLE_RATES) - set(OPUS_SAMPLE_RATES) if name == "opus" else set())


def test_resampling_keeps_duration_and_content():
    wave = speechlike(2.0, seed=3)
    for rate in SAMPLE_RATES:
        out = resampling.from_model_rate(wave, rate)
        assert out.dtype == np.float32 and abs(len(out) / rate - 2.0) <= 1 / rate
        for n in (1, 79, 80, 240, 1001, 39424, 48_000 + 17):  # the early size refusal's lower bound
            got = len(resampling.from_model_rate(np.zeros(n, np.float32), rate))
            assert got - resampling.least_output_length(n, rate) in (0, 1), (n, rate, got)
    for rate in (44100, 48000):  # up and back again: the same signal, not one relabelled
        back = soxr.resample(resampling.from_model_rate(wave, rate), rate, SR)
        core = slice(SR // 10, -SR // 10)
        assert np.linalg.norm(back[core] - wave[core]) / np.linalg.norm(wave[core]) < 0.01


@pytest.mark.parametrize("job, expected", [
    (tts(output_format="aac"), "'output_format' must be wav, flac, ogg, opus or mp3."),
    (tts(output_format="MP3"), "'output_format' must be wav, flac, ogg, opus or mp3."),
    (tts(sample_rate=12345), "'sample_rate' must be 8000, 16000, 22050, 24000, 44100 or 48000 (Hz)."),
    (tts(sample_rate=24000.0), "'sample_rate' must be an integer."),
    (tts(output_format="opus", sample_rate=44100),
     "'sample_rate' must be 8000, 16000, 24000 or 48000 for opus audio."),
    (tts(output_format="opus", sample_rate=22050),
     "'sample_rate' must be 8000, 16000, 24000 or 48000 for opus audio."),
    (tts(return_base64="yes"), "'return_base64' must be true or false."),
    (tts(return_base64=1), "'return_base64' must be true or false."),
])
def test_impossible_output_options_are_refused_in_one_sentence(job, expected):
    with pytest.raises(InputError) as caught:
        parse_job_input(job)
    assert str(caught.value) == expected


@pytest.fixture(scope="module")
def engine(tiny_models):
    return TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)


def plan_for(engine, text: str, fade: float):
    return job_plan.plan(SynthesisRequest(ref_audio=speechlike(3.0), ref_sr=SR, ref_text="This is a reference.",
                                        gen_text=text, seed=1, nfe_step=2, cross_fade_duration=fade))


def test_joined_and_planned_lengths_are_exact(engine):
    """The early size refusal rests on these: the length of a job's audio is known from its plan."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        waves = [np.zeros(int(n), np.float32) for n in rng.integers(1, 20000, size=rng.integers(1, 5))]
        fade = float(rng.choice([0.0, 0.15, 0.5, 1.0]))
        assert audio.joined_length([len(w) for w in waves], SR, fade) == len(audio.cross_fade_join(waves, SR, fade))
    # Multi-chunk plans: the real vocoder on mels of each chunk's planned length, joined by finish().
    for text, fade in [("One sentence here. Another one there. " * 8, 0.15), ("Short. " * 20, 0.6)]:
        plan = plan_for(engine, text, fade)
        assert len(plan.items) > 1
        with torch.inference_mode():
            waves = [engine.vocoder.decode(torch.randn(1, 100, item_frames(item) - item.ref_frames)).squeeze().numpy()
                     for item in plan.items]
        assert planned_samples(plan) == len(job_plan.finish(plan, waves)), text
    plan = plan_for(engine, "Hello there.", 0.15)  # and one whole synthesis
    assert planned_samples(plan) == len(job_plan.finish(plan, engine.run_items(plan.items)))


# --- formats and rates through the handler --------------------------------------------------------
@pytest.mark.parametrize("name, rate", [("wav", 24000), ("wav", 8000), ("flac", 48000), ("ogg", 22050),
                                        ("opus", 16000), ("opus", 48000), ("mp3", 24000), ("mp3", 44100)])
def test_each_format_round_trips(ctx, name, rate):
    fmt = FORMATS[name]
    job_id, result = ok(ctx, tts(output_format=name, sample_rate=rate, return_base64=False))
    key = f"output/{job_id}.{fmt.extension}"
    assert result["output_key"] == key and key in ctx.keys()
    assert (result["format"], result["content_type"], result["sample_rate"]) == (name, fmt.content_type, rate)
    stored = ctx.get_bytes(key)
    assert result["bytes"] == len(stored) and ctx.fetch_url(result["audio_url"]) == stored
    assert "audio_base64" not in result
    info = sf.info(io.BytesIO(stored))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (*SF_NAMES[name], rate, 1)
    decoded, decoded_rate = sf.read(io.BytesIO(stored), dtype="float32")
    assert decoded_rate == rate and abs(len(decoded) / rate - result["duration"]) <= 1 / rate + 0.0005
    if ctx.kind == "s3":  # the header a browser gets with the presigned URL
        assert content_type(ctx, key) == fmt.content_type


def test_sample_rate_keeps_the_duration(ctx):
    durations = {}
    for rate in (8000, 22050, 24000, 48000):
        _, result = ok(ctx, tts(sample_rate=rate, return_base64=False))
        durations[rate] = result["duration"]
        samples, sr = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])), dtype="float32")
        assert sr == rate and abs(len(samples) / rate - result["duration"]) <= 1 / rate + 0.0005
    assert max(durations.values()) - min(durations.values()) <= 1 / 8000 + 0.001, durations


# --- inline audio ---------------------------------------------------------------------------------
def test_base64_is_the_stored_file(ctx):
    for name in ("wav", "mp3"):
        _, result = ok(ctx, tts(output_format=name, return_base64=True))
        inline = base64.b64decode(result["audio_base64"], validate=True)
        assert inline == ctx.get_bytes(result["output_key"]) and len(inline) == result["bytes"]


def test_inline_by_default_only_where_urls_are_local(ctx):
    job_id, default = ok(ctx, tts())
    _, off = ok(ctx, tts(return_base64=False))
    assert "audio_base64" not in off
    if ctx.kind == "local":  # file:// URLs no remote caller can open: the audio comes inline
        assert default["audio_url"].startswith("file://")
        assert base64.b64decode(default["audio_base64"]) == ctx.get_bytes(default["output_key"])
    else:
        assert "audio_base64" not in default and default["audio_url"].startswith("https://")
    assert log_record(ctx, job_id)["inline"] == (ctx.kind == "local")


def test_inline_limit_counts_the_whole_result(ctx, limit):
    """A result with inline audio stays within F5_MAX_RESULT_BYTES as runpod serialises it; one
    byte of room short of the allowance and the same job is refused before its upload."""
    job = tts(output_format="mp3", return_base64=True)
    def ident() -> str:  # ids of one length: results of one size
        return f"lim-{uuid.uuid4().hex[:12]}"

    _, first = ok(ctx, job, ident())
    size = len(json.dumps({"output": first}, ensure_ascii=False).encode("utf-8"))

    limit(size + RESULT_ALLOWANCE_BYTES)
    _, fits = ok(ctx, job, ident())
    assert len(json.dumps({"output": fits}, ensure_ascii=False).encode("utf-8")) <= size + RESULT_ALLOWANCE_BYTES
    assert base64.b64decode(fits["audio_base64"]) == ctx.get_bytes(fits["output_key"])

    limit(size)  # the audio fits, the allowance for runpod's wrapping and the timings does not
    calls = len(ctx.worker.batcher.calls)
    message = refused(ctx, job, "The mp3 audio is ")
    assert message.endswith("fit inline in a RunPod result; set return_base64 to false and fetch audio_url, "
                            "or send a shorter text."), message
    assert len(ctx.worker.batcher.calls) == calls + 1  # compressed: known only once synthesised


def test_wav_too_large_to_inline_is_refused_before_synthesis(ctx, limit):
    limit(50_000)  # F5_MAX_RESULT_BYTES far below a few seconds of WAV
    calls = len(ctx.worker.batcher.calls)
    message = refused(ctx, tts(return_base64=True), "The wav audio would be at least ")
    assert len(ctx.worker.batcher.calls) == calls, "the model ran for a job refused from its plan"
    assert "and at most 36 kB fit inline in a RunPod result; set return_base64 to false and fetch audio_url, " \
           "or choose output_format ogg, opus or mp3." in message
    # Silence removal may shorten the audio below its plan: such a job is measured once encoded.
    refused(ctx, tts(return_base64=True, remove_silence=True), "The wav audio is ")
    assert len(ctx.worker.batcher.calls) == calls + 1
    # Without inline audio the same job is fine.
    ok(ctx, tts(return_base64=False))


def test_local_default_too_large_to_inline_keeps_the_file(ctx, limit):
    if ctx.kind != "local":
        pytest.skip("audio is inline by default only on local storage")
    limit(50_000)
    _, result = ok(ctx, tts())
    assert "audio_base64" not in result and result["output_key"] in ctx.keys()
    assert result["audio_base64_omitted"].startswith("The audio is ")
    assert "so it is only in the stored file." in result["audio_base64_omitted"]


# --- output_key -----------------------------------------------------------------------------------
def test_output_key_names_the_stored_file_and_replaces_it(ctx):
    name = f"campaign-{uuid.uuid4().hex[:6]}/line-12"
    _, first = ok(ctx, tts(output_key=name, output_format="mp3", seed=1, return_base64=False))
    assert first["output_key"] == f"output/{name}.mp3" and first["output_key"] in ctx.keys()
    _, second = ok(ctx, tts("A different line for the same name.", output_key=name, output_format="mp3", seed=2,
                            return_base64=False))
    assert second["output_key"] == first["output_key"]
    assert len(ctx.get_bytes(first["output_key"])) == second["bytes"] != first["bytes"]  # replaced

    folder = f"campaign-{uuid.uuid4().hex[:6]}/"
    job_id, in_folder = ok(ctx, tts(output_key=folder, return_base64=False))
    assert in_folder["output_key"] == f"output/{folder}{job_id}.wav" and in_folder["output_key"] in ctx.keys()


@pytest.mark.parametrize("key, expected", [
    ("../x", "'output_key' must not contain '..'."),
    ("a/../../x", "'output_key' must not contain '..'."),
    ("/etc/cron.d/x", "'output_key' must be relative (it is placed under output/), so it cannot start with '/'."),
    ("a\\b", "'output_key' must separate names with '/', not '\\'."),
    ("a//b", "'output_key' may hold only names of letters, digits"),
    (".hidden", "'output_key' may hold only names of letters, digits"),
    ("a b", "'output_key' may hold only names of letters, digits"),
    ("名前", "'output_key' may hold only names of letters, digits"),
    ("x\x00y", "'output_key' may hold only names of letters, digits"),
    ("line-12.MP3", "'output_key' gets its extension from output_format, so leave '.mp3' off."),
    ("a.", "'output_key' may hold only names of letters, digits, '.', '_' and '-', each starting with a letter "
           "or digit and not ending in '.', separated by single '/'."),  # it would store "output/a..wav"
    ("take.2./a", "'output_key' may hold only names of letters, digits"),
    ("lines.mp3/", "'output_key' must not have a folder whose name ends in '.mp3', the ending of stored files"),
    ("", "'output_key' must not be empty."),
    ("a" * (MAX_OUTPUT_KEY_CHARS + 1), f"'output_key' is too long: at most {MAX_OUTPUT_KEY_CHARS} characters."),
    (7, "'output_key' must be a string."),
])
def test_output_key_outside_output_is_refused(ctx, key, expected):
    refused(ctx, tts(output_key=key), expected)


def test_a_folder_named_like_a_stored_file_is_refused_on_both_backends(ctx):
    """``clash`` stores ``output/clash.wav``; ``clash.wav/y`` would need a folder of that name: a
    local folder cannot have one beside the file (it failed after synthesis, "File exists") while S3
    stored it. One rule for both, before synthesis: no folder may end like a stored file."""
    clash = f"clash-{uuid.uuid4().hex[:6]}"
    _, first = ok(ctx, tts(output_key=clash, return_base64=False))
    assert first["output_key"] == f"output/{clash}.wav"
    refused(ctx, tts(output_key=f"{clash}.wav/y"),
            "'output_key' must not have a folder whose name ends in '.wav', the ending of stored files, since "
            "one could stand where the folder should; rename the folder.")
    refused(ctx, tts(output_key=f"{clash}.WAV/"), "'output_key' must not have a folder whose name ends in '.wav'")


# --- timings --------------------------------------------------------------------------------------
def check_timings(result: dict) -> dict:
    timings = result["timings"]
    assert list(timings) == TIMING_KEYS
    assert all(isinstance(v, float) and v >= 0 for v in timings.values()), timings
    parts = sum(v for k, v in timings.items() if k != "total_s")
    assert parts <= timings["total_s"] + 0.0005 * len(TIMING_KEYS), timings  # each rounded to 1 ms
    assert timings["synthesis_s"] > 0 and timings["total_s"] > 0
    expected_rtf = timings["synthesis_s"] / result["duration"]
    assert abs(result["rtf"] - expected_rtf) <= 0.0006 / result["duration"] + 0.0001, (result["rtf"], expected_rtf)
    return timings


def test_timings_and_rtf(ctx, tmp_path):
    _, result = ok(ctx, tts(output_format="ogg"))
    assert check_timings(result)["transcription_s"] == 0.0  # the built-in voice has its transcript
    assert result["ref_text_source"] == "built-in"

    name = f"untold-{uuid.uuid4().hex[:8]}.wav"  # a voice put in storage by hand, with no transcript
    sf.write(str(tmp_path / name), speechlike(2.0, seed=5), SR, subtype="PCM_16")
    ctx.worker.storage.upload_file(f"voices/{name}", tmp_path / name, "audio/wav")
    _, result = ok(ctx, {**tts(), "local_voice": name})
    assert result["ref_text_source"] == "transcribed"
    assert check_timings(result)["transcription_s"] > 0


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
@pytest.mark.parametrize("seed", [7, None])
def test_audio_that_is_not_finite_fails_the_job_before_any_encoder(ctx, monkeypatch, fmt, seed):
    """One NaN sample from the model (fp16 overflow on a GPU, say; the tiny model cannot make one,
    so the vocoder's output is poisoned here) became a full-scale click in a WAV, and LAME
    aborted the whole worker process on it (SIGABRT: every job in it lost, none answered)."""
    real_decode = TTSEngine.decode

    def poisoned(self, items, mels):
        waves = real_decode(self, items, mels)
        for wave in waves:
            wave[len(wave) // 2] = np.nan
        return waves

    monkeypatch.setattr(TTSEngine, "decode", poisoned)
    job = {**tts(output_format=fmt, stream=False), "seed": seed}
    message = refused(ctx, {k: v for k, v in job.items() if v is not None}, "The model's audio for chunk 1 of 1 ")
    again = "with another seed" if seed is not None else "(it draws another seed)"
    assert message.endswith(f"nothing was stored; send it again {again}, or with \"verify\": true, which samples "
                            "such a chunk again."), message
