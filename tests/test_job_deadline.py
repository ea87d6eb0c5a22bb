"""The per-job deadline (``F5_JOB_TIMEOUT_SECONDS``) on real slow parts.

A voice URL whose server sends its headers and then nothing, and S3 storage whose endpoint accepts
connections and never answers (a listening socket nobody reads). The caller gets one sentence
naming the deadline and what the job was waiting on; the job's temp files are gone once the
abandoned thread has ended (``asyncio.run`` waits for it: its default executor is joined on exit).
"""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid

import pytest

from f5worker.errors import WriteStopped
from f5worker.jobs.guard import COMMITTING, JobGuard, stuck_at, wait_for_earlier_attempt
from f5worker.jobs.tempfiles import job_paths
from f5worker.service import SETTLE_S, make_handler
from f5worker.settings import (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_ENDPOINT_URL, ENV_AWS_REGION,
                               ENV_AWS_SECRET_ACCESS_KEY, ENV_JOB_TIMEOUT, ENV_S3_BUCKET, ENV_S3_CONNECT_TIMEOUT,
                               ENV_S3_MAX_ATTEMPTS, ENV_S3_READ_TIMEOUT, Settings)
from tests.fixtures_worker import worker_ctx

DEADLINE_S = 1


def sentence(where: str) -> re.Pattern:
    return re.compile(rf"The job did not finish within {DEADLINE_S} s \(stuck at: {where}\)\.")


def timed(handler, job_input, job_id: str | None = None) -> tuple[float, dict, str]:
    """(seconds until the handler answered, its answer, the job id)."""
    job_id = job_id or f"d-{uuid.uuid4().hex[:10]}"

    async def go():
        started = time.monotonic()
        result = await handler({"id": job_id, "input": job_input})
        return time.monotonic() - started, result

    seconds, result = asyncio.run(go())  # returns once the abandoned thread has ended
    return seconds, result, job_id


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("deadline"), prefix="deadline",
                    extra={ENV_JOB_TIMEOUT: str(DEADLINE_S)}) as ctx:
        yield ctx


@pytest.fixture
def black_hole():
    """An address that accepts TCP connections (the kernel completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_upload_stuck_on_a_silent_voice_server_gets_the_deadline_sentence(ctx, file_server):
    keys = ctx.keys()
    seconds, result, job_id = timed(ctx.handler, {"endpoint": "upload", "voice_name": "stalled.wav",
                                                  "voice_file_url": file_server.url("_stall?delay=4")})
    assert set(result) == {"error"} and sentence("download_to_file").fullmatch(result["error"]), result
    assert DEADLINE_S <= seconds < DEADLINE_S + 1.5
    assert ctx.tmp_files() == [] and ctx.keys() == keys
    assert '"status": "error"' in ctx.get_text(f"logs/{job_id}.json")


def test_download_that_finishes_after_the_deadline_leaves_no_file(ctx, file_server):
    """The abandoned download thread goes on after the answer; its partial file is removed with the
    job's, so its final rename into ``<tmp>/<job_id>_download`` fails and leaves nothing."""
    _, result, _ = timed(ctx.handler, {"endpoint": "upload", "voice_name": "late.wav",
                                       "voice_file_url": file_server.url("_drip?n=40&delay=0.05")})
    left = ctx.tmp_files()
    for name in left:  # the other tests must not see them
        (ctx.tmp_dir / name).unlink()
    assert sentence("download_to_file").fullmatch(result["error"]), result
    assert left == []


def test_slow_model_call_names_the_batcher(ctx, monkeypatch):
    real_decode = ctx.worker.engine.vocoder.decode

    def slow_decode(*args, **kwargs):  # stands in for a model call that takes too long
        time.sleep(DEADLINE_S + 1.5)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(ctx.worker.engine.vocoder, "decode", slow_decode)
    keys = ctx.keys()
    seconds, result, _ = timed(ctx.handler, {"text": "Slow.", "local_voice": "basic_ref_en.wav", "nfe_step": 2})
    assert sentence("Batcher.sampled").fullmatch(result["error"]), result
    assert seconds < DEADLINE_S + 1.5
    ctx.worker.batcher.executor.submit(lambda: None).result(timeout=30)  # the model call has ended
    assert ctx.tmp_files() == [] and ctx.keys() == keys


def test_tts_on_storage_that_never_answers(tiny_models, tiny_whisper, tmp_path, black_hole, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3 = {ENV_S3_BUCKET: "hung", ENV_AWS_ACCESS_KEY_ID: "AKIDEXAMPLE", ENV_AWS_SECRET_ACCESS_KEY: "secret",
          ENV_AWS_REGION: "us-east-1", ENV_AWS_ENDPOINT_URL: black_hole, ENV_S3_CONNECT_TIMEOUT: "1",
          ENV_S3_READ_TIMEOUT: "3", ENV_S3_MAX_ATTEMPTS: "1", ENV_JOB_TIMEOUT: str(DEADLINE_S)}
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra=s3) as hung:
        seconds, result, _ = timed(hung.handler, {"text": "Hello.", "local_voice": "basic_ref_en.wav", "nfe_step": 2})
        assert sentence("VoiceLibrary.fetch").fullmatch(result["error"]), result
        # the failed job's log record goes to the same storage: it may not hold the answer either
        assert seconds < DEADLINE_S + SETTLE_S + 1.5
        assert hung.tmp_files() == []


