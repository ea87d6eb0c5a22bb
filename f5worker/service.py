"""Worker start-up and the RunPod handler: build everything once, then route each job.

Why this module exists: the handler must be testable without starting runpod, and nothing may
load at import. ``build_worker`` loads the model (and warms it up) once per process;
``make_handler`` returns the async handler runpod calls, which only parses, routes, calls and shapes
the result. Errors are mapped to ``{"error": "<sentence>"}`` here and nowhere else.

Besides routing, the handler runs each job under ``f5worker.jobs.guard`` (its deadline, and what
SIGTERM does to it), and handles faults a worker does not recover from. When the models could not
be loaded, or a job fails with a CUDA out-of-memory error or a CUDA device fault (also when it arrives wrapped, as another error's
cause), the caller gets a sentence and the result carries ``"refresh_worker": True``: runpod pops
it and sends ``stopPod``, so RunPod replaces this worker after the job instead of letting it fail
every job forever. No runpod fitness check is registered for failed start-up on purpose: a failing
fitness check ``os._exit(1)``s before any job is taken, so callers would never learn why (their
jobs would wait in the queue while workers restart), and a configuration mistake would restart
workers in a loop. Answering each job with the cause, then being replaced, tells callers and
still gets the worker replaced.

Streaming (``F5_STREAMING``) is decided once, at start, because runpod decides once whether the
handler is a generator. Off, the handler is an async function and a job's result is its dict. On,
the handler is an async generator (registered with ``return_aggregate_stream``): a job yields its
result dict as its one item, or, with ``"stream": true``, its audio pieces first
(``f5worker.jobs.streaming``) and the result dict last; so ``/runsync`` and ``run_sync`` return a list
whose last item is the result. runpod reads ``refresh_worker`` only from a plain handler's result,
and then only sends ``stopPod`` with it, taking jobs all the same; so both handlers also ask
through ``replace_worker`` (``serve`` sets runpod's config flag, after which its job loop takes no
more jobs). Progress reports (runpod's ``progress_update``) are sent
for TTS jobs of several chunks, only where jobs come from RunPod's queue: runpod's local modes have
nowhere to send them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from f5worker.errors import InputError, StorageError, WorkerError, traceback_without_messages
from f5worker.inference.gpu_faults import gpu_fault
from f5worker.jobs.guard import COMMITTING, JobGuard, JobStopped, safe_job_id
from f5worker.jobs.inputs import parse_job_input
from f5worker.local_job import local_test_job, run_local_job
from f5worker.jobs.progress import OrderedProgress, ProgressReports
from f5worker.settings import ENV_MODEL_MEMORY_MB, ENV_PRELOAD_MODELS, ENV_STREAMING, Settings

if TYPE_CHECKING:  # boto3 is imported with the worker, timed apart (start_worker)
    from s3_utils import Storage

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a failed job's log record gets this long


def build_worker(settings: Settings, phases: dict[str, float] | None = None):
    """Open storage, resolve and load the models, warm them up. Raises a WorkerError (the start
    error) if storage cannot be used or the models can't be had. ``phases`` receives the seconds each start-up phase took."""
    phases = {} if phases is None else phases
    mark = time.perf_counter()

    def lap(name):
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 3)
        mark = now

    from f5worker.inference.device import pick_device
    from f5worker.inference.engine import TTSEngine
    from f5worker.jobs.workflows import Worker
    from f5worker.model.store import resolve_tts_files
    from f5worker.inference.transcriber import Transcriber
    from f5worker.jobs.plan import warm_up
    from s3_utils import check_at_start, make_storage

    lap("import_worker")
    # Storage and the device first: a setting that makes either unusable is a start error in
    # seconds, not after the models have loaded.
    storage = make_storage(settings)
    check_at_start(storage)  # a missing bucket, a local root that is a file: start errors
    lap("open_storage")
    device = pick_device(settings.device)
    files = resolve_tts_files(settings)
    lap("resolve_models")
    engine = TTSEngine.load(files, device=device, fast=settings.fast_path,
                            graph_memory_bytes=settings.graph_memory_mb * 2**20)
    lap("load_models")
    warm_up(engine)
    lap("warm_up")
    worker = Worker(settings, engine, storage, Transcriber(settings, device=device))
    for name in settings.preload_models:  # F5_PRELOAD_MODELS: loaded now, not by their first job
        worker.models.load_now(name)
    if worker.models.pool.unloaded:  # the budget holds fewer than the operator asked to load
        log.warning("%s: %s unloaded again at start to keep TTS weights under %s (%d MiB); each loads again on "
                    "its next job", ENV_PRELOAD_MODELS, ", ".join(worker.models.pool.unloaded), ENV_MODEL_MEMORY_MB,
                    settings.model_memory_mb)
    lap("preload_models")
    # Graphs for the common single-job lengths are captured while the worker waits for work, then
    # (on a GPU) the fused kernels are compiled, checked and switched to (f5worker.inference.kernel_switch).
    worker.batcher.prepare_in_background(engine.background_tasks(settings.kernel_cache, settings.fused_kernels))
    log.info("worker ready: %s; storage: %s", phases, storage.describe())
    return worker


