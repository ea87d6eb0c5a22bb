"""The fault matrix: real faults under real jobs, counted into tests/RELIABILITY.md.

Why this test exists: what a job does when what it depends on fails must be measured rather
than asserted case by case: the S3 server stopped mid-job and restarted, an endpoint that never
answers, 503s, bad credentials, a full temp folder and a full volume (a real tmpfs), concurrent
uploads of one voice name, texts that cannot be split batched with ordinary jobs, voice sidecars
that are not UTF-8, a bucket that does not exist on a server that creates buckets on a write, jobs
past the planning bounds, settings at and past their limits, and the gate against an endpoint that
trickles. Every job is
judged the same way: a success must have its output in storage and as reported (else it is a false
success), a failure must be one sentence without a secret, and no job may leave a file behind.
Each scenario adds one row to the matrix; the table is written when the module ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import soundfile as sf

from f5worker import validation
from f5worker.jobs.audio import embedded_transcript
from f5worker.service import make_handler, start_worker
from f5worker.settings import (ENV_ALLOW_PRIVATE_URLS, ENV_AWS_ENDPOINT_URL, ENV_AWS_SECRET_ACCESS_KEY,
                               ENV_DEVICE, ENV_JOB_TIMEOUT, ENV_LOCAL_STORAGE_DIR, ENV_S3_BUCKET,
                               ENV_S3_CONNECT_TIMEOUT, ENV_S3_MAX_ATTEMPTS, ENV_S3_READ_TIMEOUT, ENV_TMP_DIR,
                               ENV_VOLUME_PATH, Settings)
from s3_utils import call_bound_s
from tests.fixtures_faults import dripping_endpoint, fault_proxy, fill, hung_endpoint, restartable_s3, small_tmpfs
from tests.fixtures_models import SR, speechlike
from tests.fixtures_s3 import make_s3_env
from tests.fixtures_worker import Ctx, worker_ctx
from tests.processes import worker_env
from tests.reliability_report import provenance, sentence_problems, table, whole_run, write_section
from tests.helpers import SETTING_LIMITS

pytestmark = pytest.mark.usefixtures("loopback_only")

COMMAND = "pytest tests/test_reliability_faults.py"
BUILTIN = "basic_ref_en.wav"
NFE = 2
QUICK_S3 = {ENV_S3_CONNECT_TIMEOUT: "1", ENV_S3_READ_TIMEOUT: "2", ENV_S3_MAX_ATTEMPTS: "2"}
ROUNDS = 30  # concurrent-upload rounds per storage
UPLOADS_PER_ROUND = 4
LONG_TEXTS = {"2000 CJK characters": "你" * 2000, "400 Thai characters": "สวัสดีครับ" * 40, "'a' x 1000": "a" * 1000}


# --- the matrix ---------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    storage: str
    jobs: int = 0
    faults: int = 0  # faults injected (requests failed, stops, ...)
    ok: int = 0
    refused: int = 0
    false_successes: int = 0
    files_left: int = 0
    slowest: float = 0.0  # seconds, the slowest job
    problems: list[str] = field(default_factory=list)
    finished: bool = False  # False: the scenario stopped early (its test failed or errored)

    def cells(self) -> list[object]:
        problems = sorted(set(self.problems)) + ([] if self.finished else ["did not finish (see the test's failure)"])
        return [self.scenario, self.storage, self.jobs, self.faults, self.ok, self.refused, self.false_successes,
                self.files_left, f"{self.slowest:.1f}", "; ".join(problems) or "none"]

    def assert_clean(self) -> None:
        self.finished = True
        assert self.false_successes == 0 and self.files_left == 0 and not self.problems, self.cells()


@pytest.fixture(scope="module")
def matrix(request):
    rows: list[Row] = []
    yield rows
    if not whole_run(request.config) or len(rows) < sum(1 for item in request.session.items
                                                         if item.module is request.module):
        return  # a selection of scenarios, or a run cut short: the recorded table stays the last whole one
    headers = ["scenario", "storage", "jobs", "faults injected", "ok", "refused (one sentence)", "false successes",
               "files left", "slowest job (s)", "other problems"]
    totals = ["**all**", "", *(sum(getattr(r, f) for r in rows) for f in
                               ("jobs", "faults", "ok", "refused", "false_successes", "files_left")),
              f"{max((r.slowest for r in rows), default=0):.1f}", f"{sum(bool(r.problems) or not r.finished for r in rows)} rows"]
    write_section("faults", "\n\n".join([
        "## Fault matrix: real faults under real jobs",
        provenance(COMMAND),
        "False successes (a job reporting success whose output is missing or not as reported) and files left "
        "(in the temp folder, or half-written in local storage) must both be 0. S3 is SeaweedFS over HTTPS on "
        "127.0.0.1; faults are real (a stopped process, a socket that never answers, a proxy answering 503, a "
        "tmpfs that fills up).",
        table(headers, [r.cells() for r in rows] + [totals]),
    ]))


# --- running and judging jobs ---------------------------------------------------------------------------
def tts(text="A short sentence for the fault matrix.", voice=BUILTIN, **kw) -> dict:
    return {"text": text, "local_voice": voice, "nfe_step": NFE, "seed": 1, **kw}


def upload(url: str, name: str, ref_text: str = "Words the speaker says.") -> dict:
    return {"endpoint": "upload", "voice_file_url": url, "voice_name": name, "ref_text": ref_text}


async def _timed(ctx: Ctx, job_id: str, job: dict) -> tuple[dict, float]:
    started = time.monotonic()
    result = await ctx.handler({"id": job_id, "input": job})
    return result, time.monotonic() - started


async def _all(ctx: Ctx, jobs: list[tuple[str, dict]]) -> list[tuple[dict, float]]:
    return list(await asyncio.gather(*(_timed(ctx, job_id, job) for job_id, job in jobs)))


def run_on_a_loop(coro):
    """``coro`` on a fresh event loop, closed as runpod's long-lived one would leave it: tasks
    cancelled, but threads a job's deadline abandoned are not waited for (``asyncio.run`` would)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run_jobs(ctx: Ctx, row: Row, jobs: list[dict]) -> list[tuple[str, dict, dict]]:
    """Run ``jobs`` concurrently, as one worker would; (job id, input, result) each. The slowest
    job's seconds go to ``row.slowest``."""
    with_ids = [(f"f-{uuid.uuid4().hex[:12]}", job) for job in jobs]
    timed = run_on_a_loop(_all(ctx, with_ids))
    row.slowest = max([row.slowest] + [seconds for _, seconds in timed])
    return [(job_id, job, result) for (job_id, job), (result, _) in zip(with_ids, timed)]


