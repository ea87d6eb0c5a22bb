"""The RunPod handler in process: ``make_handler(build_worker(settings))`` on the tiny models.

One worker per storage backend (a local folder, and the real SeaweedFS S3 server over HTTPS) is
built once for the module; every test sends jobs through the async handler exactly as runpod would
(``{"id": ..., "input": {...}}``) and checks the result, the storage and the job's temp files.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import secrets
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs.inputs import MAX_SEED, MAX_TEXT_CHARS
from tests.fixtures_models import SR, speechlike
from tests.fixtures_worker import Ctx, worker_ctx
from tests.helpers import assert_one_sentence, assert_wav_matches, log_record

NFE = 6  # few ODE steps: each job takes a fraction of a second on the tiny model
BUILTIN = "basic_ref_en.wav"


# --- the worker, once per storage backend ---------------------------------------------------------
@pytest.fixture(scope="module", params=["local", "s3"])
def ctx(request, tiny_models, tiny_whisper, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"handler-{request.param}")
    s3_server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    with worker_ctx(tiny_models, tiny_whisper, folder, s3_server) as built:
        yield built


@pytest.fixture(autouse=True)
def _tmp_dir_left_empty(ctx):
    """However a job ends, its staging files are gone afterwards."""
    assert ctx.tmp_files() == [], "the job temp dir was not empty before the test"
    yield
    assert ctx.tmp_files() == [], "a job left files in the temp dir"


# --- helpers --------------------------------------------------------------------------------------
def tts_input(text="Hello there, this is a short test.", voice=BUILTIN, **kw) -> dict:
    return {"text": text, "local_voice": voice, "nfe_step": NFE, **kw}


def wav_file(folder: Path, name: str, seconds: float, seed: int = 0) -> Path:
    path = folder / name
    sf.write(str(path), speechlike(seconds, seed=seed), SR, subtype="PCM_16")
    return path


def voice_name(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}.wav"


def upload(ctx: Ctx, file_server, path: Path, name: str, **kw) -> tuple[str, dict]:
    return ctx.run({"endpoint": "upload", "voice_file_url": file_server.url(path.name), "voice_name": name, **kw})


# --- uploads and TTS ------------------------------------------------------------------------------
def test_upload_then_tts_round_trip(ctx, file_server):
    clip = wav_file(file_server.root, "speaker.wav", 3.0)
    name = voice_name("alice")
    job_id, result = upload(ctx, file_server, clip, name, ref_text="This is what the speaker says.")
    assert result == {"voice_name": name, "voice_key": f"voices/{name}", "duration": pytest.approx(3.0, abs=1e-3),
                      "source_duration": pytest.approx(3.0, abs=1e-3), "sample_rate": SR,
                      "ref_text": "This is what the speaker says."}
    assert f"voices/{name}" in ctx.keys() and f"voices/{name}.txt" not in ctx.keys()
    assert ctx.stored_transcript(name) == "This is what the speaker says."  # one object: voice and transcript
    assert log_record(ctx, job_id)["status"] == "ok"

    job_id, result = ctx.run(tts_input("Good morning, how are you today?", name, seed=11))
    assert "error" not in result, result
    assert result["output_key"] == f"output/{job_id}.wav" and result["output_key"] in ctx.keys()
    assert result["sample_rate"] == 24000 and result["duration"] > 0
    assert result["voice"] == name and result["seed"] == 11
    assert result["ref_text_source"] == "stored"
    assert list(result["timings"]) == ["download_s", "transcription_s", "synthesis_s", "encoding_s", "upload_s",
                                       "total_s"]
    assert all(isinstance(v, float) and v >= 0 for v in result["timings"].values())
    assert_wav_matches(ctx.fetch_url(result["audio_url"]), result["duration"])


def test_upload_without_ref_text_is_transcribed_once(ctx, file_server):
    clip = wav_file(file_server.root, "unlabelled.wav", 2.5, seed=3)
    name = voice_name("bob")
    _, result = upload(ctx, file_server, clip, name)
    assert "error" not in result, result
    transcript = result["ref_text"]
    assert isinstance(transcript, str) and transcript.strip()  # the tiny Whisper's (random) words
    assert ctx.stored_transcript(name) == transcript

    _, result = ctx.run(tts_input("Now say something new.", name, seed=1))
    assert "error" not in result, result
    assert result["ref_text_source"] == "stored"  # the upload's transcript, not a second transcription


def test_voice_without_transcript_is_transcribed_then_stored(ctx, tmp_path):
    """A voice put in storage by hand: Whisper's transcript is kept beside it, bound to its audio."""
    name = voice_name("carol")
    ctx.worker.storage.upload_file(f"voices/{name}", wav_file(tmp_path, "carol.wav", 2.0, seed=5), "audio/wav")
    assert f"voices/{name}.json" not in ctx.keys()
    runs = ctx.worker.transcriptions

    _, first = ctx.run(tts_input("First job for this voice.", name, seed=2))
    assert "error" not in first, first
    assert first["ref_text_source"] == "transcribed"
    meta = json.loads(ctx.get_text(f"voices/{name}.json"))
    assert meta["ref_text"].strip() and meta["sha256"] == hashlib.sha256(ctx.get_bytes(f"voices/{name}")).hexdigest()

    _, second = ctx.run(tts_input("Second job for this voice.", name, seed=2))
    assert second["ref_text_source"] == "stored"
    assert ctx.worker.transcriptions == runs + 1

    _, third = ctx.run(tts_input("A job with its own transcript.", name, ref_text="Given by the caller.", seed=2))
    assert third["ref_text_source"] == "job"

    # The voice replaced by hand: the old transcript is not used for the new audio.
    ctx.worker.storage.upload_file(f"voices/{name}", wav_file(tmp_path, "carol2.wav", 2.0, seed=6), "audio/wav")
    _, fourth = ctx.run(tts_input("The voice has changed.", name, seed=2))
    assert fourth["ref_text_source"] == "transcribed" and ctx.worker.transcriptions == runs + 2


