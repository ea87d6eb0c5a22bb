"""A TTS job cancelled (as runpod's JobScaler.stop_job does: task.cancel() on the handler's task)
while its output is being stored: the guard leaves a committing job's staged files to the workflow,
so the thread that stored the new audio still stores its subtitle file (it was swept from under it,
and the new audio stood beside the old take's subtitles).

The only patch: the audio's transfer is slowed by 1 s once its file is open (a slow PUT), so that
the cancel lands while it is in flight, and an event tells the test when it began. Everything else is
the real handler, guard, worker and storage (local folder and SeaweedFS).
"""
from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import soundfile as sf

import s3_utils

from f5worker.service import job_guard, make_handler
from tests.fixtures_worker import worker_on_storage

BASE = {"local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 5, "return_base64": False}
OLD = "Alpha."
NEW = "Bravo is a longer line with many more words in it than the first one."


@pytest.fixture(scope="module", params=["local", "s3"])
def ctx(request, tiny_models, tiny_whisper, tmp_path_factory):
    with worker_on_storage(request, tiny_models, tiny_whisper, tmp_path_factory, "cancel") as built:
        yield built


def slow_audio_upload(ctx, monkeypatch, seconds=1.0):
    """The audio's transfer made slow once its file is open (local: the copy into place; S3: the
    PutObject call, its body already read), as a slow link would."""
    began = threading.Event()
    storage = ctx.worker.storage

    def is_audio(key):
        return key.startswith("output/") and key.endswith(".wav")

    if ctx.s3 is None:
        real_write = s3_utils.atomic_write

        def atomic_write(dest, write):
            if dest.suffix == ".wav" and "output" in dest.parts:
                began.set()
                time.sleep(seconds)
            return real_write(dest, write)
        monkeypatch.setattr(s3_utils, "atomic_write", atomic_write)
    else:
        real_put = storage.client.put_object

        def put_object(**kw):
            if is_audio(kw["Key"]):
                began.set()
                time.sleep(seconds)
            return real_put(**kw)
        monkeypatch.setattr(storage.client, "put_object", put_object)
    return began


def cancel_during_upload(ctx, job, began):
    async def go():
        task = asyncio.ensure_future(ctx.handler({"id": "job-new", "input": job}))
        while not began.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
            return "finished"
        except asyncio.CancelledError:
            return "cancelled"
    outcome = asyncio.run(go())
    time.sleep(2.0)  # the upload thread runs on and ends
    return outcome


def stored(ctx, key_base):
    audio, rate = sf.read(io.BytesIO(ctx.get_bytes(f"{key_base}.wav")))
    return len(audio) / rate, {ext: ctx.get_bytes(f"{key_base}.{ext}") for ext in ("srt", "vtt")}


def test_a_cancel_mid_upload_stores_the_new_takes_subtitles_with_its_audio(ctx, monkeypatch):
    _, old = ctx.run({**BASE, "text": OLD, "subtitles": "srt", "output_key": "take/line"})
    assert "error" not in old, old
    began = slow_audio_upload(ctx, monkeypatch)
    outcome = cancel_during_upload(ctx, {**BASE, "text": NEW, "subtitles": "srt", "output_key": "take/line"}, began)
    seconds, subs = stored(ctx, "output/take/line")
    assert outcome == "cancelled" and not ctx.tmp_files()
    assert abs(seconds - old["duration"]) < 0.01 or b"Alpha" not in subs["srt"], \
        "the new take's audio stands beside the old take's subtitle file"


def test_a_shutdown_during_a_slow_audio_put_stores_the_new_subtitles_too(ctx, monkeypatch):
    """The same through a shutdown: the guard's stop_jobs() (what _wind_down calls at the end of
    SIGTERM's grace) while the audio's one PUT takes 4 s (> the 3 s write wait); the process would
    end 5 s later (os._exit), after the upload thread has finished."""
    _, old = ctx.run({**BASE, "text": OLD, "subtitles": "srt", "output_key": "take/shut"})
    assert "error" not in old, old
    began = slow_audio_upload(ctx, monkeypatch, seconds=4.0)
    guard = job_guard(ctx.worker.settings, ctx.worker.storage)
    handler = make_handler(ctx.worker, guard=guard)

    async def go():
        task = asyncio.ensure_future(handler({"id": "job-shut", "input": {**BASE, "text": NEW, "subtitles": "srt",
                                                                           "output_key": "take/shut"}}))
        while not began.is_set():
            await asyncio.sleep(0.01)
        guard.stop_jobs()
        return await task
    answer = asyncio.run(go())
    time.sleep(3.0)  # within the 5 s before the process would end
    seconds, subs = stored(ctx, "output/take/shut")
    assert "send it again" in answer["error"]
    assert abs(seconds - old["duration"]) < 0.01 or b"Alpha" not in subs["srt"], \
        "the new take's audio stands beside the old take's subtitle file"


@pytest.mark.parametrize("new_subtitles", [None, "vtt"])
def test_a_cancel_mid_upload_still_removes_the_old_takes_other_subtitle_file(ctx, monkeypatch, new_subtitles):
    """The new take asks for no subtitles, or the other format: the old take's .srt is removed once
    the new audio is stored, in the same thread as the upload, so a cancel cannot skip it."""
    key = f"take/other-{new_subtitles}"
    _, old = ctx.run({**BASE, "text": OLD, "subtitles": "srt", "output_key": key})
    assert "error" not in old, old
    began = slow_audio_upload(ctx, monkeypatch)
    job = {**BASE, "text": NEW, "output_key": key, **({"subtitles": new_subtitles} if new_subtitles else {})}
    outcome = cancel_during_upload(ctx, job, began)
    seconds, subs = stored(ctx, f"output/{key}")
    assert outcome == "cancelled" and not ctx.tmp_files()
    assert abs(seconds - old["duration"]) > 0.01, "the new take's audio was not stored"
    assert subs["srt"] is None, "the old take's subtitle file stands beside the new take's audio"
    if new_subtitles == "vtt":
        assert b"Bravo" in subs["vtt"]