def wav_seconds(data: bytes | None) -> float | None:
    if not data:
        return None
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        return None
    return info.frames / info.samplerate


def judge(row: Row, ctx: Ctx, outcomes, secrets_: tuple[str, ...] = (), expect_ok: bool = False,
          filler: Path | None = None, racing: bool = False) -> None:
    """Count each outcome into ``row``; check files left in the temp folder and local storage.
    ``racing``: the uploads wrote one name at once, so only the winner's voice can be checked (by
    the caller), not each upload's."""
    for _job_id, job, result in outcomes:
        row.jobs += 1
        if not isinstance(result, dict):
            row.problems.append(f"result is {type(result).__name__}")
            continue
        if "error" in result:
            row.refused += 1
            row.problems += sentence_problems(result["error"], set(secrets_))
            if expect_ok:
                row.problems.append(f"failed: {result['error']}")
            continue
        row.ok += 1
        if racing:
            continue
        if "output_key" in result:
            seconds = wav_seconds(ctx.get_bytes(result["output_key"]))
            good = seconds is not None and abs(seconds - result["duration"]) <= 1 / 24000 + 0.0005
        else:
            data = ctx.get_bytes(result.get("voice_key", ""))
            good = wav_seconds(data) is not None and embedded_transcript(data) == job.get("ref_text")
        row.false_successes += not good
    row.files_left += len([n for n in ctx.tmp_files() if filler is None or n != filler.name])
    root = ctx.settings.local_storage_dir
    if ctx.s3 is None and root.exists():
        row.files_left += sum(1 for p in root.rglob(".*") if p.is_file())  # atomic-write leftovers