def test_hand_written_transcript_beside_a_voice_is_used(ctx, tmp_path):
    name = voice_name("dora")
    ctx.worker.storage.upload_file(f"voices/{name}", wav_file(tmp_path, "dora.wav", 2.0, seed=8), "audio/wav")
    ctx.worker.storage.put_text(f"voices/{name}.txt", "Written by a person.")
    runs = ctx.worker.transcriptions
    _, result = ctx.run(tts_input("Speak with the written transcript.", name, seed=2))
    assert result["ref_text_source"] == "stored" and ctx.worker.transcriptions == runs


def test_jobs_arriving_together_transcribe_a_voice_once(ctx, tmp_path):
    name = voice_name("erin")
    ctx.worker.storage.upload_file(f"voices/{name}", wav_file(tmp_path, "erin.wav", 2.0, seed=9), "audio/wav")
    runs = ctx.worker.transcriptions

    async def together():
        return await asyncio.gather(*(ctx.handler({"id": f"w{i}-{uuid.uuid4().hex[:8]}",
                                                   "input": tts_input(f"Job number {i}.", name, seed=i)})
                                      for i in range(4)))

    results = asyncio.run(together())
    assert all("error" not in r for r in results), results
    assert ctx.worker.transcriptions == runs + 1


def test_long_voice_is_stored_as_the_part_used_and_transcribed_as_such(ctx, file_server):
    """A 20 s upload: stored is the part synthesis uses (at most 12 s), and its transcript describes
    that part; with a ref_text of the whole clip it is refused, since that text would not match."""
    long_clip = file_server.root / "long.wav"
    sf.write(str(long_clip), speechlike(20.0, seed=4), SR, subtype="PCM_16")
    name = voice_name("long")
    keys = ctx.keys()
    message = _assert_refused(ctx, {"endpoint": "upload", "voice_file_url": file_server.url("long.wav"),
                                    "voice_name": name, "ref_text": "The whole twenty seconds."},
                              "The voice is 20.0 s long and only its first 12 s", keys)
    assert "leave ref_text out" in message

    _, result = upload(ctx, file_server, long_clip, name)
    assert "error" not in result, result
    assert result["source_duration"] == pytest.approx(20.0, abs=1e-3) and result["duration"] <= 12.0
    stored, sr = sf.read(io.BytesIO(ctx.get_bytes(f"voices/{name}")))
    assert len(stored) / sr == pytest.approx(result["duration"], abs=1e-3)
    assert ctx.stored_transcript(name) == result["ref_text"]


