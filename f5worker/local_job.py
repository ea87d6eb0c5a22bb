"""The one local test job (``--test_input`` or ``test_input.json``), run by the worker itself.

Why this module exists: runpod's own local mode (``rp_local.run_local``) calls the handler as a
plain function. On a streaming endpoint (``F5_STREAMING=1``) the handler is an async generator, so
runpod never ran the job, logged "completed successfully" and exited 0: the guide's ``docker run``
smoke test passed on a broken image. And runpod logs the whole result, presigned URL signatures
and an upload's transcript included. Here the job runs through the same handler as on RunPod
(every item a streaming handler yields is consumed, the last being the result), the exit status is
1 when it failed, and the result is logged without signatures, job text (its words' times
included) or inline audio. A test input that is not a JSON object, or whose ``id`` could not name
the job's files, is refused in one sentence.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from f5worker.errors import InputError
from f5worker.jobs.inputs import loads_input
from f5worker.settings import ENV_RUNPOD_JOB_URL, ENV_RUNPOD_REALTIME_PORT
from f5worker.jobs.guard import SAFE_JOB_ID

log = logging.getLogger(__name__)

LOCAL_JOB_ID = "local_test"  # runpod's name for it: outputs and records land under this id
TEXT_FIELDS = ("text", "ref_text", "transcript", "word")  # the caller's words: never logged


def local_test_job(args, env=os.environ, folder: Path = Path(".")) -> dict | None:
    """The job runpod would run locally, given its parsed arguments (``runpod.serverless.parser``),
    or None where runpod serves instead (its API server, a realtime port, RunPod's queue)."""
    if args.rp_serve_api or env.get(ENV_RUNPOD_REALTIME_PORT):
        return None
    if args.test_input:
        return parse_test_job(args.test_input, "--test_input")
    if env.get(ENV_RUNPOD_JOB_URL):
        return None
    path = folder / "test_input.json"
    return parse_test_job(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None


def parse_test_job(text: str, source: str) -> dict:
    """The job in ``text`` (from ``source``), named ``local_test`` unless it gives an ``id``;
    InputError in one sentence where it cannot be run."""
    try:
        job = loads_input(text)
    except json.JSONDecodeError as err:
        raise InputError(f"The test input ({source}) is not JSON: {err.msg} at line {err.lineno} "
                         f"column {err.colno}.") from None
    except ValueError as err:
        raise InputError(f"The test input ({source}) is not JSON: {err}.") from None
    if not isinstance(job, dict):
        raise InputError(f"The test input ({source}) must be a JSON object such as "
                         f'{{"input": {{"text": ...}}}}, not {type(job).__name__}.')
    job = {"id": LOCAL_JOB_ID, **job}
    if not (isinstance(job["id"], str) and SAFE_JOB_ID.fullmatch(job["id"])):
        raise InputError(f"The test input's 'id' ({source}) must be a string of letters, digits, '_' and '-' "
                         f"(it names the job's files), or left out for {LOCAL_JOB_ID}.")
    return job


def shown(result):
    """``result`` as it may be logged: URLs without their query (a presigned signature), the
    caller's words and inline audio replaced by their sizes."""
    if isinstance(result, list):
        return [shown(item) for item in result]
    if not isinstance(result, dict):
        return result
    out = {}
    for key, value in result.items():
        if key in TEXT_FIELDS and isinstance(value, str):
            out[key] = f"<{len(value)} characters>"
        elif key in ("audio_base64", "audio") and isinstance(value, str):
            out[key] = f"<{len(value)} base64 characters>"
        elif key.endswith("url") and isinstance(value, str) and value.startswith(("http://", "https://")):
            out[key] = urlunsplit(urlsplit(value)._replace(query="", fragment=""))
        else:
            out[key] = shown(value)
    return out


async def run_local_job(handler, job: dict) -> int:
    """Run ``job`` through ``handler`` (a plain or a streaming one); 0 when it succeeded, else 1."""
    if "input" not in job:
        log.error("The test job has no 'input'.")
        return 1
    if inspect.isasyncgenfunction(handler):
        pieces = [item async for item in handler(job)]
        result = pieces[-1] if pieces else {}
        log.info("job %s yielded %d stream piece(s) before its result", job["id"], max(0, len(pieces) - 1))
    else:
        result = await handler(job)
    if isinstance(result, dict) and result.get("error"):
        log.error("Job %s failed with error: %s", job["id"], result["error"])
        return 1
    log.info("Job %s completed successfully. Result: %s", job["id"], json.dumps(shown(result)))
    return 0
