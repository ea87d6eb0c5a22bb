"""``POST /v1/audio/speech``'s answer: the audio file's bytes sent as the job samples its chunks.

Why this module exists: the answer's status must be known before its first byte, and a client that
goes away must stop its job at once. ``SpeechJob`` starts the job (``Worker.tts`` with a
``jobs.live_encoding.EncodedStream``, through ``JobRunner.outcome``: the queue face's deadline,
shutdown and error record) and hands out its bytes. ``SpeechResponse`` waits for the first bytes,
so a job refused or failed before any audio gets its OpenAI-shaped error and status; once audio
has gone out, a failure ends the connection without the body's end (``Transfer-Encoding:
chunked`` with no last chunk, or an SSE ``error`` event), so no client takes a cut-off file for a
whole one. Throughout, it listens for the client's disconnect, which cancels the job: its chunks
leave the batcher (``Worker._sample`` withdraws them) and its temp files are removed.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Callable, Iterator

import anyio
from starlette.responses import Response

from f5worker.http.bodies import SpeechRequest
from f5worker.http.errors import ApiError, api_error
from f5worker.http.spool import ByteSpool
from f5worker.jobs.live_encoding import EncodedStream
from f5worker.service import JobRunner

log = logging.getLogger(__name__)

# How long an answer waits for its client to take its next piece before it is ended as if the
# client had gone: far past a player's pause to buffer or a network's stall, well short of the
# quarter of an hour TCP takes to give up on a peer that vanished.
SEND_STALL_S = 120


class SpeechJob:
    """One speech request's job, started at once; ``next`` hands out its bytes in order."""

    def __init__(self, runner: JobRunner, job_id: str, request: SpeechRequest, *, store: bool,
                 on_failure: Callable[[ApiError], None]):
        self.job_id = job_id
        self.stream = EncodedStream(request.fmt, request.job.sample_rate, request.job.cross_fade_duration,
                                    spill_dir=runner.worker.settings.tmp_dir)
        # what the client has not read yet (a slow reader's backlog goes to disk, http.spool)
        self.unsent = ByteSpool(runner.worker.settings.tmp_dir)
        self.arrived = asyncio.Event()  # new bytes, the audio's end or the job's
        self.audio_done = False  # the stream's last bytes are in ``unsent``
        self.rest: Iterator[bytes] | None = None  # once the audio is closed: a file sent when complete
        self.complete = False  # every byte of the audio was handed out
        self.on_failure = on_failure
        worker = runner.worker
        self.task = asyncio.ensure_future(runner.outcome(job_id, "tts", lambda: worker.tts(
            job_id, request.job, self._receive, stream=self.stream, store=store)))
        self.task.add_done_callback(lambda _: self.arrived.set())

    def _receive(self, data: bytes) -> None:
        """The worker's ``on_audio``, on the event loop: the stream's close ends the audio."""
        if data:
            self.unsent.put(data)
        self.audio_done = self.stream.closed
        self.arrived.set()

    async def next(self) -> bytes | None:
        """The next bytes, None once the audio is complete, or the job's ApiError. In order: the
        bytes received, then the stream's end (a file sent when complete), then the job's end."""
        if self.rest is not None:  # read from disk as it is sent, so the file is never in memory
            data = await asyncio.to_thread(next, self.rest, None)
            if data is not None:
                return data
            self.complete = True
            return None
        while not (self.unsent or self.audio_done or self.task.done()):
            self.arrived.clear()
            await self.arrived.wait()
        if self.unsent:
            return self.unsent.take()
        if self.audio_done:
            self.rest = self.stream.rest()
            return await self.next()
        outcome = self.task.result()  # the job ended before its audio did
        if outcome.error is None:  # a job that ended without audio (it cannot, but says so)
            self.complete = True
            return None
        error = api_error(outcome)
        self.on_failure(error)
        raise error

    def stop(self) -> None:
        """The answer ended: a job whose audio is complete finishes on its own (its record, a
        stored copy); any other is cancelled. Once the job has ended too, the stream's temp file
        (flac's) is closed: the job's coroutine and this object hold each other, so it was held
        until the cycle collector ran, hundreds of MB of a cancelled chapter on the temp disk."""
        if not self.complete:
            self.task.cancel()
        self.task.add_done_callback(lambda _: (self.stream.discard(), self.unsent.close()))


class SpeechResponse(Response):
    """The ASGI answer to one speech request (module docstring); ``on_end`` runs once it has ended
    and so has its job."""

    def __init__(self, job: SpeechJob, *, sse: bool, on_end: Callable[[], None]):
        super().__init__(media_type="text/event-stream" if sse else job.stream.fmt.content_type)
        self.job = job
        self.sse = sse
        # the slot is free once the job has ended, not the answer: a cancelled job's model call or
        # encoding may still be running, and counts against F5_MAX_CONCURRENCY until it stops; a
        # client that reads slowly, or not at all, no longer holds one once its audio is made
        job.task.add_done_callback(lambda _: on_end())
        self.finished = False  # the whole answer was sent

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self.finished:  # uvicorn also says "disconnect" once an answer is complete
                        log.info("speech %s: the client went away; its job is stopped", self.job.job_id)
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                await self._answer(scope, receive, send)
                group.cancel_scope.cancel()
        finally:
            self.job.stop()

    async def _answer(self, scope, receive, send) -> None:
        try:
            data = await self.job.next()
        except ApiError as err:
            self.finished = True
            await err.response()(scope, receive, send)
            return
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        headers.append((b"x-job-id", self.job.job_id.encode("ascii")))  # its record: logs/<job id>.json
        try:
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers})
            await self._stream(data, send)
        except TimeoutError:  # a client that read nothing for SEND_STALL_S: ended as one that left
            log.info("speech %s: the client read nothing for %d s; its answer is ended", self.job.job_id,
                     SEND_STALL_S)

    async def _stream(self, data: bytes | None, send) -> None:
        try:
            while data is not None:
                await self._send(send, self._body(self._event(data)))
                data = await self.job.next()
        except ApiError as err:
            log.warning("speech %s failed after its audio began: %s", self.job.job_id, err.message)
            if self.sse:  # an SSE client reads the error as an event; the end is not sent
                await self._send(send, self._body(sse_event({"type": "error", **err.body()})))
            return  # without the body's end: the connection closes, and the client sees it cut short
        if self.sse:
            await self._send(send, self._body(sse_event(DONE_EVENT)))
        self.finished = True
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _send(send, message: dict) -> None:
        """A piece of the answer, given SEND_STALL_S to leave: uvicorn's ``send`` waits while the
        client's socket is full, for ever if the client never reads; each stalled answer held its
        unsent audio (up to http.spool's memory share, the rest on disk) and its connection."""
        with anyio.fail_after(SEND_STALL_S):
            await send(message)

    @staticmethod
    def _body(data: bytes) -> dict:
        return {"type": "http.response.body", "body": data, "more_body": True}

    def _event(self, data: bytes) -> bytes:
        if not self.sse:
            return data
        return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


# OpenAI's last event; F5-TTS counts no tokens, so its usage is zero.
DONE_EVENT = {"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode("utf-8")