def test_job_ref_text_for_a_long_hand_placed_voice_is_refused(ctx, tmp_path):
    name = voice_name("longhand")
    ctx.worker.storage.upload_file(f"voices/{name}", wav_file(tmp_path, "lh.wav", 20.0, seed=2), "audio/wav")
    keys = ctx.keys()
    _assert_refused(ctx, tts_input("Hello.", name, ref_text="All twenty seconds of it."),
                    "The voice is 20.0 s long", keys)
    # Without ref_text, Whisper hears exactly the part used (a spy around the real transcriber).
    heard = []
    real = ctx.worker.voices._transcribe
    ctx.worker.voices._transcribe = lambda samples, sr: heard.append(len(samples) / sr) or real(samples, sr)
    try:
        ctx.run(tts_input("Hello there, a longer text.", name, seed=1))  # the tiny Whisper's words may not fit
    finally:
        ctx.worker.voices._transcribe = real
    assert len(heard) == 1 and heard[0] <= 12.0
    meta = json.loads(ctx.get_text(f"voices/{name}.json"))
    assert meta["sha256"] == hashlib.sha256(ctx.get_bytes(f"voices/{name}")).hexdigest()


def test_silent_upload_is_refused(ctx, file_server):
    silent = file_server.root / "silent.wav"
    sf.write(str(silent), np.zeros(3 * SR, dtype=np.float32), SR, subtype="PCM_16")
    _assert_refused(ctx, {"endpoint": "upload", "voice_file_url": file_server.url("silent.wav"),
                          "voice_name": voice_name("silent")}, "The voice is almost silent", ctx.keys())


def test_concurrent_uploads_of_one_name_keep_voice_and_transcript_together(ctx, file_server):
    name = voice_name("race")
    clips = {i: wav_file(file_server.root, f"race{i}.wav", 1.5 + 0.5 * i, seed=20 + i) for i in range(3)}

    async def race():
        return await asyncio.gather(*(ctx.handler({"id": f"r{i}-{uuid.uuid4().hex[:8]}", "input": {
            "endpoint": "upload", "voice_file_url": file_server.url(clip.name), "voice_name": name,
            "ref_text": f"Transcript of upload {i}."}}) for i, clip in clips.items()))

    for _ in range(5):
        results = asyncio.run(race())
        assert all("error" not in r for r in results), results
        stored, sr = sf.read(io.BytesIO(ctx.get_bytes(f"voices/{name}")))
        winner = int(ctx.stored_transcript(name).split()[-1].rstrip("."))
        assert len(stored) / sr == pytest.approx(results[winner]["duration"], abs=1e-3)


def test_builtin_voice_needs_no_upload(ctx):
    before = ctx.keys()
    assert f"voices/{BUILTIN}" not in before
    job_id, result = ctx.run(tts_input("The built in voice speaks.", seed=3))
    assert "error" not in result, result
    assert result["ref_text_source"] == "built-in" and result["voice"] == BUILTIN
    assert ctx.keys() - before == {f"output/{job_id}.wav"}  # no transcript stored for a built-in voice
    assert_wav_matches(ctx.fetch_url(result["audio_url"]), result["duration"])


