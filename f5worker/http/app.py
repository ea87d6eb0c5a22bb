"""The HTTP face's routes: OpenAI's speech API, the voice library, the models, and ``/ping``.

Why this module exists: it is the HTTP face's router, as ``service.make_handler`` is the queue
face's: each route reads its request (``http.bodies``), runs the job through the worker's
``JobRunner`` and shapes the answer; failures become OpenAI's error shape in ``http.errors``.
``ServerState`` says where the worker is (loading, ready, failed) and how many requests it holds:
beyond ``F5_MAX_CONCURRENCY`` a request is refused with 429 and ``Retry-After`` at once, since a
load-balancing endpoint has no queue to absorb it and a wait would only end at the client's timeout.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from f5worker.errors import InputError
from f5worker.http.bodies import (VOICE_FORM_FIELDS, json_body, model_names, parse_speech, parse_voice_list,
                                  refuse_unknown, stored_voice_name, voice_upload)
from f5worker.http.errors import RETRY_AFTER_S, ApiError, api_error
from f5worker.http.gate import VOICES_PATH, BodyTooLarge, BodyTooSlow, Gate, body_refusal
from f5worker.http.speech import SpeechJob, SpeechResponse
from f5worker.jobs.inputs import DeleteVoiceInput, parse_model
from f5worker.jobs.voices import check_voice_size
from f5worker.service import JobRunner, Outcome, job_guard
from f5worker.settings import ENV_MAX_CONCURRENCY, Settings

log = logging.getLogger(__name__)

MODEL_OWNER = "f5-tts"


class ServerState:
    """Where the worker is, and the requests it holds now."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runner: JobRunner | None = None
        self.failure: str | None = None  # the sentence /ping and every route answer with, once failed
        self.in_flight = 0
        self.jobs: set[asyncio.Task] = set()  # speech jobs still running, awaited at shutdown

    def track(self, task: asyncio.Task) -> None:
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    def ready(self, worker) -> None:
        self.runner = JobRunner(worker, None, job_guard(self.settings, worker.storage))

    def failed(self, sentence: str) -> None:
        """The worker cannot serve (start-up failed, or a GPU fault): /ping says so, and RunPod's
        load balancer replaces the worker."""
        self.failure = sentence

    def require_ready(self) -> JobRunner:
        if self.failure is not None:
            raise ApiError(503, self.failure, code="worker_unhealthy")
        if self.runner is None:
            raise ApiError(503, "The worker is still loading its models; try again shortly.", code="loading",
                           retry_after=RETRY_AFTER_S)
        return self.runner

    def take_slot(self) -> Callable[[], None]:
        """A place among the requests in flight, or 429; returns its release (safe to call twice)."""
        limit = self.settings.max_concurrency
        if self.in_flight >= limit:
            raise ApiError(429, f"This worker is serving the {limit} requests it takes at once "
                                f"({ENV_MAX_CONCURRENCY}); try again shortly.", code="rate_limit_exceeded",
                           retry_after=RETRY_AFTER_S)
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        return release

    def note(self, error: ApiError) -> None:
        if error.code == "worker_unhealthy":
            self.failed(error.message)


def new_job_id() -> str:
    return f"http-{uuid.uuid4().hex}"


def ping(state: ServerState) -> Response:
    """RunPod's health check: 200 ready, 204 loading, 503 failed (with the sentence)."""
    if state.failure is not None:
        return ApiError(503, state.failure, code="worker_unhealthy").response()
    if state.runner is None:
        return Response(status_code=204)
    return JSONResponse({"status": "ready"})


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, lambda request, err: err.response())
    for body_error in (BodyTooLarge, BodyTooSlow):
        app.add_exception_handler(body_error, lambda request, err: body_refusal(err).response())

    def client_gone(request, err: ClientDisconnect):  # while its body was read: nobody to answer
        log.info("%s %s: the client went away before its request's body arrived", request.method,
                 request.url.path[:100])
        return Response(status_code=400)

    app.add_exception_handler(ClientDisconnect, client_gone)

    def http_error(request, err: HTTPException):  # routes that do not exist, wrong methods, broken forms
        message = err.detail if isinstance(err.detail, str) else "The request was refused."
        if err.status_code == 404:
            message = f"There is no route {request.url.path[:100]!r}; see the README for the API."
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:100]!r}."
        return ApiError(err.status_code, message if message.endswith(".") else message + ".").response()

    app.add_exception_handler(HTTPException, http_error)


