"""The two failures a job can report, mapped to ``{"error": ...}`` in one place (the handler).

``InputError``: the caller sent something we refuse; nothing was changed (``NotFound``: it names
something that does not exist, which the HTTP face answers with 404).
``StorageError``: a model, voice or output could not be read or written.
Each carries one clear sentence meant for the caller; never credentials, URLs with signatures or job text.
"""


class WorkerError(Exception):
    """Base: ``str(err)`` is the sentence returned to the caller."""


class InputError(WorkerError):
    """``param``: the input field at fault, where one is (OpenAI's error shape names it)."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class NotFound(InputError):
    """What the input names (a voice) does not exist; nothing was changed."""


class StorageError(WorkerError):
    pass


class CallAbandoned(Exception):
    """Not a job's failure: a model call stopped between two ODE steps because every job it was
    sampling for had gone (failed, or stopped at its deadline), so its GPU time went to no one."""


def check_abandoned(abandoned) -> None:
    """Between two steps: raise CallAbandoned when ``abandoned`` (None, or a callable) says so."""
    if abandoned is not None and abandoned():
        raise CallAbandoned()