def test_seed_makes_audio_repeatable(ctx):
    text = "Repeat after me, exactly the same."
    _, a = ctx.run(tts_input(text, seed=1234))
    _, b = ctx.run(tts_input(text, seed=1234))
    _, c = ctx.run(tts_input(text, seed=4321))
    assert a["seed"] == b["seed"] == 1234 and c["seed"] == 4321
    audio_a, audio_b, audio_c = (ctx.fetch_url(r["audio_url"]) for r in (a, b, c))
    assert audio_a == audio_b
    assert audio_a != audio_c

    _, d = ctx.run(tts_input(text))
    assert isinstance(d["seed"], int) and 0 <= d["seed"] <= MAX_SEED


def test_concurrent_jobs_share_model_calls(ctx):
    texts = ["One small job.", "Another small job here.", "A third, slightly longer job than those.",
             "And a fourth one."]
    calls_before = len(ctx.worker.batcher.calls)

    async def all_jobs():
        jobs = asyncio.gather(*(ctx.handler({"id": f"c{i}-{uuid.uuid4().hex[:8]}", "input": tts_input(t, seed=i)})
                                for i, t in enumerate(texts)))
        return await asyncio.wait_for(jobs, timeout=60)  # a stuck batcher fails here, not at pytest's timeout

    results = asyncio.run(all_jobs())
    assert all("error" not in r for r in results), results
    assert len({r["output_key"] for r in results}) == 4
    for r in results:
        assert_wav_matches(ctx.fetch_url(r["audio_url"]), r["duration"])
    calls = ctx.worker.batcher.calls[calls_before:]
    assert sum(calls) == 4 and max(calls) > 1, calls


# --- logs -----------------------------------------------------------------------------------------
def test_log_records_never_hold_the_text(ctx, file_server):
    marker = "Zorblax" + secrets.token_hex(4)
    ok_id, ok = ctx.run(tts_input(f"Please say {marker} twice.", seed=5))
    bad_id, bad = ctx.run(tts_input(f"Please say {marker} again.", nfe_step=0))
    clip = wav_file(file_server.root, "logged.wav", 2.0)
    up_id, up = upload(ctx, file_server, clip, voice_name("logged"), ref_text=f"The {marker} transcript.")
    assert "error" not in ok and "error" in bad and "error" not in up

    records = {job_id: log_record(ctx, job_id) for job_id in (ok_id, bad_id, up_id)}
    assert records[ok_id]["status"] == "ok" and records[ok_id]["endpoint"] == "tts"
    assert records[ok_id]["text_chars"] == len(f"Please say {marker} twice.")
    assert records[bad_id]["status"] == "error" and records[bad_id]["error"] == bad["error"]
    assert records[up_id]["status"] == "ok" and records[up_id]["endpoint"] == "upload"
    for record in records.values():
        assert marker not in json.dumps(record, ensure_ascii=False)