def bucket_keys(ctx: Ctx) -> set[str]:
    return ctx.keys(prefixes=("voices/", "output/"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Reference clips of distinct lengths (1.5 s, 2.0 s, ...), so a stored voice tells which upload it was."""
    folder = tmp_path_factory.mktemp("fault-clips")
    for k in range(UPLOADS_PER_ROUND):
        sf.write(str(folder / f"clip{k}.wav"), speechlike(1.5 + 0.5 * k, seed=k), SR, subtype="PCM_16")
    return folder


@pytest.fixture
def served(file_server, clips):
    for path in clips.iterdir():
        (file_server.root / path.name).write_bytes(path.read_bytes())
    return file_server


# --- S3 stopped mid-job, then restarted -------------------------------------------------------------------
def _stop_during_synthesis(ctx: Ctx, row: Row, s3, restart_at_once: bool) -> tuple[list, bool]:
    """Start a job whose synthesis takes a second or more, stop the S3 server once the model is
    running, optionally start it again at once; returns the outcome and whether the stop came in time."""
    calls_before = len(ctx.worker.batcher.calls)
    job = tts("Several sentences that keep the model busy for a while. " * 8, "stopped.wav", nfe_step=6)
    job_id = f"f-{uuid.uuid4().hex[:12]}"
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_on_a_loop(_timed(ctx, job_id, job))))
    thread.start()
    deadline = time.monotonic() + 30
    while len(ctx.worker.batcher.calls) == calls_before and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    in_time = thread.is_alive()
    s3.stop()
    if restart_at_once:
        s3.start()
    thread.join(timeout=120)
    if not restart_at_once:
        s3.start()
    s3.wait_writable(ctx.s3.bucket)
    result, seconds = box.get("result", (None, 0.0))
    row.slowest = max(row.slowest, seconds)
    return [(job_id, job, result)], in_time


def test_s3_stopped_mid_job_and_restarted(matrix, tiny_models, tiny_whisper, tmp_path, served):
    row = Row("S3 server stopped mid-job, then restarted", "S3")
    matrix.append(row)
    with restartable_s3(tmp_path / "weed") as s3, \
            worker_ctx(tiny_models, tiny_whisper, tmp_path, s3.server, prefix="stop", extra=QUICK_S3) as ctx:
        judge(row, ctx, run_jobs(ctx, row, [upload(served.url("clip1.wav"), "stopped.wav")]), expect_ok=True)
        for restart_at_once in (False, True):
            outcome, in_time = _stop_during_synthesis(ctx, row, s3, restart_at_once)
            row.faults += in_time
            judge(row, ctx, outcome, (s3.server.secret_key,))
        s3.stop()  # jobs while it is down: a sentence each, nothing half-stored
        row.faults += 1
        judge(row, ctx, run_jobs(ctx, row, [tts(voice="stopped.wav"), upload(served.url("clip2.wav"), "stopped.wav")]),
              (s3.server.secret_key,))
        s3.start()
        s3.wait_writable(ctx.s3.bucket)
        # back up: the same worker serves again, and the voice is the first upload, whole
        judge(row, ctx, run_jobs(ctx, row, [tts(voice="stopped.wav"), upload(served.url("clip3.wav"), "fresh.wav")]),
              expect_ok=True)
        data = ctx.get_bytes("voices/stopped.wav")
        if embedded_transcript(data) != "Words the speaker says." or wav_seconds(data) is None:
            row.problems.append("the stored voice was damaged by a failed upload")
    row.assert_clean()


# --- an endpoint that never answers -----------------------------------------------------------------------
def test_s3_endpoint_that_never_answers(matrix, tiny_models, tiny_whisper, tmp_path, s3_server, served):
    """Each job is answered by its deadline, except one whose final write had begun: that one is
    seen through, which the S3 timeouts bound (f5worker.jobs.guard.JobGuard)."""
    row = Row("S3 endpoint hung (3 s job deadline, short S3 timeouts)", "S3")
    matrix.append(row)
    with hung_endpoint() as url:
        extra = {ENV_AWS_ENDPOINT_URL: url, **QUICK_S3, ENV_JOB_TIMEOUT: "3"}
        with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="hung", extra=extra) as ctx:
            limit = ctx.settings.job_timeout_s + call_bound_s(ctx.settings) + 5
            jobs = [tts(), tts(voice="someone.wav"), upload(served.url("clip0.wav"), "hung.wav")]
            outcomes = run_jobs(ctx, row, jobs)
            row.faults += len(jobs)
            judge(row, ctx, outcomes)
            if row.slowest > limit:
                row.problems.append(f"a job took {row.slowest:.0f} s (limit {limit:.0f} s)")
            if bucket_keys(ctx):
                row.problems.append("something was written")
    row.assert_clean()


# --- 503s -----------------------------------------------------------------------------------------------
PROXY_RULES = {
    "every request": lambda method, path: True,
    "PUT of outputs": lambda method, path: method == "PUT" and "/output/" in path,
    "PUT of voices": lambda method, path: method == "PUT" and "/voices/" in path,
    "GET of voices": lambda method, path: method in ("GET", "HEAD") and "/voices/" in path,
}


def first_tries_only():
    """A rule failing the first request of each method and path (botocore's retry then succeeds)."""
    seen: set[tuple[str, str]] = set()

    def rule(method: str, path: str) -> bool:
        first = (method, path) not in seen
        seen.add((method, path))
        return first
    return rule


@pytest.mark.parametrize("which", list(PROXY_RULES) + ["the first try of each request"])
def test_s3_answers_503(matrix, tiny_models, tiny_whisper, tmp_path, s3_server, served, which):
    row = Row(f"S3 answers 503 to {which}", "S3")
    matrix.append(row)
    rule = PROXY_RULES.get(which) or first_tries_only()
    fail = {"on": False}
    with fault_proxy(s3_server, lambda method, path: fail["on"] and rule(method, path)) as proxy, \
            worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="proxy",
                       extra={ENV_AWS_ENDPOINT_URL: proxy.url, **QUICK_S3}) as ctx:
        judge(row, ctx, run_jobs(ctx, row, [upload(served.url("clip1.wav"), "kept.wav", "The kept voice.")]),
              expect_ok=True)
        before = bucket_keys(ctx)
        kept = ctx.get_bytes("voices/kept.wav")
        fail["on"] = True
        outcomes = run_jobs(ctx, row, [tts(), tts(voice="kept.wav"), upload(served.url("clip2.wav"), "kept.wav", "New.")])
        fail["on"] = False
        row.faults += proxy.failed
        judge(row, ctx, outcomes, (s3_server.secret_key,), expect_ok=which not in PROXY_RULES)
        written = {key for _, _, r in outcomes if "error" not in r for key in (r.get("output_key"), r.get("voice_key"))}
        if bucket_keys(ctx) - before - written:
            row.problems.append("a failed job wrote to storage")
        replaced = any("error" not in r and r.get("voice_key") == "voices/kept.wav" for _, _, r in outcomes)
        if not replaced and ctx.get_bytes("voices/kept.wav") != kept:
            row.problems.append("a failed upload changed the stored voice")
    row.assert_clean()


# --- bad credentials ---------------------------------------------------------------------------------------
def test_s3_bad_credentials(matrix, tiny_models, tiny_whisper, tmp_path, s3_server, served):
    row = Row("S3 credentials wrong", "S3")
    matrix.append(row)
    wrong = "Wrong" + secrets.token_urlsafe(24)
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="creds",
                    extra={ENV_AWS_SECRET_ACCESS_KEY: wrong, **QUICK_S3}) as ctx:
        outcomes = run_jobs(ctx, row, [tts(), tts(voice="someone.wav"), upload(served.url("clip0.wav"), "creds.wav")])
        row.faults += len(outcomes)
        judge(row, ctx, outcomes, (wrong, s3_server.secret_key))
        if bucket_keys(ctx):
            row.problems.append("something was written")
    row.assert_clean()


# --- full disks ---------------------------------------------------------------------------------------------
def _mounted_or_skip(row: Row, folder: Path | None) -> Path:
    if folder is None:
        row.problems.append("not run: a tmpfs cannot be mounted here (needs root and CAP_SYS_ADMIN)")
        pytest.skip("a tmpfs cannot be mounted here")
    return folder


def test_full_temp_folder(matrix, tiny_models, tiny_whisper, tmp_path, served):
    row = Row("temp folder full (1 MiB tmpfs, filled)", "local")
    matrix.append(row)
    with small_tmpfs(tmp_path / "small-tmp") as mounted:
        tmp_dir = _mounted_or_skip(row, mounted)
        with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra={ENV_TMP_DIR: str(tmp_dir)}) as ctx:
            judge(row, ctx, run_jobs(ctx, row, [upload(served.url("clip1.wav"), "tmpfull.wav")]), expect_ok=True)
            filler = fill(tmp_dir, leave_bytes=16 * 1024)
            row.faults += 1
            keys = bucket_keys(ctx)
            outcomes = run_jobs(ctx, row, [tts(), tts(voice="tmpfull.wav"), upload(served.url("clip2.wav"), "tmpfull.wav")])
            judge(row, ctx, outcomes, filler=filler)
            if bucket_keys(ctx) != keys:
                row.problems.append("a failed job wrote to storage")
            filler.unlink()
            # an output larger than the whole tmpfs, with nothing else in it
            row.faults += 1
            judge(row, ctx, run_jobs(ctx, row, [tts("Long enough to fill a megabyte of audio output. " * 12, nfe_step=1,
                                               speed=0.5)]))
            judge(row, ctx, run_jobs(ctx, row, [tts(), tts(voice="tmpfull.wav")]), expect_ok=True)  # room again
    row.assert_clean()


