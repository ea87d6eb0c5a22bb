"""What every HTTP request passes before a route sees it: the API key, and the body's size.

Why this module exists: both checks must hold for every route alike and happen before a body is
read: an unauthenticated client learns nothing and costs nothing, and a body over its limit is
refused from its ``Content-Length`` or, sent without one, as soon as its bytes pass the limit,
never read whole. An ASGI middleware, so it runs before FastAPI parses anything.
"""
from __future__ import annotations

import hmac
import logging

from f5worker.http.errors import ApiError
from f5worker.jobs.inputs import MAX_REF_TEXT_CHARS, MAX_TEXT_CHARS

log = logging.getLogger(__name__)

VOICES_PATH = "/v1/audio/voices"  # the one route whose body is a file
OPEN_PATHS = ("/ping",)  # the health check answers without a key: RunPod's load balancer sends none
# The longest speech request the job takes, as JSON writes it: a character outside the BMP (CJK
# Extension B, emoji) is escaped as a surrogate pair, 12 bytes; 64 KiB for the other fields.
JSON_BODY_BYTES = 12 * (MAX_TEXT_CHARS + MAX_REF_TEXT_CHARS) + (1 << 16)
FORM_OVERHEAD_BYTES = 1 << 20  # a voice form's fields and multipart boundaries beside the file


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


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
        started, seen = False, 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await too_large(limit).response()(scope, receive, send)

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


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than the {limit:,} bytes this route takes.",
                    code="request_too_large")