# --- errors ---------------------------------------------------------------------------------------
INVALID_INPUTS = {
    "unknown field": (tts_input(volume=3), "Unknown input field 'volume'."),
    "missing text": ({"local_voice": BUILTIN}, "Missing required input 'text'."),
    "blank text": (tts_input("   "), "'text' must not be empty."),
    "nfe_step 0": (tts_input(nfe_step=0), "'nfe_step' must be at least 1."),
    "nfe_step 65": (tts_input(nfe_step=65), "'nfe_step' must be at most 64."),
    "speed 0.2": (tts_input(speed=0.2), "'speed' must be at least 0.3."),
    "text too long": (tts_input("a" * (MAX_TEXT_CHARS + 1)), f"'text' is too long: at most {MAX_TEXT_CHARS} characters."),
    "voice path": (tts_input(voice="../secret.wav"), "'local_voice' must be a file name"),
    "voice dir": (tts_input(voice="voices/../x.wav"), "'local_voice' must be a file name"),
    "unknown voice": (tts_input(voice="nobody-here.wav"), "Voice 'nobody-here.wav' was not found"),
    "unknown endpoint": ({"endpoint": "delete", "voice_name": "a.wav"}, "Unknown endpoint"),
    "input is a string": ("say hello", "The job input must be a JSON object."),
    "input is a list": ([tts_input()], "The job input must be a JSON object."),
    "no input": (None, "The job input must be a JSON object."),
    "upload name path": ({"endpoint": "upload", "voice_file_url": "http://127.0.0.1:9/x.wav",
                          "voice_name": "../evil.wav"}, "'voice_name' must be a file name"),
    "upload without a source": ({"endpoint": "upload", "voice_name": "a.wav"},
                                "Give exactly one of 'voice_file_url', 'voice_base64' or 'voice_s3_key'."),
    "upload ftp url": ({"endpoint": "upload", "voice_file_url": "ftp://127.0.0.1/x.wav", "voice_name": "a.wav"},
                       "voice_file_url must be an http or https URL."),
}


def _assert_refused(ctx: Ctx, job_input, expected: str, keys_before: set[str]) -> str:
    job_id, result = ctx.run(job_input)
    message = assert_one_sentence(result)
    assert message.startswith(expected), message
    assert ctx.tmp_files() == []
    assert ctx.keys() == keys_before, "a refused job changed voices/ or output/"
    record = log_record(ctx, job_id)
    assert record["status"] == "error" and record["error"] == message
    return message


@pytest.mark.parametrize("case", list(INVALID_INPUTS))
def test_invalid_input_is_one_sentence_and_changes_nothing(ctx, case):
    job_input, expected = INVALID_INPUTS[case]
    _assert_refused(ctx, job_input, expected, ctx.keys())


def test_bad_uploads_are_refused(ctx, file_server):
    (file_server.root / "notes.txt").write_text("this is not audio at all\n" * 50)
    short = wav_file(file_server.root, "short.wav", 0.5)
    long = wav_file(file_server.root, "long.wav", 61.0)
    keys = ctx.keys()

    def refused(url: str, expected: str, name: str | None = None) -> str:
        return _assert_refused(ctx, {"endpoint": "upload", "voice_file_url": url,
                                     "voice_name": name or voice_name("bad")}, expected, keys)

    refused(file_server.url("notes.txt"), "The voice file is not decodable audio")
    assert "0.5 s" in refused(file_server.url(short.name), "The voice must be between 1 and 60 seconds long")
    assert "61.0 s" in refused(file_server.url(long.name), "The voice must be between 1 and 60 seconds long")
    refused(file_server.url("missing.wav"), "Downloading the voice file failed: the server answered HTTP 404.")
    refused(file_server.url("_status/404"), "Downloading the voice file failed: the server answered HTTP 404.")
    refused(file_server.url("_empty"), "Downloading the voice file failed: the server sent an empty file.")
    # the same name as a good voice: a failed upload must not replace it
    name = voice_name("kept")
    good = wav_file(file_server.root, "good.wav", 2.0)
    _, ok = upload(ctx, file_server, good, name, ref_text="Kept as it was.")
    assert "error" not in ok
    keys = ctx.keys()
    refused(file_server.url(short.name), "The voice must be between", name=name)
    assert ctx.stored_transcript(name) == "Kept as it was."


def test_loopback_url_refused_unless_allowed(ctx, file_server):
    clip = wav_file(file_server.root, "private.wav", 2.0)
    keys = ctx.keys()
    allowed = ctx.worker.settings
    ctx.worker.settings = dataclasses.replace(allowed, allow_private_urls=False)
    try:
        message = _assert_refused(ctx, {"endpoint": "upload", "voice_file_url": file_server.url(clip.name),
                                        "voice_name": voice_name("private")},
                                  "voice_file_url points to a private or loopback address", keys)
        assert "127.0.0.1" in message
    finally:
        ctx.worker.settings = allowed
    assert file_server.requests == []  # refused before any connection