def test_full_volume(matrix, tiny_models, tiny_whisper, tmp_path, served):
    row = Row("volume full (local storage on a 1 MiB tmpfs, filled)", "local")
    matrix.append(row)
    with small_tmpfs(tmp_path / "small-volume") as mounted:
        storage_dir = _mounted_or_skip(row, mounted)
        with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra={ENV_LOCAL_STORAGE_DIR: str(storage_dir)}) as ctx:
            judge(row, ctx, run_jobs(ctx, row, [upload(served.url("clip0.wav"), "volfull.wav", "The old words.")]),
                  expect_ok=True)
            kept = ctx.get_bytes("voices/volfull.wav")
            filler = fill(storage_dir, leave_bytes=16 * 1024)
            row.faults += 1
            keys = bucket_keys(ctx)
            outcomes = run_jobs(ctx, row, [tts(), tts(voice="volfull.wav"),
                                      upload(served.url("clip3.wav"), "volfull.wav", "The new words.")])
            judge(row, ctx, outcomes)
            if bucket_keys(ctx) != keys:
                row.problems.append("a failed job left a key in storage")
            if ctx.get_bytes("voices/volfull.wav") != kept:
                row.problems.append("a failed upload changed the stored voice")
            filler.unlink()
            judge(row, ctx, run_jobs(ctx, row, [tts(voice="volfull.wav")]), expect_ok=True)  # room again
    row.assert_clean()


