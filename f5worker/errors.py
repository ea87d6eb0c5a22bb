"""The failures a job can report, mapped to ``{"error": ...}`` in one place per face (the handler, ``http.errors``).

``InputError``: the caller sent something we refuse; nothing was changed (``NotFound``: it names
something that does not exist, which the HTTP face answers with 404).
``StorageError``: a model, voice or output could not be read or written.
``ModelFault``: the model's audio for a chunk is not finite numbers; nothing was stored.
Each carries one clear sentence meant for the caller; never credentials, URLs with signatures or job text.
"""
import traceback

SHOWN_CHARS = 40  # the most of a caller's text (a field's name) a sentence repeats
SHOWN_KEY_CHARS = 120  # of a storage key the caller named


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
    """``retry_helps``: the fault may pass (a timeout, a 5xx), so the same request sent again in a
    second may succeed; the HTTP face says which (``Retry-After``, or ``x-should-retry: false``)."""

    retry_helps = True


class ModelUnavailable(StorageError):
    """A model the job needs (a TTS model, the worker's Whisper) could not be found or loaded: a
    setting or a volume to fix, not a fault that passes in a second."""

    retry_helps = False


class WriteStopped(StorageError):
    """A write of several calls (a multipart upload) stopped between two of them, as its caller
    asked (the job's deadline, a shutdown). ``undone``: it was undone, so nothing was stored;
    else its parts stay until the bucket's rule for incomplete uploads removes them."""

    def __init__(self, message: str, *, undone: bool):
        super().__init__(message)
        self.undone = undone


class ModelFault(WorkerError):
    """The model made audio that cannot be passed on (samples that are not finite numbers: a
    numeric overflow). No encoder is handed it (LAME aborts the whole process on one NaN), and
    nothing is stored; another seed samples the chunk afresh. ``retry_helps``: the job's seed was
    drawn at random, so the same job sent again gets another."""

    def __init__(self, message: str, *, retry_helps: bool):
        super().__init__(message)
        self.retry_helps = retry_helps


class CallAbandoned(Exception):
    """Not a job's failure: a model call stopped between two ODE steps because every job it was
    sampling for had gone (failed, or stopped at its deadline), so its GPU time went to no one."""


def check_abandoned(abandoned) -> None:
    """Between two steps: raise CallAbandoned when ``abandoned`` (None, or a callable) says so."""
    if abandoned is not None and abandoned():
        raise CallAbandoned()


def traceback_without_messages(err: BaseException) -> str:
    """Where ``err`` and the faults behind it were raised, and their types, without their messages:
    an unexpected fault's message may quote what it was handed (a library echoing the job's text),
    and no log holds job text. Logged in place of ``exc_info`` for faults that are not the worker's
    own (``WorkerError``'s sentences are written for the caller and are safe to log)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        frames = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
        chain.append(f"Traceback (most recent call last):\n{frames}{type(err).__module__}.{type(err).__qualname__}"
                     " (message withheld: it may quote job text)")
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return "\n\nwhich led to:\n\n".join(reversed(chain))


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """Caller's text as a sentence (and so the log) repeats it: line breaks, terminal escapes,
    other control characters and unpaired surrogates as '?', so no caller can forge a log line,
    and cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"
