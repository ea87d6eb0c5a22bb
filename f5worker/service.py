"""Worker start-up and the RunPod handler: build everything once, then route each job.

Why this module exists: the handler must be testable without starting runpod, and nothing may
load at import. ``build_worker`` loads the model (and warms it up) once per process;
``make_handler`` returns the async handler runpod calls, which only parses, routes, calls and shapes
the result. Errors are mapped to ``{"error": "<sentence>"}`` here and nowhere else.
"""
from __future__ import annotations

import logging
import time

from f5worker.errors import StorageError, WorkerError
from f5worker.job_input import UploadInput, parse_job_input
from f5worker.settings import Settings

log = logging.getLogger(__name__)


def build_worker(settings: Settings, phases: dict[str, float] | None = None):
    """Resolve and load the models, warm them up, open storage. Raises StorageError if models
    can't be had. ``phases`` receives the seconds each start-up phase took."""
    phases = {} if phases is None else phases
    mark = time.perf_counter()

    def lap(name):
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 3)
        mark = now

    from f5worker.engine import TTSEngine, pick_device
    from f5worker.jobs import Worker
    from f5worker.model_store import resolve_tts_files
    from f5worker.transcriber import Transcriber
    from s3_utils import make_storage

    lap("import_worker")
    from f5worker.engine import import_inference_modules

    import_inference_modules()
    lap("import_f5_tts")
    device = pick_device(settings.device)
    files = resolve_tts_files(settings)
    lap("resolve_models")
    engine = TTSEngine.load(files, device=device, fast=settings.fast_path)
    lap("load_models")
    engine.warm_up()
    lap("warm_up")
    storage = make_storage(settings)
    lap("open_storage")
    worker = Worker(settings, engine, storage, Transcriber(settings, device=device))
    # Graphs for the common single-job lengths are captured while the worker waits for work.
    worker.batcher.prepare_in_background(engine.precapture_tasks())
    log.info("worker ready: %s; storage: %s", phases, storage.describe())
    return worker


def error_sentence(err: WorkerError) -> str:
    """``str(err)`` as the sentence a caller gets. Storage messages are written to be embedded
    ("local storage failed: ... (get voices/x.wav)"): they get a capital and a full stop here."""
    message = str(err).strip() or f"{type(err).__name__}."
    if isinstance(err, StorageError):
        message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


def make_handler(worker, start_error: WorkerError | None = None):
    """The async handler runpod calls. With ``start_error`` (the models could not be loaded) every
    job gets that sentence back, so callers see why instead of a worker that keeps restarting."""
    from f5worker.jobs import safe_job_id

    async def handler(job: dict) -> dict:
        if start_error is not None:
            return {"error": error_sentence(start_error)}
        job_id = safe_job_id(job.get("id"))
        endpoint = "unknown"
        try:
            job_input = parse_job_input(job.get("input"))
            endpoint = job_input.endpoint
            if isinstance(job_input, UploadInput):
                return await worker.upload(job_id, job_input)
            return await worker.tts(job_id, job_input)
        except WorkerError as err:
            message = error_sentence(err)
            log.info("job %s (%s) refused or failed: %s", job_id, endpoint, message)
            await worker.record(job_id, endpoint, "error", error=message)
            return {"error": message}
        except Exception as err:  # a bug or an unexpected fault: say so without leaking internals
            log.exception("job %s (%s) failed unexpectedly", job_id, endpoint)
            await worker.record(job_id, endpoint, "error", error=type(err).__name__)
            return {"error": f"Internal error ({type(err).__name__}); the worker log has details for job {job_id}."}

    return handler


def concurrency_modifier_for(settings: Settings):
    """Lets runpod hand this worker up to F5_MAX_CONCURRENCY jobs at once, for the batcher."""
    return lambda current: settings.max_concurrency


def start_worker(settings: Settings, phases: dict[str, float] | None = None):
    """Load the worker while runpod's SDK imports (its import alone takes over a second); returns
    (worker or None, start error or None, the runpod module)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="startup") as pool:
        loading = pool.submit(build_worker, settings, phases)
        import runpod

        try:
            return loading.result(), None, runpod
        except WorkerError as err:
            log.error("the worker cannot serve jobs: %s", err)
            return None, err, runpod
        except Exception as exc:  # a corrupt checkpoint, a config that is not f5-tts's, ...
            log.exception("the worker could not start")
            return None, StorageError(f"The worker could not load its models ({type(exc).__name__}); "
                                      "the worker log has details."), runpod


def serve(settings: Settings) -> int:
    worker, start_error, runpod = start_worker(settings)
    runpod.serverless.start({"handler": make_handler(worker, start_error),
                             "concurrency_modifier": concurrency_modifier_for(settings)})
    return 0