def error_sentence(err: WorkerError) -> str:
    """``str(err)`` as the sentence a caller gets. Storage messages are written to be embedded
    ("local storage failed: ... (get voices/x.wav)"): they get a capital and a full stop here."""
    message = str(err).strip() or f"{type(err).__name__}."
    if isinstance(err, StorageError):
        message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


@dataclass(frozen=True)
class JobCall:
    """What a job brings beside its input: its id, the job as runpod gave it (for progress
    reports), and where a streamed job's audio goes (None: this endpoint does not stream)."""

    job_id: str
    job: dict
    on_audio: Callable[[dict], None] | None
    progress: ProgressReports | None


def start_tts(worker, job_input, call: JobCall) -> Awaitable[dict]:
    if job_input.stream and call.on_audio is None:
        raise InputError(f"This endpoint does not stream: set {ENV_STREAMING}=1 on the endpoint "
                         "to send 'stream': true jobs, or leave 'stream' out.")
    report = (lambda update: call.progress.report(call.job, update)) if call.progress is not None else None
    return worker.tts(call.job_id, job_input, on_audio=call.on_audio if job_input.stream else None,
                      on_progress=report)


# A job's "endpoint" -> the workflow that runs it (jobs.workflows.Worker), as a coroutine to guard.
ROUTES: dict[str, Callable[..., Awaitable[dict]]] = {
    "tts": start_tts,
    "upload": lambda worker, job_input, call: worker.upload(call.job_id, job_input),
    "list_voices": lambda worker, job_input, call: worker.list_voices(call.job_id, job_input),
    "list_models": lambda worker, job_input, call: worker.list_models(call.job_id, job_input),
    "voice_info": lambda worker, job_input, call: worker.voice_info(call.job_id, job_input),
    "delete_voice": lambda worker, job_input, call: worker.delete_voice(call.job_id, job_input),
}


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its result, or ``{"error": <sentence>}`` (with ``refresh_worker`` after a
    GPU fault) and the exception that caused it."""

    result: dict
    error: Exception | None = None


@dataclass
class JobRunner:
    """Runs one job: parse, route, guard, and the result or the error as ``failure`` words it."""

    worker: object
    start_error: WorkerError | None
    guard: JobGuard | None
    progress: ProgressReports | None = None

    async def run(self, job: dict, on_audio: Callable[[dict], None] | None = None) -> dict:
        if self.start_error is not None:
            log.error("job refused (the worker did not start), asking RunPod to replace this worker: %s",
                      self.start_error)
            return {"error": error_sentence(self.start_error), "refresh_worker": True}
        call = JobCall(safe_job_id(job.get("id")), job, on_audio, self.progress)
        try:
            job_input = parse_job_input(job.get("input"))
        except InputError as err:
            return (await self.failed(err, call.job_id, "unknown")).result
        endpoint = job_input.endpoint
        try:
            outcome = await self.outcome(call.job_id, endpoint, lambda: ROUTES[endpoint](self.worker, job_input, call))
        finally:
            if self.progress is not None:  # no report after the result
                await asyncio.get_running_loop().run_in_executor(None, self.progress.finish, job)
        return outcome.result

    async def outcome(self, job_id: str, endpoint: str, start: Callable[[], Awaitable[dict]]) -> Outcome:
        """The workflow ``start()`` begins, run under the guard (its deadline, SIGTERM); a failure
        is logged and recorded once. Both faces run their jobs through here."""
        self.guard.watch_sigterm()
        try:
            if self.guard.stopping:
                raise JobStopped("The worker is shutting down and did not start the job; send it again.",
                                 shutdown=True)
            return Outcome(await self.guard.run(job_id, start()))
        except Exception as err:
            return await self.failed(err, job_id, endpoint)

    async def failed(self, err: Exception, job_id: str, endpoint: str) -> Outcome:
        result, recorded = failure(err, job_id, endpoint)
        await _record_error(self.worker, job_id, endpoint, recorded)
        return Outcome(result, err)


def job_guard(settings: Settings, storage: Storage) -> JobGuard:
    """The guard of a worker's jobs: its deadline, a job whose final write has begun is waited for
    (its multipart upload stopped before the next part), and a shutdown aborts the open uploads."""
    return JobGuard(settings.job_timeout_s, settings.tmp_dir, committing=COMMITTING.get,
                    on_stop=storage.abort_uploads)


async def stream_job(runner: JobRunner, job: dict, replace_worker: Callable[[], None] | None):
    """A streamed job: each piece of audio as it is sampled, then the result. A caller that goes
    away (runpod cancelled the job) cancels the job."""
    pieces: asyncio.Queue = asyncio.Queue()
    end = object()

    async def run_then_end() -> dict:
        try:
            return await runner.run(job, pieces.put_nowait)
        finally:
            pieces.put_nowait(end)

    running = asyncio.ensure_future(run_then_end())
    try:
        while (piece := await pieces.get()) is not end:
            yield piece
        result = running.result()
    finally:
        running.cancel()
    asked_to_replace(result, replace_worker)
    yield result


def asked_to_replace(result: dict, replace_worker: Callable[[], None] | None) -> None:
    """A result that asks for a new worker (``refresh_worker``) also sets runpod's config flag: the
    flag in a result only sends ``stopPod`` with that one result, while the flag in the config is
    what makes runpod's job loop stop taking jobs (``JobScaler.handle_job``), so a broken worker
    does not go on failing the queue's jobs until RunPod gets to it."""
    if result.get("refresh_worker") and replace_worker is not None:
        replace_worker()


