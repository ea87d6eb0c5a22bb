"""Two TTS jobs with the same caller-chosen output_key, run at once in one worker: the stored
audio and subtitle file are one job's, and no job removes as older the subtitle file the other
has just stored (``Worker._stem_held``).

The only patch widens a race window: one storage call is made late (a slow PUT or DELETE), so
the interleaving that mixed the pair happens every time. Everything else (handler, worker, tiny
models, Whisper, the local folder and SeaweedFS) is real.
"""
from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import soundfile as sf

from tests.fixtures_worker import worker_on_storage

BASE = {"local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 5, "return_base64": False}
TEXT_A = "Alpha."
TEXT_B = ("Bravo is a much longer line, said slowly, with many more words in it than the first one has, "
          "and it goes on for a while.")


@pytest.fixture(scope="module", params=["local", "s3"])
def ctx(request, tiny_models, tiny_whisper, tmp_path_factory):
    with worker_on_storage(request, tiny_models, tiny_whisper, tmp_path_factory, "pair") as built:
        yield built


def slow_first(ctx, monkeypatch, suffix, delay):
    real = ctx.worker.storage.upload_file
    state = {"n": 0}
    lock = threading.Lock()

    def upload_file(key, path, content_type, **kw):
        with lock:
            first = key.endswith(suffix) and state["n"] == 0
            if key.endswith(suffix):
                state["n"] += 1
        if first:
            time.sleep(delay)
        return real(key, path, content_type, **kw)
    monkeypatch.setattr(ctx.worker.storage, "upload_file", upload_file)


def run_two(ctx, job_a, job_b, gap=0.0):
    async def both():
        a = asyncio.ensure_future(ctx.handler({"id": "job-a", "input": job_a}))
        await asyncio.sleep(gap)
        b = asyncio.ensure_future(ctx.handler({"id": "job-b", "input": job_b}))
        return await a, await b
    return asyncio.run(both())


def test_the_stored_audio_and_subtitles_are_one_jobs(ctx, monkeypatch):
    slow_first(ctx, monkeypatch, ".srt", 1.5)
    a, b = run_two(ctx, {**BASE, "text": TEXT_A, "subtitles": "srt", "output_key": "scene/line1"},
                   {**BASE, "text": TEXT_B, "subtitles": "srt", "output_key": "scene/line1"})
    assert "error" not in a and "error" not in b, (a, b)
    audio, rate = sf.read(io.BytesIO(ctx.get_bytes("output/scene/line1.wav")))
    stored_seconds = len(audio) / rate
    srt = ctx.get_bytes("output/scene/line1.srt").decode()
    # the pair as stored: audio from one job, subtitle file from the other
    audio_job = "B" if abs(stored_seconds - b["duration"]) < 0.01 else "A"
    srt_job = "A" if "Alpha" in srt else "B"
    assert audio_job == srt_job, f"stored audio is job {audio_job}'s, stored subtitles are job {srt_job}'s"


def test_a_job_without_subtitles_leaves_the_other_jobs_fresh_subtitles(ctx, monkeypatch):
    """B (no subtitles) stores its audio first; A (srt) then stores audio + srt; then B removes the
    'older' srt of the key, which was A's brand new one, and A's result named a file that was gone."""
    real_delete = ctx.worker.storage.delete

    def delete(key):
        if key.endswith(".srt"):
            time.sleep(2.0)  # B's removal of the older subtitle files, late (a slow DELETE)
        return real_delete(key)
    monkeypatch.setattr(ctx.worker.storage, "delete", delete)
    b_job = {**BASE, "text": TEXT_A, "output_key": "scene/line2"}
    a_job = {**BASE, "text": TEXT_B, "subtitles": "srt", "output_key": "scene/line2"}

    async def both():
        b = asyncio.ensure_future(ctx.handler({"id": "job-b2", "input": b_job}))
        a = asyncio.ensure_future(ctx.handler({"id": "job-a2", "input": a_job}))
        return await a, await b
    a, b = asyncio.run(both())
    assert "error" not in a and "error" not in b, (a, b)
    audio, rate = sf.read(io.BytesIO(ctx.get_bytes("output/scene/line2.wav")))
    assert not (abs(len(audio) / rate - a["duration"]) < 0.01 and ctx.get_bytes("output/scene/line2.srt") is None
                and a.get("subtitles_key")), "A's audio stands, A's result names its srt, the srt is gone"
