"""A worker on RunPod's queue whose settings are refused: it answers every job with the reason.

Why this module exists: ``Settings.from_env`` refuses a bad variable with a sentence naming it. A
worker that exited with that sentence in its log was restarted by RunPod over and over, while the
queue's jobs waited and their callers were never told why. So on RunPod's queue the worker starts
runpod's job loop all the same, with a handler that answers each job with the sentence; it loads
no model and opens no storage. It does not ask to be replaced: a new worker would read the same
variables. Changing the endpoint's variables is what starts workers that take jobs.

Elsewhere the entry point exits with status 2 instead: a local test job or runpod's local API
server has its caller at the terminal, and on the HTTP face a worker that is gone is what RunPod's
load balancer acts on.
"""
from __future__ import annotations

import logging
from typing import Mapping

from f5worker.jobs.guard import safe_job_id
from f5worker.settings import read_alone

log = logging.getLogger(__name__)

EXIT_REFUSED = 2  # the entry point's status for refused settings where no job can be told


def refusal_sentence(reason: str) -> str:
    """What each job is told: the refused setting (the variable named, never a credential's value)."""
    return (f"This worker cannot take jobs because a setting is refused: {reason.rstrip('.')}. "
            "Fix the endpoint's environment variables; workers started after that take jobs.")


def refusing_handler(sentence: str, *, streaming: bool):
    """runpod's handler for such a worker: each job's result is ``{"error": sentence}`` (a streaming
    endpoint's handler is a generator whose one item is that result, as ``service`` yields)."""
    async def handler(job: dict) -> dict:
        log.error("job %s refused: the worker's settings are refused", safe_job_id(job.get("id")))
        return {"error": sentence}

    async def streaming_handler(job: dict):
        yield await handler(job)

    return streaming_handler if streaming else handler


def serve_refusal(reason: str, env: Mapping[str, str] | None = None) -> int:
    """On RunPod's queue, runpod's job loop with the refusing handler (it returns when runpod
    stops); anywhere else ``EXIT_REFUSED`` at once."""
    if not read_alone("on_runpod_queue", env) or read_alone("serve", env) != "queue":
        return EXIT_REFUSED
    import runpod  # only now: the entry point has set runpod's log level, which it reads at import

    streaming = read_alone("streaming", env)
    config = {"handler": refusing_handler(refusal_sentence(reason), streaming=streaming)}
    if streaming:
        config["return_aggregate_stream"] = True
    log.error("answering every job with the refused setting until the endpoint's variables are changed")
    runpod.serverless.start(config)
    return 0