def test_storage_fault_is_one_sentence_without_secrets(ctx, tmp_path, file_server):
    """A worker whose storage cannot work: S3 with a wrong secret, or a local folder that became a
    file after start (one that is a file at start is a start error: tests/test_service.py)."""
    from f5worker.service import build_worker, make_handler

    blocker = tmp_path / "a-folder-then-a-file"
    blocker.mkdir()
    if ctx.kind == "s3":
        bad_secret = "WrongSecret" + secrets.token_urlsafe(24)
        settings = dataclasses.replace(ctx.settings, aws_secret_access_key=bad_secret)
    else:
        bad_secret = None
        settings = dataclasses.replace(ctx.settings, local_storage_dir=blocker / "storage")
    worker = build_worker(settings)
    blocker.rmdir()
    blocker.write_text("not a folder")
    handler = make_handler(worker)
    clip = wav_file(file_server.root, "fault.wav", 2.0)
    keys = ctx.keys()
    try:
        jobs = [tts_input(seed=1), tts_input(voice="someone.wav"),
                {"endpoint": "upload", "voice_file_url": file_server.url(clip.name), "voice_name": "fault.wav",
                 "ref_text": "Some words."}]
        for job_input in jobs:
            result = asyncio.run(handler({"id": f"f-{uuid.uuid4().hex[:8]}", "input": job_input}))
            message = assert_one_sentence(result)
            assert "storage" in message.lower() or "S3" in message, message
            if bad_secret:
                assert bad_secret not in message and ctx.s3.server.secret_key not in message
            assert ctx.tmp_files() == []
    finally:
        worker.batcher.executor.shutdown(wait=True)
    assert ctx.keys() == keys


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a temp folder that really fills up (needs root; skipped where mounting is not allowed)."""
    import subprocess

    folder = tmp_path / "small-tmp"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("problem", ["missing", "full"])
def test_temp_folder_faults_are_named(ctx, tmp_path, problem, request):
    tmp_dir = tmp_path / "gone" if problem == "missing" else request.getfixturevalue("small_tmpfs")
    original = ctx.worker.settings
    ctx.worker.settings = dataclasses.replace(original, tmp_dir=tmp_dir)
    keys = ctx.keys()
    try:
        _, result = ctx.run(tts_input("This output will not fit in sixty four kilobytes at all.", seed=1))
    finally:
        ctx.worker.settings = original
    message = assert_one_sentence(result)
    expected = "does not exist" if problem == "missing" else "is full"
    assert message.startswith(f"The worker's temp folder {tmp_dir} {expected}"), message
    assert ctx.keys() == keys
    if problem == "full":
        assert list(tmp_dir.iterdir()) == []


def test_local_retention_removes_old_outputs_after_a_job(ctx):
    """With a retention time, a job's end sweeps outputs and records older than it; voices stay."""
    if ctx.kind != "local":
        pytest.skip("S3 buckets expire objects with lifecycle rules")
    import os
    import time

    root = ctx.settings.local_storage_dir
    old_output, old_log = root / "output" / "ancient.wav", root / "logs" / "ancient.json"
    old_voice = root / "voices" / "ancient.wav"
    for path in (old_output, old_log, old_voice):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")
        os.utime(path, (time.time() - 3 * 3600, time.time() - 3 * 3600))
    storage = ctx.worker.storage
    saved = (storage.retention_s, storage._next_sweep)
    storage.retention_s, storage._next_sweep = 3600.0, 0.0
    try:
        _, result = ctx.run(tts_input("Sweep after me.", seed=1))
    finally:
        storage.retention_s, storage._next_sweep = saved
    assert "error" not in result, result
    assert not old_output.exists() and not old_log.exists() and old_voice.exists()
    assert result["output_key"] in ctx.keys()
    old_voice.unlink()