def make_handler(worker, start_error: WorkerError | None = None, guard: JobGuard | None = None, *,
                 streaming: bool = False, progress: ProgressReports | None = None,
                 replace_worker: Callable[[], None] | None = None):
    """The handler runpod calls: an async function, or with ``streaming`` an async generator (the
    module docstring). With ``start_error`` (the models could not be loaded) every job gets that
    sentence back, so callers see why, and RunPod is asked to replace the worker. ``progress``
    sends a job's progress reports to RunPod; ``replace_worker`` asks runpod to take no more jobs
    and replace the worker once the job in hand ends (``asked_to_replace``)."""
    if guard is None and worker is not None:
        guard = job_guard(worker.settings, worker.storage)
    runner = JobRunner(worker, start_error, guard, progress)

    async def handler(job: dict) -> dict:
        result = await runner.run(job)
        asked_to_replace(result, replace_worker)
        return result

    async def streaming_handler(job: dict):
        # aclosing: a caller that closes this generator closes the job's at once, not at collection
        async with contextlib.aclosing(stream_job(runner, job, replace_worker)) as items:
            async for item in items:
                yield item

    return streaming_handler if streaming else handler


def failure(err: Exception, job_id: str, endpoint: str) -> tuple[dict, str]:
    """The result of a job that failed with ``err`` (logged once), and what its log record says."""
    fault = gpu_fault(err)
    if fault is not None:
        kind, cuda_error = fault
        log.error("job %s (%s) hit a GPU fault; asking RunPod to replace this worker", job_id, endpoint,
                  exc_info=err)
        what = "ran out of memory" if kind == "memory" else f"failed ({type(cuda_error).__name__})"
        message = f"The GPU {what} during this job; this worker will be replaced."
        return {"error": message, "refresh_worker": True}, message
    if isinstance(err, WorkerError):
        message = error_sentence(err)
        log.info("job %s (%s) refused or failed: %s", job_id, endpoint, message)
        return {"error": message}, message
    # a bug or an unexpected fault: say so without leaking internals
    log.error("job %s (%s) failed unexpectedly:\n%s", job_id, endpoint, traceback_without_messages(err))
    return ({"error": f"Internal error ({type(err).__name__}); the worker log has details for job {job_id}."},
            type(err).__name__)


