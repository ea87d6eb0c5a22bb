"""The HTTP face's errors in OpenAI's shape, and the one place a job's failure becomes a status.

Why this module exists: OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}``
and the status; the message is the sentence the queue face gives for the same failure
(``f5worker.service.failure``), so the two faces say the same thing.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from f5worker.errors import InputError, ModelFault, ModelUnavailable, NotFound, StorageError, WorkerError
from f5worker.jobs.guard import JobStopped
from f5worker.service import Outcome

RETRY_AFTER_S = 1  # a 429's and a 503's Retry-After: the batcher turns over within about that


class ApiError(Exception):
    """An answer other than 2xx: its status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, final: bool = False):
        """``final``: sending the same request again would fail the same way (a deadline, a setting,
        a bug), so the answer says ``x-should-retry: false``; OpenAI's clients otherwise retry every
        5xx twice, and a job stopped at its 600 s deadline cost 30 minutes of GPU time."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.final = final

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.final:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def api_error(outcome: Outcome) -> ApiError:
    """A failed job's answer: 404 for what does not exist, 400 for other refused input, 503 when
    the worker could not do it now (storage, a deadline, a shutdown, a GPU fault), 500 for a bug.
    ``worker_unhealthy`` may be retried: RunPod's load balancer sends the retry to a healthy worker."""
    err, message = outcome.error, outcome.result["error"]
    if isinstance(err, NotFound):
        return ApiError(404, message, param=err.param, code="not_found")
    if isinstance(err, InputError):
        return ApiError(400, message, param=err.param, code="invalid_value")
    if outcome.result.get("refresh_worker"):
        return ApiError(503, message, code="worker_unhealthy")
    if isinstance(err, JobStopped):  # a shutdown's job may run on another worker; a deadline would stop it again
        return (ApiError(503, message, code="job_stopped", retry_after=RETRY_AFTER_S) if err.shutdown else
                ApiError(503, message, code="job_stopped", final=True))
    if isinstance(err, ModelFault):  # the same seed makes the same audio; a drawn one may not
        return ApiError(500, message, code="model_fault", final=not err.retry_helps)
    if isinstance(err, StorageError):  # a fault that may pass in a second, or a setting or volume to fix
        code = "model_unavailable" if isinstance(err, ModelUnavailable) else "storage_error"
        return (ApiError(503, message, code=code, retry_after=RETRY_AFTER_S) if err.retry_helps else
                ApiError(503, message, code=code, final=True))
    if isinstance(err, WorkerError):
        return ApiError(503, message, code="storage_error", retry_after=RETRY_AFTER_S)
    return ApiError(500, message, code="internal_error", final=True)