def test_stuck_at_names_the_function_a_thread_runs():
    async def workflow():
        await asyncio.to_thread(time.sleep, 0.3)

    async def go():
        task = asyncio.get_running_loop().create_task(workflow())
        await asyncio.sleep(0.1)
        where = stuck_at(task)
        await task
        return where

    assert asyncio.run(go()) == "sleep"


def test_no_deadline_when_zero(tmp_path):
    assert Settings.from_env({ENV_JOB_TIMEOUT: "0"}).job_timeout_s == 0
    assert Settings.from_env({}).job_timeout_s == 600
    with pytest.raises(ValueError, match=ENV_JOB_TIMEOUT):
        Settings.from_env({ENV_JOB_TIMEOUT: "ten"})
    guard = JobGuard(0, tmp_path)

    async def slow():
        await asyncio.sleep(0.2)
        return {"ok": True}

    assert asyncio.run(guard.run("j", slow())) == {"ok": True}



def test_a_job_whose_deadline_passes_while_writing_its_output_reports_what_happened(ctx, monkeypatch):
    """Once the output write has begun the job is seen through: the caller never gets an error for
    a job whose output was stored. (The slow write is a stand-in: wall-clock slowness on demand.)"""
    real_upload = ctx.worker.storage.upload_file
    asked_to_stop = []

    def slow_upload(key, path, content_type, *, stop):
        if key.startswith("output/"):  # the guard asks the write to stop at the deadline
            asked_to_stop.append(stop.wait(DEADLINE_S + 2))
        return real_upload(key, path, content_type, stop=stop)  # one local write: it finishes

    monkeypatch.setattr(ctx.worker.storage, "upload_file", slow_upload)
    _, result, job_id = timed(ctx.handler, {"text": "Late but stored.", "local_voice": "basic_ref_en.wav",
                                            "nfe_step": 2, "seed": 1})
    assert "error" not in result, result
    assert asked_to_stop == [True]
    assert result["output_key"] == f"output/{job_id}.wav" and result["output_key"] in ctx.keys()
    assert ctx.tmp_files() == []