async def _record_error(worker, job_id: str, endpoint: str, error: str) -> None:
    """The failed job's log record; storage that hangs must not hold the answer (the write goes on
    in its thread)."""
    writing = asyncio.ensure_future(worker.record(job_id, endpoint, "error", error=error))
    done, _ = await asyncio.wait({writing}, timeout=SETTLE_S)  # not wait_for: it would wait for the write
    if not done:
        log.warning("the log record of job %s is still being written after %g s", job_id, SETTLE_S)


def concurrency_modifier_for(settings: Settings):
    """Lets runpod hand this worker up to F5_MAX_CONCURRENCY jobs at once, for the batcher."""
    return lambda current: settings.max_concurrency


def load_worker(settings: Settings, phases: dict[str, float] | None = None) -> tuple[object | None, WorkerError | None]:
    """``build_worker``, its failure as the start error every job (and, over HTTP, /ping) answers with."""
    try:
        return build_worker(settings, phases), None
    except WorkerError as err:
        log.error("the worker cannot serve jobs: %s", err)
        return None, err
    except Exception as exc:  # a corrupt checkpoint, a config that is not f5-tts's, ...
        log.exception("the worker could not start")
        return None, StorageError(f"The worker could not load its models ({type(exc).__name__}); "
                                  "the worker log has details.")


def start_worker(settings: Settings, phases: dict[str, float] | None = None):
    """Load the worker while runpod's SDK imports (its import alone takes over a second); returns
    (worker or None, start error or None, the runpod module)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="startup") as pool:
        loading = pool.submit(load_worker, settings, phases)
        import runpod

        worker, start_error = loading.result()
        return worker, start_error, runpod


def serve(settings: Settings) -> int:
    worker, start_error, runpod = start_worker(settings)
    config = {"concurrency_modifier": concurrency_modifier_for(settings)}
    if settings.streaming:
        config["return_aggregate_stream"] = True  # run_sync and /runsync: the list of what was yielded
    # runpod's own sender, one report at a time per job (f5worker.jobs.progress): its progress_update
    # posts each report from a thread of its own, and they arrived out of order
    send_progress = runpod.serverless.modules.rp_progress._thread_target
    progress = OrderedProgress(send_progress) if settings.on_runpod_queue else None
    config["handler"] = make_handler(worker, start_error, streaming=settings.streaming, progress=progress,
                                     replace_worker=lambda: config.update(refresh_worker=True))
    args, _ = runpod.serverless.parser.parse_known_args()
    try:
        job = local_test_job(args)
    except InputError as err:
        log.error("%s", err)
        return 1
    if job is not None:  # runpod's local mode would skip a streaming job and log the whole result
        return asyncio.run(run_local_job(config["handler"], job))
    runpod.serverless.start(config)
    return 0
