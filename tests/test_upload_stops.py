"""A multipart upload (a long job's output) stops between parts when asked, and leaves no part.

On the real S3 server (SeaweedFS over HTTPS on loopback), three ways an upload is asked to stop:
its caller's stop event (what the guard sets at a job's deadline), the job's deadline through
``JobGuard`` itself, and SIGTERM to a process whose upload is under way (``os._exit`` ends it, so
the abort has to happen before). The server on loopback answers a part in milliseconds, so a
slow link is stood in for by a hook that sleeps before each part's request (the one thing here
that is not the real part: the server cannot be made slow).
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from botocore.awsrequest import AWSResponse
from botocore.exceptions import EndpointConnectionError

from f5worker.errors import StorageError, WriteStopped
from f5worker.jobs.guard import COMMITTING, JobGuard, JobStopped
from s3_utils import KeyNotFound, S3Storage
from tests.processes import REPO, clean_env

PART_BYTES = 5 * 2**20  # S3's smallest part
PARTS = 6
PART_DELAY_S = 0.6


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "chapter.wav"
    path.write_bytes(np.random.default_rng(1).bytes(PARTS * PART_BYTES - 1000))
    return path


def slow_parts(storage: S3Storage, sent: list[int], delay_s: float = PART_DELAY_S) -> None:
    """Each part's request waits ``delay_s`` first (a slow link's stand-in); ``sent`` records them."""
    def before_part(params, **_):
        sent.append(params["PartNumber"])
        time.sleep(delay_s)

    storage.client.meta.events.register("before-parameter-build.s3.UploadPart", before_part)


def assert_nothing_left(s3_env, key: str) -> None:
    client = s3_env.server.client()
    assert not client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
    with pytest.raises(KeyNotFound):
        S3Storage(s3_env.settings).head(key)


def storage_for(s3_env) -> S3Storage:
    storage = S3Storage(s3_env.settings)
    storage.part_bytes = PART_BYTES
    storage.check_exists()
    return storage


def test_a_stop_event_aborts_the_upload_before_its_next_part(s3_env, big_file):
    storage, sent, stop = storage_for(s3_env), [], threading.Event()

    def stop_after_two(params, **_):
        if params["PartNumber"] == 2:
            stop.set()  # asked while part 2 is on its way: part 2 is sent, part 3 is not

    storage.client.meta.events.register("before-parameter-build.s3.UploadPart", stop_after_two)
    slow_parts(storage, sent, 0.0)
    with pytest.raises(WriteStopped, match=r"^the upload was stopped after 2 part\(s\) and aborted, so nothing "
                                           r"was stored \(put output/stopped\.wav\)$"):
        storage.upload_file("output/stopped.wav", big_file, "audio/wav", stop=stop)
    assert sent == [1, 2]
    assert_nothing_left(s3_env, "output/stopped.wav")


def test_a_deadline_during_a_multipart_upload_is_answered_after_one_part(s3_env, big_file, tmp_path):
    """The guard waits for a committing job (never an error over a change made), but a multipart
    upload makes no change until it completes, so at the deadline it is stopped before its next
    part and aborted: the wait is one part, not all of them (it was parts x the call bound)."""
    storage, sent = storage_for(s3_env), []
    slow_parts(storage, sent)
    guard = JobGuard(1.0, tmp_path, committing=COMMITTING.get, on_stop=storage.abort_uploads)

    async def committing_job():  # as Worker._store commits a job's output
        stop = COMMITTING.setdefault(asyncio.current_task(), threading.Event())
        await asyncio.to_thread(storage.upload_file, "output/late.wav", big_file, "audio/wav", stop=stop)
        return {"ok": True}

    async def run():
        started = time.monotonic()
        with pytest.raises(JobStopped, match=r"^The job did not finish within 1 s: its output was still being "
                                             r"uploaded, and the upload was aborted, so nothing was stored\.$"):
            await guard.run("late", committing_job())
        return time.monotonic() - started

    waited = asyncio.run(run())
    assert len(sent) <= 3 and waited < 1.0 + 2 * PART_DELAY_S + 1.0, (sent, waited)
    assert_nothing_left(s3_env, "output/late.wav")


def test_a_job_cancelled_during_its_multipart_upload_stores_nothing(s3_env, big_file, tmp_path):
    """runpod's cancel (``JobScaler.stop_job``, also RunPod's execution timeout) and an HTTP client
    gone cancel the guard's task: the upload in its thread used to go on part after part and store
    the output of a job its caller had cancelled. It now stops before its next part, aborted."""
    storage, sent = storage_for(s3_env), []
    slow_parts(storage, sent)
    guard = JobGuard(600.0, tmp_path, committing=COMMITTING.get, on_stop=storage.abort_uploads)
    uploaded = threading.Event()

    async def committing_job():
        stop = COMMITTING.setdefault(asyncio.current_task(), threading.Event())
        try:
            await asyncio.to_thread(storage.upload_file, "output/cancelled.wav", big_file, "audio/wav", stop=stop)
        finally:
            uploaded.set()
        return {"ok": True}

    async def run():
        task = asyncio.ensure_future(guard.run("cancelled", committing_job()))
        while not sent:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(uploaded.wait, 2 * PART_DELAY_S + 5)

    asyncio.run(run())
    assert uploaded.is_set() and len(sent) <= 2, sent
    assert_nothing_left(s3_env, "output/cancelled.wav")


def refuse_aborts(storage: S3Storage) -> None:
    """Each AbortMultipartUpload fails before it is sent (the stand-in for an endpoint that fails
    the abort too: the real server cannot be made to refuse one)."""
    def refuse(**_):
        raise EndpointConnectionError(endpoint_url="https://127.0.0.1")

    storage.client.meta.events.register("before-parameter-build.s3.AbortMultipartUpload", refuse)


def open_uploads(s3_env) -> list[dict]:
    return s3_env.server.client().list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", [])


def test_a_stopped_upload_whose_abort_fails_says_its_parts_stay(s3_env, big_file, tmp_path):
    """The stop said 'aborted, so nothing was stored' before the abort ran, and a failed abort
    was only logged: the caller was told nothing stayed while two parts stayed billed."""
    storage, sent = storage_for(s3_env), []
    slow_parts(storage, sent)
    refuse_aborts(storage)
    guard = JobGuard(1.0, tmp_path, committing=COMMITTING.get, on_stop=storage.abort_uploads)

    async def committing_job():
        stop = COMMITTING.setdefault(asyncio.current_task(), threading.Event())
        await asyncio.to_thread(storage.upload_file, "output/kept.wav", big_file, "audio/wav", stop=stop)

    with pytest.raises(JobStopped, match=r"^The job did not finish within 1 s: its output was still being "
                                         r"uploaded, and the upload was stopped, but aborting it failed, so its "
                                         r"parts stay stored until the bucket's rule for incomplete multipart "
                                         r"uploads removes them\.$") as stopped:
        asyncio.run(guard.run("kept", committing_job()))
    assert isinstance(stopped.value.__cause__, WriteStopped) and not stopped.value.__cause__.undone
    assert "but its abort failed" in str(stopped.value.__cause__)
    left = open_uploads(s3_env)
    assert [u["Key"] for u in left] == ["output/kept.wav"]
    s3_env.server.client().abort_multipart_upload(Bucket=s3_env.bucket, Key="output/kept.wav",
                                                  UploadId=left[0]["UploadId"])


def test_a_stop_asked_during_the_last_part_lets_the_upload_complete(s3_env, big_file):
    """Stopped only before a part: an upload whose last part is on its way when the deadline
    passes completes (one call more, and the job's output is stored rather than thrown away)."""
    storage, sent, stop = storage_for(s3_env), [], threading.Event()

    def stop_at_the_last_part(params, **_):
        if params["PartNumber"] == PARTS:
            stop.set()

    storage.client.meta.events.register("before-parameter-build.s3.UploadPart", stop_at_the_last_part)
    slow_parts(storage, sent, 0.0)
    storage.upload_file("output/done.wav", big_file, "audio/wav", stop=stop)
    assert sent == list(range(1, PARTS + 1))
    assert S3Storage(s3_env.settings).head("output/done.wav").size == big_file.stat().st_size


CHILD = textwrap.dedent("""
    import asyncio, logging, signal, sys, threading, time
    from pathlib import Path
    from f5worker.jobs.guard import COMMITTING, JobGuard
    from f5worker.settings import Settings
    from s3_utils import S3Storage
    from tests.test_upload_stops import PART_BYTES, slow_parts

    logging.basicConfig(level=logging.INFO)
    storage = S3Storage(Settings.from_env(__import__("os").environ))
    storage.part_bytes = PART_BYTES
    storage.check_exists()
    sent = []
    slow_parts(storage, sent)
    guard = JobGuard(0, Path(sys.argv[2]), grace_s=0.5, exit_after_s=1.0, committing=COMMITTING.get,
                     on_stop=storage.abort_uploads)

    async def job():
        stop = COMMITTING.setdefault(asyncio.current_task(), threading.Event())
        await asyncio.to_thread(storage.upload_file, "output/sigterm.wav", sys.argv[1], "audio/wav", stop=stop)

    async def main():
        signal.signal(signal.SIGTERM, lambda *a: None)  # stands in for runpod's handler
        guard.watch_sigterm()
        task = asyncio.ensure_future(guard.run("j", job()))
        while len(sent) < 2:
            await asyncio.sleep(0.05)
        print("uploading", flush=True)
        try:
            await task
        except Exception as err:
            print("answered:", err, flush=True)
        await asyncio.sleep(30)  # the guard's os._exit ends the process first

    asyncio.run(main())
""")


def test_sigterm_during_a_multipart_upload_aborts_it(s3_env, big_file, tmp_path):
    """The guard ends the process with os._exit, past any thread; the upload's parts used to stay
    stored (and billed) since its abort never ran. Now the open uploads are aborted first."""
    env = clean_env({**s3_env, "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(big_file), str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "uploading", proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    # the part in flight failed for the abort: said as the stop it was, not as a storage fault (NoSuchUpload)
    assert ("answered: The worker shut down while the job's output was being uploaded, and the upload was aborted, "
            "so nothing was stored; send it again.") in output, output
    assert_nothing_left(s3_env, "output/sigterm.wav")
    assert "could not abort" not in output, output


def test_abort_uploads_aborts_an_upload_blocked_in_a_part(s3_env, big_file):
    """The exit's own abort: an upload whose thread is inside a part call (the stop cannot reach
    it there) is aborted from outside, and its thread, when the call returns, stops."""
    storage, sent = storage_for(s3_env), []
    slow_parts(storage, sent, 1.0)
    failure: list[BaseException] = []

    def upload():
        try:
            storage.upload_file("output/blocked.wav", big_file, "audio/wav")
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            failure.append(err)

    thread = threading.Thread(target=upload)
    thread.start()
    while not sent:
        time.sleep(0.02)
    storage.abort_uploads()
    assert not s3_env.server.client().list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
    thread.join(10)
    assert not thread.is_alive() and failure and len(sent) == 1, (sent, failure)
    assert_nothing_left(s3_env, "output/blocked.wav")



class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


NO_SUCH_UPLOAD = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchUpload</Code><Message>The '
                  b'specified upload does not exist.</Message></Error>')


def lost_first_answer(storage: S3Storage, answers: list) -> None:
    """CompleteMultipartUpload's first answer is treated as lost (botocore retries at once, as
    after a read timeout) and the retry is answered NoSuchUpload, as AWS S3 answers a repeated
    completion. Both are injected: a lost answer cannot be caused on loopback, and SeaweedFS
    answers a repeated completion with success."""
    def needs_retry(response, attempts, **_):
        answers.append(response[1]["ResponseMetadata"]["HTTPStatusCode"] if response else None)
        return 0 if attempts == 1 else None

    def retry_meets_no_upload(request, **_):
        if answers:  # the retry: the server's "already complete" answer
            return AWSResponse(request.url, 404, {"Content-Type": "application/xml"}, _Body(NO_SUCH_UPLOAD))
        return None

    storage.client.meta.events.register("needs-retry.s3.CompleteMultipartUpload", needs_retry)
    storage.client.meta.events.register("before-send.s3.CompleteMultipartUpload", retry_meets_no_upload)


def test_a_completed_upload_whose_answer_was_lost_is_not_a_failure(s3_env, big_file):
    """The object is there, written by this upload (its token in the metadata, its size): the job
    used to fail with a storage error although its output had been stored."""
    storage, answers = storage_for(s3_env), []
    lost_first_answer(storage, answers)
    storage.upload_file("output/lost.wav", big_file, "audio/wav")
    assert answers[0] == 200 and len(answers) == 2
    client = s3_env.server.client()
    assert client.get_object(Bucket=s3_env.bucket, Key="output/lost.wav")["Body"].read() == big_file.read_bytes()
    assert not client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")


def test_the_token_is_read_whatever_case_the_server_gives_metadata_names(s3_env, big_file):
    """MinIO answers user metadata in Go's header case (X-Amz-Meta-F5-Upload), which botocore
    keeps: the token was looked up as 'f5-upload' only, and the stored output failed its job.
    The HeadObject headers are re-cased before botocore parses them (SeaweedFS sends lower case)."""
    storage, answers = storage_for(s3_env), []
    lost_first_answer(storage, answers)

    def go_case(response_dict, **_):
        response_dict["headers"] = {(name.title() if name.lower().startswith("x-amz-meta-") else name): value
                                    for name, value in response_dict["headers"].items()}

    names = []
    storage.client.meta.events.register("before-parse.s3.HeadObject", go_case)
    storage.client.meta.events.register("after-call.s3.HeadObject",
                                        lambda parsed, **_: names.extend(parsed.get("Metadata", {})))
    storage.upload_file("output/recased.wav", big_file, "audio/wav")
    assert len(answers) == 2 and names == ["F5-Upload"]  # the check was asked, and read Go's case
    assert s3_env.server.client().head_object(Bucket=s3_env.bucket, Key="output/recased.wav")["ContentLength"] == \
        big_file.stat().st_size


def test_no_such_upload_over_another_object_is_still_a_failure(s3_env, big_file, tmp_path):
    """NoSuchUpload where the object is not this upload's (an older one of that key; the upload
    was aborted by a lifecycle rule meanwhile) is not taken for success."""
    storage, answers = storage_for(s3_env), []
    storage.upload_file("output/other.wav", big_file, "audio/wav")  # the older object, multipart too
    lost_first_answer(storage, answers)

    def first_try_is_not_sent(request, **_):  # nothing completes: the upload is gone
        if not answers:
            return AWSResponse(request.url, 404, {"Content-Type": "application/xml"}, _Body(NO_SUCH_UPLOAD))
        return None

    storage.client.meta.events.register_first("before-send.s3.CompleteMultipartUpload", first_try_is_not_sent)
    newer = tmp_path / "newer.wav"
    newer.write_bytes(big_file.read_bytes()[::-1])
    with pytest.raises(StorageError, match=r"^S3 request failed: .*\(put output/other\.wav\)$"):
        storage.upload_file("output/other.wav", newer, "audio/wav")
    client = s3_env.server.client()
    assert client.get_object(Bucket=s3_env.bucket, Key="output/other.wav")["Body"].read() == big_file.read_bytes()


def test_an_upload_whose_storage_went_away_is_aborted_once_it_is_back(tmp_path, monkeypatch):
    """S3 stops during a multipart upload (the real server, stopped): the part fails and so does
    the abort. The sentence had said only 'Could not connect', and the upload was forgotten, its
    parts stored until a lifecycle rule. Now it says the parts stay, and the worker's next
    multipart upload (or its exit) aborts them once the storage is back."""
    from tests.fixtures_faults import restartable_s3
    from tests.fixtures_s3 import make_s3_env
    from f5worker.settings import Settings

    big = tmp_path / "chapter.wav"
    big.write_bytes(np.random.default_rng(2).bytes(4 * PART_BYTES))
    with restartable_s3(tmp_path / "weed") as s3:
        env = make_s3_env(s3.server, monkeypatch, tmp_path, prefix="gone")
        settings = Settings.from_env({**env, "S3_CONNECT_TIMEOUT_SECONDS": "1", "S3_READ_TIMEOUT_SECONDS": "2",
                                      "S3_MAX_ATTEMPTS": "1"})
        storage = S3Storage(settings)
        storage.part_bytes = PART_BYTES
        storage.check_exists()

        def storage_goes_away(params, **_):
            if params["PartNumber"] == 3:
                s3.stop()

        storage.client.meta.events.register("before-parameter-build.s3.UploadPart", storage_goes_away)
        with pytest.raises(StorageError, match=r"\); its upload could not be aborted either, so the parts sent stay "
                                               r"stored until a later upload of this worker or its exit aborts them"):
            storage.upload_file("output/gone.wav", big, "audio/wav")
        storage.client.meta.events.unregister("before-parameter-build.s3.UploadPart", storage_goes_away)
        s3.start()
        s3.wait_writable(env.bucket)
        client = s3.server.client()
        assert [u["Key"] for u in client.list_multipart_uploads(Bucket=env.bucket).get("Uploads", [])] == [
            "output/gone.wav"]
        storage.upload_file("output/next.wav", big, "audio/wav")  # the next job's output
        assert client.list_multipart_uploads(Bucket=env.bucket).get("Uploads", []) == []
        assert client.head_object(Bucket=env.bucket, Key="output/next.wav")["ContentLength"] == 4 * PART_BYTES
