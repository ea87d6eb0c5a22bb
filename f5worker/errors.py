"""The two failures a job can report, mapped to ``{"error": ...}`` in one place (the handler).

``InputError``: the caller sent something we refuse; nothing was changed.
``StorageError``: a model, voice or output could not be read or written.
Each carries one clear sentence meant for the caller; never credentials, URLs with signatures or job text.
"""


class WorkerError(Exception):
    """Base: ``str(err)`` is the sentence returned to the caller."""


class InputError(WorkerError):
    pass


class StorageError(WorkerError):
    pass