def make_ping_app(state: ServerState) -> FastAPI:
    """``/ping`` alone, for ``PORT_HEALTH`` when it is not ``PORT``."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.server = state
    app.add_api_route("/ping", ping_route, methods=["GET"])
    add_error_handlers(app)
    return app


def server(request: Request) -> ServerState:
    return request.app.state.server


async def run_job(state: ServerState, endpoint: str, read: Callable[[], Awaitable[object]],
                  workflow: Callable[[object, str, object], Awaitable[dict]]) -> dict:
    """A voice-library job: its input read, then run as the queue face runs it."""
    runner = state.require_ready()
    release = state.take_slot()
    job_id = new_job_id()
    try:
        try:
            job_input = await read()
        except InputError as err:
            outcome: Outcome = await runner.failed(err, job_id, endpoint)
        else:
            outcome = await runner.outcome(job_id, endpoint, lambda: workflow(runner.worker, job_id, job_input))
    finally:
        release()
    if outcome.error is not None:
        error = api_error(outcome)
        state.note(error)
        raise error
    return outcome.result


def voice_id(voice_name: str) -> str:
    """A stored voice as OpenAI clients name it: ``alice.wav`` is ``alice``."""
    return voice_name[:-len(".wav")] if voice_name.endswith(".wav") else voice_name


def ping_route(request: Request) -> Response:
    return ping(server(request))


def models(request: Request) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": MODEL_OWNER}
                                       for name in model_names(server(request).settings)]}


def audio_models(request: Request) -> dict:  # Open WebUI's listing of TTS models
    return {"models": [{"id": name} for name in model_names(server(request).settings)]}


async def speech(request: Request):
    state = server(request)
    runner = state.require_ready()
    release = state.take_slot()
    job_id = new_job_id()
    try:
        parsed = parse_speech(json_body(await request.body()), state.settings)
        job = SpeechJob(runner, job_id, parsed, store=state.settings.http_store_results, on_failure=state.note)
    except InputError as err:
        release()
        raise api_error(await runner.failed(err, job_id, "tts")) from None
    except BaseException:
        release()
        raise
    state.track(job.task)
    return SpeechResponse(job, sse=parsed.sse, on_end=release)


async def list_voices(request: Request) -> dict:
    async def read():
        return parse_voice_list(dict(request.query_params))
    result = await run_job(server(request), "list_voices", read,
                           lambda worker, job_id, job: worker.list_voices(job_id, job))
    for voice in result["voices"]:
        voice["id"] = voice["name"] = voice_id(voice["voice_name"])
    return {"object": "list", **result}


async def upload_voice(request: Request) -> dict:
    state = server(request)

    async def read():
        form = await request.form(max_files=1, max_fields=8)
        refuse_unknown(form.keys(), VOICE_FORM_FIELDS, "form field")
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InputError("The form needs the voice's audio as a 'file' part.", param="file")
        data = await file.read()
        check_voice_size(len(data), state.settings.max_voice_bytes, "file")  # named as sent, before base64
        return voice_upload(form.get("name"), form.get("ref_text"), base64.b64encode(data).decode("ascii"),
                            state.settings.voice_aliases)
    result = await run_job(state, "upload", read, lambda worker, job_id, job: worker.upload(job_id, job))
    return {"id": voice_id(result["voice_name"]), **result}


async def delete_voice(request: Request, name: str) -> dict:
    async def read():
        raw = {"endpoint": "delete_voice", "voice_name": stored_voice_name(name, None)}
        return parse_model(DeleteVoiceInput, raw, {"voice_name": "name"})
    result = await run_job(server(request), "delete_voice", read,
                           lambda worker, job_id, job: worker.delete_voice(job_id, job))
    return {"id": voice_id(result["voice_name"]), "deleted": True, **result}


ROUTES = (
    ("/ping", ping_route, "GET"),
    ("/v1/models", models, "GET"),
    ("/v1/audio/models", audio_models, "GET"),
    ("/v1/audio/speech", speech, "POST"),
    (VOICES_PATH, list_voices, "GET"),
    (VOICES_PATH, upload_voice, "POST"),
    (VOICES_PATH + "/{name}", delete_voice, "DELETE"),
)


def make_app(state: ServerState) -> Gate:
    """The API as an ASGI app, behind the gate (the API key, body limits)."""
    # redirect_slashes off: '/v1/models/' is a 404 in OpenAI's shape, not a 307 to a URL built from
    # the request's own Host header
    app = FastAPI(title="F5-TTS worker", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.server = state
    for path, route, method in ROUTES:
        app.add_api_route(path, route, methods=[method])
    add_error_handlers(app)
    return Gate(app, api_key=state.settings.api_key, max_voice_bytes=state.settings.max_voice_bytes)