# --- concurrent uploads of one name -----------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["local", "S3"])
def test_concurrent_uploads_of_one_name(matrix, tiny_models, tiny_whisper, tmp_path, request, served, storage):
    """Each round uploads clips of different lengths under one name at once; afterwards the stored
    voice's audio and transcript must come from the same upload, and a TTS job must use that transcript."""
    row = Row(f"{UPLOADS_PER_ROUND} concurrent uploads of one name, {ROUNDS} rounds", storage)
    matrix.append(row)
    s3_server = request.getfixturevalue("s3_server") if storage == "S3" else None
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="race") as ctx:
        for rnd in range(ROUNDS):
            jobs = [upload(served.url(f"clip{k}.wav"), "race.wav", f"Round {rnd} upload {k}.")
                    for k in range(UPLOADS_PER_ROUND)]
            judge(row, ctx, run_jobs(ctx, row, jobs), expect_ok=True, racing=True)
            data = ctx.get_bytes("voices/race.wav")
            seconds, words = wav_seconds(data), embedded_transcript(data or b"")
            which = round(((seconds or 0) - 1.5) / 0.5)
            if words != f"Round {rnd} upload {which}.":
                row.false_successes += 1
                row.problems.append("voice audio and transcript from different uploads")
        _, _, result = run_jobs(ctx, row, [tts(voice="race.wav")])[0]
        row.jobs += 1
        if result.get("ref_text_source") != "stored":
            row.problems.append(f"TTS after the race: {result}")
    row.assert_clean()


