"""Worker start-up and the RunPod handler: build everything once, then route each job.

Why this module exists: the handler must be testable without starting runpod, and nothing may
load at import. ``build_worker`` loads the model (and warms it up) once per process;
``make_handler`` returns the async handler runpod calls, which only parses, routes, calls and shapes
the result. Errors are mapped to ``{"error": "<sentence>"}`` here and nowhere else.
"""
from __future__ import annotations

import logging
import time

from f5worker.errors import WorkerError
from f5worker.job_input import UploadInput, parse_job_input
from f5worker.settings import Settings

log = logging.getLogger(__name__)


def build_worker(settings: Settings):
    """Resolve and load the models, warm them up, open storage. Raises StorageError if models can't be had."""
    from f5worker.engine import TTSEngine, pick_device
    from f5worker.jobs import Worker
    from f5worker.model_store import resolve_tts_files
    from f5worker.transcriber import Transcriber
    from s3_utils import make_storage

    started = time.perf_counter()
    device = pick_device(settings.device)
    engine = TTSEngine.load(resolve_tts_files(settings), device=device, fast=settings.fast_path)
    warm = engine.warm_up()
    storage = make_storage(settings)
    log.info("worker ready in %.2f s (warm-up %.2f s); storage: %s", time.perf_counter() - started, warm,
             storage.describe())
    return Worker(settings, engine, storage, Transcriber(settings, device=device))


def make_handler(worker):
    from f5worker.jobs import safe_job_id

    async def handler(job: dict) -> dict:
        job_id = safe_job_id(job.get("id"))
        endpoint = "unknown"
        try:
            job_input = parse_job_input(job.get("input"))
            endpoint = job_input.endpoint
            if isinstance(job_input, UploadInput):
                return await worker.upload(job_id, job_input)
            return await worker.tts(job_id, job_input)
        except WorkerError as err:
            log.info("job %s (%s) refused or failed: %s", job_id, endpoint, err)
            await worker.record(job_id, endpoint, "error", error=str(err))
            return {"error": str(err)}
        except Exception as err:  # a bug or an unexpected fault: say so without leaking internals
            log.exception("job %s (%s) failed unexpectedly", job_id, endpoint)
            await worker.record(job_id, endpoint, "error", error=type(err).__name__)
            return {"error": f"Internal error ({type(err).__name__}); the worker log has details for job {job_id}."}

    return handler


def concurrency_modifier_for(settings: Settings):
    """Lets runpod hand this worker up to F5_MAX_CONCURRENCY jobs at once, for the batcher."""
    return lambda current: settings.max_concurrency


def serve(settings: Settings) -> int:
    import runpod

    worker = build_worker(settings)
    runpod.serverless.start({"handler": make_handler(worker),
                             "concurrency_modifier": concurrency_modifier_for(settings)})
    return 0
