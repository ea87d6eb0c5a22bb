"""Workers that cannot recover: each job gets one sentence saying why, and RunPod is asked to
replace the worker (``"refresh_worker": True``, which runpod's own ``run_job`` turns into
``stopPod``).

Start-up failures are real (a corrupt checkpoint, a missing model folder). CUDA faults cannot be
caused on the CPU these tests run on, so the real worker's vocoder is made to raise torch's own
``OutOfMemoryError`` / ``AcceleratorError`` (a stand-in for the fault, said where it is done); the
batcher, handler and runpod's result shaping around it are real.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import soundfile as sf
import torch
from runpod.serverless.modules.rp_job import run_job

from f5worker.errors import StorageError
from f5worker.inference.gpu_faults import gpu_fault
from f5worker.service import make_handler, start_worker
from f5worker.settings import Settings
from tests.fixtures_models import SR, speechlike
from tests.fixtures_worker import worker_ctx
from tests.processes import REPO

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def tts(**kw) -> dict:
    return {"text": "Hello there, a short test.", "local_voice": "basic_ref_en.wav", "nfe_step": 4, **kw}


# --- start-up failures ----------------------------------------------------------------------------
def test_corrupt_checkpoint_is_reported_to_every_job_and_the_worker_replaced(tiny_models, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    env = {**tiny_models, "F5_CKPT_FILE": str(bad), "RUNPOD_VOLUME_PATH": str(tmp_path / "vol")}
    worker, error, runpod = start_worker(Settings.from_env(env))
    assert worker is None and error is not None and hasattr(runpod, "serverless")
    handler = make_handler(None, error)
    sentence = f"The checkpoint {bad} could not be read (SafetensorError)."  # names the file to replace
    for job_input in ({"text": "x", "local_voice": "a.wav"}, {"endpoint": "upload"}, None):
        assert asyncio.run(handler({"id": "j1", "input": job_input})) == {"error": sentence, "refresh_worker": True}
    # what runpod sends to RunPod for that answer: the sentence, and stopPod
    assert asyncio.run(run_job(handler, {"id": "j2", "input": {}})) == {"error": sentence, "stopPod": True}


# RunPod's queue cannot be had here: a fetcher that always has jobs waiting stands in for it, in
# runpod's own job loop (JobScaler, which takes a fetcher outside RunPod), and results go to a
# loopback server standing in for RunPod's job API, through runpod's own sender.
QUEUE_CHILD = r"""
import asyncio, itertools, sys
from runpod.serverless.modules import rp_scale
from f5worker.errors import StorageError
from f5worker.service import make_handler
taken = itertools.count()
async def fetch(session, count):
    await asyncio.sleep(0.05)
    return [{"id": f"job-{next(taken)}", "input": {"text": "Hi.", "local_voice": "a.wav"}} for _ in range(count)]
async def no_stop_signals(session):
    await asyncio.sleep(1)
    return []
streaming = sys.argv[1] == "1"
config = {"concurrency_modifier": lambda current: 4, "jobs_fetcher": fetch, "stop_signals_fetcher": no_stop_signals,
          "rp_args": {}, "return_aggregate_stream": streaming}
config["handler"] = make_handler(None, StorageError("The models could not be loaded."), streaming=streaming,
                                 replace_worker=lambda: config.update(refresh_worker=True))
scaler = rp_scale.JobScaler(config)
async def main():
    asyncio.get_running_loop().call_later(3, scaler.kill_worker)  # the most this test waits
    await scaler.run()