# --- long unsplittable text batched with ordinary jobs ------------------------------------------------------
def test_unsplittable_text_batched_with_ordinary_jobs(matrix, tiny_models, tiny_whisper, tmp_path):
    row = Row("long unsplittable texts (" + ", ".join(LONG_TEXTS) + ") batched with 4 ordinary jobs each", "local")
    matrix.append(row)
    with worker_ctx(tiny_models, tiny_whisper, tmp_path) as ctx:
        for text in LONG_TEXTS.values():
            ordinary = [tts(f"Ordinary job number {i}, said plainly.", seed=i) for i in range(4)]
            outcomes = run_jobs(ctx, row, [tts(text, nfe_step=1)] + ordinary)
            row.faults += 1
            judge(row, ctx, outcomes[:1])  # the long one: audio, or a sentence saying why not
            judge(row, ctx, outcomes[1:], expect_ok=True)  # the others must not suffer for it
    row.assert_clean()


# --- the second hostile pass's faults ------------------------------------------------------------------------
def count_answers(row: Row, outcomes, expect_ok: bool, secrets_: tuple[str, ...] = ()) -> None:
    """Count answers that store nothing (voice_info, list_voices, refusals): an error must be one
    clean sentence; with ``expect_ok`` a refusal is a problem, without it a success is a false one."""
    for _, _, result in outcomes:
        row.jobs += 1
        if "error" in result:
            row.refused += 1
            row.problems += sentence_problems(result["error"], set(secrets_))
            if expect_ok:
                row.problems.append(f"failed: {result['error']}")
        else:
            row.ok += 1
            row.false_successes += not expect_ok


def test_unreadable_voice_sidecars(matrix, tiny_models, tiny_whisper, tmp_path, s3_server, clips):
    """Hand-placed voices with a transcript in Latin-1 and a .json in UTF-16 used to fail
    voice_info, TTS and every listing page holding them ("Internal error (UnicodeDecodeError)")."""
    row = Row("hand-placed voices with sidecars not in UTF-8 (a Latin-1 .txt, a UTF-16 .json)", "S3")
    matrix.append(row)
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="sidecar") as ctx:
        client, bucket = ctx.s3.server.client(), ctx.s3.bucket
        for name, suffix, body in (("latin.wav", ".txt", b"Voil\xe0, caf\xe9"), ("utf16.wav", ".json", b"\xff\xfe{")):
            client.put_object(Bucket=bucket, Key=f"voices/{name}", Body=(clips / "clip2.wav").read_bytes())
            client.put_object(Bucket=bucket, Key=f"voices/{name}{suffix}", Body=body)
            row.faults += 1
        infos = [{"endpoint": "voice_info", "voice_name": n} for n in ("latin.wav", "utf16.wav")]
        count_answers(row, run_jobs(ctx, row, infos + [{"endpoint": "list_voices"}]), expect_ok=True)
        judge(row, ctx, run_jobs(ctx, row, [tts(voice="latin.wav"), tts(voice="utf16.wav", ref_text="Words.")]),
              expect_ok=True)
    row.assert_clean()


def test_a_bucket_that_does_not_exist(matrix, tiny_models, tiny_whisper, tmp_path, s3_server, served):
    """SeaweedFS creates a bucket on a write: a mistyped S3_BUCKET was created by job 1's record and
    job 2 then succeeded into it. Now it is a start error and nothing is written."""
    row = Row("S3_BUCKET names no bucket, on a server that creates buckets on a write", "S3")
    matrix.append(row)
    missing = f"zz-missing-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as mp:
        s3 = make_s3_env(s3_server, mp, tmp_path, prefix="nobucket")
        env = worker_env(tiny_models, tiny_whisper, tmp_path / "volume",
                         {**s3, ENV_S3_BUCKET: missing, ENV_ALLOW_PRIVATE_URLS: "true"})
        worker, error, _ = start_worker(Settings.from_env(env))
        handler = make_handler(worker, error)
        row.faults += 1
        jobs = [tts(), {"text": ""}, upload(served.url("clip0.wav"), "nobucket.wav")]
        outcomes = [(f"f-{k}", job, run_on_a_loop(handler({"id": f"f-{k}", "input": job}))) for k, job in enumerate(jobs)]
    count_answers(row, outcomes, expect_ok=False, secrets_=(s3_server.secret_key,))
    if missing in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}:
        row.problems.append("the bucket was created")
    row.files_left += len(list((tmp_path / "volume" / "jobtmp").iterdir()))
    row.assert_clean()


