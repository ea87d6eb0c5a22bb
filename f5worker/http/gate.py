"""What every HTTP request passes before a route sees it: the API key, the body's size and the
time its body takes to arrive.

Why this module exists: these checks must hold for every route alike and happen before a body is
read: an unauthenticated client learns nothing and costs nothing, and a body over its limit is
refused from its ``Content-Length`` or, sent without one, as soon as its bytes pass the limit,
never read whole. A body must also arrive within its deadline (``body_deadline_s``): a route
holds one of the worker's ``F5_MAX_CONCURRENCY`` places while it reads, so a client that sent its
headers and then trickled or withheld its body held that place for as long as it kept the
connection open, and a few such clients refused everyone else with 429. An ASGI middleware, so it
runs before FastAPI parses anything.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from f5worker.http.errors import ApiError
from f5worker.jobs.inputs import MAX_REF_TEXT_CHARS, MAX_TEXT_CHARS

log = logging.getLogger(__name__)

VOICES_PATH = "/v1/audio/voices"  # the one route whose body is a file
OPEN_PATHS = ("/ping",)  # the health check answers without a key: RunPod's load balancer sends none
# The longest speech request the job takes, as JSON writes it: a character outside the BMP (CJK
# Extension B, emoji) is escaped as a surrogate pair, 12 bytes; 64 KiB for the other fields.
JSON_BODY_BYTES = 12 * (MAX_TEXT_CHARS + MAX_REF_TEXT_CHARS) + (1 << 16)
FORM_OVERHEAD_BYTES = 1 << 20  # a voice form's fields and multipart boundaries beside the file
# A body's deadline: this long, plus its route's largest body at the slowest rate a client is
# allowed (a voice form of 51 MiB at 256 KiB/s: 234 s; a speech request: 35 s).
BODY_BASE_S = 30
SLOWEST_BODY_BYTES_PER_S = 256 << 10


def body_deadline_s(limit: int) -> float:
    return BODY_BASE_S + limit / SLOWEST_BODY_BYTES_PER_S


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


class BodyTooSlow(Exception):
    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


class Gate:
    """The ASGI middleware: ``api_key`` (None: open) and the body limit per request."""

    def __init__(self, app, *, api_key: str | None, max_voice_bytes: int):
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        # The voice upload's file travels as itself in the form; its own cap is the upload job's.
        self.max_form_bytes = max_voice_bytes + FORM_OVERHEAD_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        limit = self._limit(scope["path"])
        deadline_s = body_deadline_s(limit)
        deadline = time.monotonic() + deadline_s
        started, seen, body_done = False, 0, False

        async def counted_receive():
            nonlocal seen, body_done
            if body_done:  # after the body, only the disconnect is awaited, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTooSlow(deadline_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except (BodyTooLarge, BodyTooSlow) as err:  # raised where no route's handler answered it
            if started:
                raise
            await body_refusal(err).response()(scope, receive, send)

    def _refusal(self, scope, headers: dict[str, bytes]) -> ApiError | None:
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", b"")
            scheme, _, key = given.partition(b" ")
            # compare_digest: the time taken says nothing about how much of the key was right
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <F5_API_KEY>'.",
                                code="invalid_api_key")
        declared = headers.get("content-length")
        limit = self._limit(scope["path"])
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return too_large(limit)
        return None


    def _limit(self, path: str) -> int:
        return self.max_form_bytes if path == VOICES_PATH else JSON_BODY_BYTES


def body_refusal(err: BodyTooLarge | BodyTooSlow) -> ApiError:
    if isinstance(err, BodyTooSlow):
        return ApiError(408, f"The request body did not arrive within the {err.seconds:.0f} s this route "
                             "allows for it.", code="request_timeout")
    return too_large(err.limit)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than the {limit:,} bytes this route takes.",
                    code="request_too_large")