def test_a_job_sent_again_while_its_earlier_attempt_unwinds_keeps_its_files(ctx, monkeypatch):
    """A RunPod retry keeps the job's id, and so its temp files' names. The first attempt, answered
    at its deadline while a storage call of it still ran, removed them once that call ended: the
    retry's output file went from under it ("The worker's temp folder ... could not be written").
    The retry now starts once the earlier attempt has ended. Stand-ins (wall-clock slowness on
    demand): the first attempt's voice fetch takes past its deadline; the retry's storing of its
    output waits until that fetch has returned and its attempt has had time to unwind."""
    deadline_s = 3.0
    guard = JobGuard(deadline_s, ctx.settings.tmp_dir, committing=COMMITTING.get)
    handler = make_handler(ctx.worker, guard=guard)
    real_fetch, real_store = ctx.worker.voices.storage.download_if_changed, ctx.worker._store
    fetched, calls = threading.Event(), []

    def slow_first_fetch(*args, **kwargs):
        calls.append(1)
        try:
            if len(calls) == 1:
                time.sleep(deadline_s + 0.5)
            return real_fetch(*args, **kwargs)
        finally:
            fetched.set()

    async def store_after_the_first_attempt(*args, **kwargs):
        while not fetched.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the first attempt unwinds on this loop (its files removed)
        return await real_store(*args, **kwargs)

    monkeypatch.setattr(ctx.worker.voices.storage, "download_if_changed", slow_first_fetch)
    monkeypatch.setattr(ctx.worker, "_store", store_after_the_first_attempt)
    job = {"text": "Sent twice.", "local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 3}

    async def twice():
        first = await handler({"id": "sent-twice", "input": job})
        return first, await handler({"id": "sent-twice", "input": job})
    first, second = asyncio.run(twice())
    assert "did not finish within 3 s (stuck at: " in first["error"], first
    assert "error" not in second, second
    assert second["output_key"] == "output/sent-twice.wav" and ctx.tmp_files() == []


def test_stuck_at_names_the_wait_for_an_earlier_attempt():
    async def go():
        earlier = threading.Event()

        async def workflow():
            return "done"
        task = asyncio.ensure_future(wait_for_earlier_attempt(earlier, workflow()))
        await asyncio.sleep(0.1)
        where = stuck_at(task)
        earlier.set()
        return where, await task
    assert asyncio.run(go()) == ("wait_for_earlier_attempt", "done")


def shutdown_while_storing(ctx, monkeypatch, write):
    """A TTS job through the handler whose output write is ``write(stop, store)`` (a stand-in for a
    slow or multipart storage write: wall-clock slowness on demand, around the real write
    ``store``), the worker shutting down (the guard's end of grace) as the write begins. Its answer,
    and whether the output is stored after."""
    guard = JobGuard(600, ctx.settings.tmp_dir, committing=COMMITTING.get, write_wait_s=2.0)
    real_upload = ctx.worker.storage.upload_file

    def slow_upload(key, path, content_type, *, stop):
        if not key.startswith("output/"):
            return real_upload(key, path, content_type, stop=stop)
        guard.stop_jobs()
        return write(stop, lambda: real_upload(key, path, content_type, stop=stop))

    monkeypatch.setattr(ctx.worker.storage, "upload_file", slow_upload)
    job_id = f"s-{uuid.uuid4().hex[:10]}"
    result = asyncio.run(make_handler(ctx.worker, guard=guard)(
        {"id": job_id, "input": {"text": "Stored at a shutdown.", "local_voice": "basic_ref_en.wav", "nfe_step": 2}}))
    time.sleep(2.0)  # a write the answer did not wait for has ended by now
    return result, f"output/{job_id}.wav" in ctx.keys()


def test_a_write_under_way_at_a_shutdown_is_waited_for_and_the_job_answered_as_it_ended(ctx, monkeypatch):
    """It was answered "send it again" while its output was then stored all the same."""
    result, stored = shutdown_while_storing(ctx, monkeypatch, lambda stop, store: time.sleep(0.3) or store())
    assert "error" not in result and stored, result


def test_a_write_longer_than_the_shutdown_wait_is_answered_as_maybe_stored(ctx, monkeypatch):
    result, stored = shutdown_while_storing(ctx, monkeypatch, lambda stop, store: store() or time.sleep(3.0))
    assert stored and result["error"].startswith("The worker shut down while the job's result was being stored "), result
    assert result["error"].endswith("it may have been stored all the same, so send it again to be sure."), result


def test_a_multipart_upload_stopped_at_a_shutdown_says_nothing_was_stored(ctx, monkeypatch):
    def multipart(stop, store):  # stops before its next part and aborts, as s3_utils' does
        assert stop.wait(5)
        raise WriteStopped("the upload stopped before its next part", undone=True)

    result, stored = shutdown_while_storing(ctx, monkeypatch, multipart)
    assert not stored and result == {"error": "The worker shut down while the job's output was being uploaded, and the "
                                              "upload was aborted, so nothing was stored; send it again."}, result
    assert ctx.tmp_files() == []

def test_a_stopped_jobs_running_model_call_stops_between_steps_and_the_next_job_succeeds(ctx, monkeypatch, caplog):
    """A job stopped at its deadline while its model call runs: the call stops before its next ODE
    step, so the job behind it is not charged for the dead job's remaining steps (it used to fail
    "stuck at: Batcher.sampled" too, and the four after it)."""
    import logging

    from f5worker.inference import fast
    from f5worker.inference import sampler

    real_fast, real_eager = fast.euler_step, sampler.EagerStepRunner.__call__

    def slow_fast(*args, **kwargs):  # each ODE step takes 0.1 s, as a long batch's would on a slow GPU
        time.sleep(0.1)
        return real_fast(*args, **kwargs)

    def slow_eager(self, *args, **kwargs):
        time.sleep(0.1)
        return real_eager(self, *args, **kwargs)

    monkeypatch.setattr(fast, "euler_step", slow_fast)
    monkeypatch.setattr(sampler.EagerStepRunner, "__call__", slow_eager)

    async def go():
        long = asyncio.ensure_future(ctx.handler({"id": "long", "input": {
            "text": "A long job.", "local_voice": "basic_ref_en.wav", "nfe_step": 60}}))
        await asyncio.sleep(DEADLINE_S + 0.2)  # the long job has passed its deadline: answered, stopped
        started = time.monotonic()
        short = await ctx.handler({"id": "short", "input": {
            "text": "Short.", "local_voice": "basic_ref_en.wav", "nfe_step": 2}})
        return await long, short, time.monotonic() - started

    with caplog.at_level(logging.INFO, logger="f5worker.inference.batcher"):
        long, short, seconds = asyncio.run(go())
    assert sentence("Batcher.sampled").fullmatch(long["error"]), long
    assert "error" not in short, short
    assert "stopped between steps" in caplog.text


def test_sweep_removes_the_jobs_own_files_only(tmp_path):
    """A job's leftovers are its named files and their hidden partials; a job whose id starts with
    this one's and an underscore keeps its files (``a_*`` took ``a_b``'s while that job ran)."""
    own, other = job_paths(tmp_path, "a"), job_paths(tmp_path, "a_b")
    for path in [*own.values(), *other.values()]:
        path.write_bytes(b"x")
    partial = tmp_path / f".{own['voice.wav'].name}.k2j4.tmp"
    partial.write_bytes(b"x")
    (tmp_path / "unrelated.wav").write_bytes(b"x")
    JobGuard(0, tmp_path).sweep(["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in other.values()), "unrelated.wav"])