def test_jobs_past_the_planning_bounds(matrix, tiny_models, tiny_whisper, tmp_path, served):
    """A voice whose transcript is one letter planned 300 letters at speed 0.3 as 2,937 s of audio;
    now refused before any model call, while ordinary jobs beside it are served."""
    row = Row("jobs planning more audio or pieces than their text allows, with 2 ordinary jobs", "local")
    matrix.append(row)
    with worker_ctx(tiny_models, tiny_whisper, tmp_path) as ctx:
        judge(row, ctx, run_jobs(ctx, row, [upload(served.url("clip3.wav"), "one-letter.wav", "a")]), expect_ok=True)
        calls = len(ctx.worker.batcher.calls)
        past = [tts("A" * 300, voice="one-letter.wav", speed=0.3), tts("A " * 300, voice="one-letter.wav", speed=0.3)]
        outcomes = run_jobs(ctx, row, past)
        row.faults += len(past)
        count_answers(row, outcomes, expect_ok=False)
        if len(ctx.worker.batcher.calls) != calls:
            row.problems.append("a refused job reached the model")
        judge(row, ctx, run_jobs(ctx, row, [tts(), tts("Another ordinary sentence.", seed=3)]), expect_ok=True)
    row.assert_clean()


PAST_LIMIT_SETTINGS = [{name: past} for name, _, past in SETTING_LIMITS] + [
    {ENV_AWS_ENDPOINT_URL: "https://s3.example.com/advb", ENV_S3_BUCKET: "voices", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
     "AWS_SECRET_ACCESS_KEY": "example-secret"}, {ENV_DEVICE: "cpu:0"}, {ENV_DEVICE: "banana"},
    {ENV_S3_BUCKET: "voices"}]


def test_settings_at_and_past_their_limits(matrix, tiny_models, tiny_whisper, tmp_path):
    """Each value past a limit stops the worker at start with a sentence naming its variable (here
    the start attempts count as the row's jobs); one worker with every number at its limit serves."""
    row = Row(f"settings past their limits ({len(PAST_LIMIT_SETTINGS)} starts), then all at them", "local")
    matrix.append(row)
    for env in PAST_LIMIT_SETTINGS:
        row.jobs += 1
        row.faults += 1
        try:
            Settings.from_env(env)
        except ValueError as err:
            row.refused += 1
            if next(iter(env)) not in str(err) or "\n" in str(err):
                row.problems.append(f"the sentence does not name the variable: {err}")
        else:
            row.false_successes += 1
            row.problems.append(f"started with {sorted(env)}")
    at_limits = {name: at for name, at, _ in SETTING_LIMITS}
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra=at_limits) as ctx:
        judge(row, ctx, run_jobs(ctx, row, [tts(), tts("At the limits, still served.", seed=2)]), expect_ok=True)
    row.assert_clean()


GATE_TIMEOUT_S = 6.0


def test_the_gate_against_an_endpoint_that_trickles(matrix, tiny_models, tmp_path, s3_server):
    """Headers, then one byte a second: no read timeout ever fires, and the gate ran past 90 s."""
    row = Row(f"the gate (--timeout {GATE_TIMEOUT_S:g}) against an endpoint that trickles one byte per 0.5 s", "S3")
    matrix.append(row)
    with pytest.MonkeyPatch.context() as mp, dripping_endpoint() as url:
        s3 = make_s3_env(s3_server, mp, tmp_path, prefix="drip")
        for name, value in {**tiny_models, **s3, ENV_AWS_ENDPOINT_URL: url, ENV_VOLUME_PATH: str(tmp_path / "vol")}.items():
            mp.setenv(name, value)
        out = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out):
            code = validation.main(["--json", "--skip-gpu", "--timeout", str(GATE_TIMEOUT_S)])
        row.slowest = time.monotonic() - started
    row.jobs, row.faults = 1, 1
    checks = {c["name"]: c for c in json.loads(out.getvalue())["checks"]}
    stuck = checks["S3 storage"]
    if code == 1 and stuck["status"] == "fail" and "did not finish within" in stuck["message"]:
        row.refused = 1
    else:
        row.false_successes = int(code == 0)
        row.problems.append(f"the gate said: {stuck}")
    if row.slowest > GATE_TIMEOUT_S + 4:
        row.problems.append(f"the gate took {row.slowest:.1f} s")
    if s3_server.secret_key in out.getvalue():
        row.problems.append("the secret was printed")
    row.assert_clean()