asyncio.run(main())
"""


@pytest.mark.parametrize("streaming", ["0", "1"])
def test_a_worker_that_did_not_start_takes_no_more_jobs_after_its_first(streaming):
    """A plain handler's ``refresh_worker`` only sent ``stopPod`` with that result: runpod's job loop
    went on taking jobs and failing them, 48 in 3 s at a concurrency of 16. Both handlers now set
    runpod's flag too, and the loop stops after the jobs in hand."""
    received: list[dict] = []

    class JobAPI(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JobAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/done"
    env = {**os.environ, "RUNPOD_WEBHOOK_POST_OUTPUT": url, "RUNPOD_WEBHOOK_POST_STREAM": url,
           "RUNPOD_LOG_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    try:
        done = subprocess.run([sys.executable, "-c", QUEUE_CHILD, streaming], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [body for body in received if body.get("error")]
    assert answers and len(answers) <= 4, len(answers)  # the first jobs taken, at most one batch
    assert all(body["error"] == "The models could not be loaded." and body.get("stopPod") for body in answers)


def test_missing_model_file_is_reported(tiny_models, tmp_path):
    env = {**tiny_models, "F5_VOCODER_DIR": str(tmp_path / "nowhere"), "RUNPOD_VOLUME_PATH": str(tmp_path)}
    worker, error, _ = start_worker(Settings.from_env(env))
    result = asyncio.run(make_handler(worker, error)({"id": "j2", "input": {}}))
    assert result["refresh_worker"] is True
    assert result["error"].startswith("F5_VOCODER_DIR is set to ") and result["error"].endswith("does not exist.")


# --- recognising GPU faults -----------------------------------------------------------------------
def _raised_from(outer: Exception, cause: Exception) -> Exception:
    try:
        try:
            raise cause
        except Exception as inner:
            raise outer from inner
    except Exception as err:
        return err


def _raised_during(outer: Exception, context: Exception) -> Exception:
    try:
        try:
            raise context
        except Exception:
            raise outer  # noqa: B904 (an implicit __context__ is the point)
    except Exception as err:
        return err


@pytest.mark.parametrize("err, kind", [
    (torch.cuda.OutOfMemoryError(OOM_TEXT), "memory"),
    (RuntimeError(OOM_TEXT), "memory"),  # torch before 1.13 raised a plain RuntimeError
    (RuntimeError("CUDA error: out of memory"), "memory"),
    (torch.AcceleratorError(ILLEGAL_ACCESS), "device"),
    (RuntimeError("CUDA error: device-side assert triggered"), "device"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"), "device"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "device"),
    (_raised_from(StorageError("The transcription model could not be loaded (OutOfMemoryError)"),
                  torch.cuda.OutOfMemoryError(OOM_TEXT)), "memory"),
    (_raised_during(ValueError("cleanup failed"), torch.AcceleratorError(ILLEGAL_ACCESS)), "device"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), None),
    (RuntimeError("shape mismatch"), None),
    (MemoryError(), None),
    (ValueError("CUDA error: in a ValueError is not torch's"), None),
])
def test_gpu_fault_is_recognised_also_when_wrapped(err, kind):
    found = gpu_fault(err)
    assert (found[0] if found else None) == kind


# --- GPU faults in a real worker ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("faults"), prefix="faults") as ctx:
        yield ctx


def _fault(err: Exception):
    def decode(*args, **kwargs):  # stands in for the vocoder hitting the fault on the GPU
        raise err
    return decode


@pytest.mark.parametrize("err, expected", [
    (torch.cuda.OutOfMemoryError(OOM_TEXT), "The GPU ran out of memory during this job; this worker will be replaced."),
    (torch.AcceleratorError(ILLEGAL_ACCESS),
     "The GPU failed (AcceleratorError) during this job; this worker will be replaced."),
    (RuntimeError("CUDA error: device-side assert triggered"),
     "The GPU failed (RuntimeError) during this job; this worker will be replaced."),
])
def test_gpu_fault_in_a_job_asks_for_a_new_worker(ctx, monkeypatch, err, expected):
    monkeypatch.setattr(ctx.worker.engine.vocoder, "decode", _fault(err))
    keys = ctx.keys()
    job_id = f"gpu-{uuid.uuid4().hex[:8]}"
    result = asyncio.run(ctx.handler({"id": job_id, "input": tts(seed=1)}))
    assert result == {"error": expected, "refresh_worker": True}
    assert ctx.keys() == keys and ctx.tmp_files() == []
    assert '"status": "error"' in ctx.get_text(f"logs/{job_id}.json")
    assert asyncio.run(run_job(ctx.handler, {"id": job_id, "input": tts(seed=1)})) == {"error": expected,
                                                                                       "stopPod": True}


def test_fault_wrapped_by_the_transcriber_still_asks_for_a_new_worker(ctx, monkeypatch, tmp_path):
    """Whisper is loaded when a voice without a transcript is first used; the transcriber wraps a
    load failure in a StorageError sentence, with the CUDA error as its cause."""
    import transformers

    def pipeline(*args, **kwargs):  # stands in for Whisper's weights not fitting on the GPU
        raise torch.cuda.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(transformers, "pipeline", pipeline)
    monkeypatch.setattr(ctx.worker.transcriber, "_pipe", None)
    name = f"untranscribed-{uuid.uuid4().hex[:8]}.wav"
    clip = tmp_path / name
    sf.write(str(clip), speechlike(2.0, seed=4), SR, subtype="PCM_16")
    ctx.worker.storage.upload_file(f"voices/{name}", clip, "audio/wav")
    result = asyncio.run(ctx.handler({"id": f"w-{uuid.uuid4().hex[:8]}", "input": tts(local_voice=name)}))
    assert result == {"error": "The GPU ran out of memory during this job; this worker will be replaced.",
                      "refresh_worker": True}
    assert ctx.tmp_files() == []


def test_other_failures_do_not_replace_the_worker(ctx, monkeypatch):
    monkeypatch.setattr(ctx.worker.engine.vocoder, "decode", _fault(RuntimeError("shape mismatch")))
    job_id = f"bug-{uuid.uuid4().hex[:8]}"
    result = asyncio.run(ctx.handler({"id": job_id, "input": tts()}))
    assert result == {"error": f"Internal error (RuntimeError); the worker log has details for job {job_id}."}
    monkeypatch.undo()
    assert asyncio.run(ctx.handler({"id": job_id, "input": tts(nfe_step="4")})) == {
        "error": "'nfe_step' must be an integer."}
    result = asyncio.run(ctx.handler({"id": job_id, "input": tts(seed=2)}))
    assert "error" not in result and "refresh_worker" not in result, result


def test_an_unexpected_faults_message_stays_out_of_the_log(ctx, monkeypatch, caplog):
    """A library's message may quote what it was handed (webvtt-py quoted a job's text): the log
    says where the fault was raised and its type, never its message."""
    secret = "Meet me at the old pier at nine"
    monkeypatch.setattr(ctx.worker.engine.vocoder, "decode", _fault(ValueError(f"cannot read {secret!r}")))
    job_id = f"quoting-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.DEBUG):
        result = asyncio.run(ctx.handler({"id": job_id, "input": tts(text=secret + ".")}))
    assert result == {"error": f"Internal error (ValueError); the worker log has details for job {job_id}."}
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert f"job {job_id} (tts) failed unexpectedly" in logged and "builtins.ValueError (message withheld" in logged
    assert 'in decode' in logged  # where it was raised
    assert secret not in logged and not any(record.exc_info for record in caplog.records)


def test_a_bucket_that_does_not_exist_is_a_start_error_and_is_never_created(tiny_models, s3_env, tmp_path):
    """SeaweedFS creates a bucket on a write, as some MinIO setups do: a mistyped S3_BUCKET used to
    be created by the first job's log record, and the next job succeeded into it."""
    import uuid

    missing = f"zz-missing-{uuid.uuid4().hex[:12]}"
    env = {**tiny_models, **s3_env, "S3_BUCKET": missing, "RUNPOD_VOLUME_PATH": str(tmp_path / "vol")}
    worker, error, _ = start_worker(Settings.from_env(env))
    assert worker is None and f"S3 bucket '{missing}' does not exist" in str(error)
    handler = make_handler(worker, error)
    for job_input in (tts(), {"text": ""}):  # a good job and a bad one: neither writes
        result = asyncio.run(handler({"id": "j1", "input": job_input}))
        assert result["refresh_worker"] is True and f"S3 bucket '{missing}' does not exist" in result["error"]
    buckets = {b["Name"] for b in s3_env.server.client().list_buckets()["Buckets"]}
    assert missing not in buckets and s3_env.bucket in buckets


@pytest.mark.parametrize("setting, expected", [
    ("local root a file", "F5_LOCAL_STORAGE_DIR ({root}) cannot hold voices and outputs: {root} is a file"),
    ("local root under a file", "F5_LOCAL_STORAGE_DIR ({root}/sub) cannot hold voices and outputs: {root} is a file"),
    ("bucket name", "S3_BUCKET is not a bucket name S3 allows"),
    ("device", "F5_DEVICE is cuda:3, but this machine has"),
])
def test_unusable_storage_or_device_is_a_start_error_before_the_models_load(tiny_models, tmp_path, setting,
                                                                            expected):
    """Each started, then failed every job ('File exists', 'ParamValidationError', or 'could not
    load its models (SafetensorError)'). The checkpoint here is corrupt: the sentence being about
    the setting shows the setting was checked before the models were read."""
    root = tmp_path / "storage-file"
    root.write_text("not a folder")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    env = {**tiny_models, "F5_CKPT_FILE": str(bad), "RUNPOD_VOLUME_PATH": str(tmp_path / "vol"),
           "F5_LOCAL_STORAGE_DIR": str(root)}
    if setting == "local root under a file":
        env["F5_LOCAL_STORAGE_DIR"] = str(root / "sub")
    elif setting == "bucket name":
        env.update({"S3_BUCKET": "Bad_Bucket!", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example-secret"})
    elif setting == "device":
        env.update({"F5_DEVICE": "cuda:3", "F5_LOCAL_STORAGE_DIR": str(tmp_path / "store")})
    worker, error, _ = start_worker(Settings.from_env(env))
    assert worker is None and str(error).startswith(expected.format(root=root)), error
    result = asyncio.run(make_handler(worker, error)({"id": "j1", "input": tts()}))
    assert result["refresh_worker"] is True and expected.format(root=root)[:12] in result["error"]
