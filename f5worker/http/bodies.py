"""What the HTTP face accepts: OpenAI's speech request, the voice form, the query of a voice list.

Why this module exists: a request becomes the queue face's job input (``jobs.inputs``), so every
F5-TTS knob is checked by the same rules and refused with the same sentence; only OpenAI's own
fields are read here. ``instructions`` (OpenAI's voice direction) is accepted and not used: F5-TTS
takes its style from the reference voice. Any other field nobody defines is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from f5worker.errors import InputError, shown
from f5worker.jobs.inputs import (MAX_MODEL_NAME_CHARS, ListVoicesInput, TTSInput, UploadInput, int_in_reach,
                                  loads_input, parse_model)
from f5worker.jobs.live_encoding import DEFAULT_LIVE_FORMAT, LIVE_FORMATS, LiveFormat
from f5worker.jobs.encoding import one_of
from f5worker.jobs.options import OPTION_DEFAULTS
from f5worker.model.registry import default_aliases, model_for_job, model_registry
from f5worker.settings import Settings

# The job contract's F5-TTS knobs, accepted beside OpenAI's fields (the SDK's ``extra_body``).
KNOBS = ("ref_text", "nfe_step", "seed", "cfg_strength", "sway_sampling_coef", "cross_fade_duration",
         "remove_silence", "sample_rate", "normalize", "verify", "verify_max_error", "verify_retries")
VOICE_LIST_PARAMS = ("limit", "cursor", "details")
VOICE_FORM_FIELDS = ("file", "name", "ref_text")
# A speech body's fields as the job's input names them, for its sentences.
RENAMED = {"text": "input", "local_voice": "voice", "output_format": "response_format"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, str_strip_whitespace=True)


class VoiceId(_Body):
    id: str  # the SDK's custom-voice form, {"id": "alice"}


class SpeechBody(_Body):
    # None: the default model; held to the queue face's bounds, so an empty or overlong name gets its sentence
    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    input: str
    voice: str | VoiceId
    instructions: str | None = Field(default=None, max_length=4096)  # accepted, not used (module docstring)
    response_format: str = DEFAULT_LIVE_FORMAT
    speed: float = OPTION_DEFAULTS["speed"]
    stream_format: Literal["audio", "sse"] = "audio"


@dataclass(frozen=True)
class SpeechRequest:
    job: TTSInput
    fmt: LiveFormat
    sse: bool


def model_names(settings: Settings) -> tuple[str, ...]:
    """What ``model`` may be: the registered models (the default first), then the default's other
    names (a fine-tune's checkpoint stem, OpenAI's)."""
    return (*model_registry(settings), *default_aliases(settings))


def stored_voice_name(name: str, aliases: dict[str, str] | None) -> str:
    """A client's voice as a stored voice's name: an alias's voice, and ``alice`` is ``alice.wav``."""
    name = (aliases or {}).get(name, name)
    return name if name.endswith(".wav") else f"{name}.wav"  # as voice names are matched: 'a.WAV' is 'a.WAV.wav'


def json_body(data: bytes) -> dict:
    try:
        body = loads_input(data)
    except ValueError:  # UnicodeDecodeError among them
        raise InputError("The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    return body


def parse_speech_body(raw: dict) -> SpeechBody:
    """OpenAI's fields; a ``voice`` that is neither a name nor ``{"id": name}`` is said so once,
    not as the branch of the union pydantic tried last ('voice.constrained-str')."""
    try:
        return parse_model(SpeechBody, raw)
    except InputError as err:
        if err.param is not None and err.param.startswith("voice."):
            raise InputError(''''voice' must be a voice's name or {"id": name}.''', param="voice") from None
        raise


def parse_speech(raw: dict, settings: Settings) -> SpeechRequest:
    """A speech request's body as the job it asks for, or an InputError (NotFound for a model that
    is not registered: ``model`` picks one of f5worker.model.registry's, OpenAI's names the default)."""
    knobs = {name: raw[name] for name in KNOBS if name in raw}
    body = parse_speech_body({k: v for k, v in raw.items() if k not in KNOBS})
    model = model_for_job(body.model, model_registry(settings), settings.default_model, default_aliases(settings))  # NotFound, as queue jobs get
    if body.response_format not in LIVE_FORMATS:
        raise InputError(f"'response_format' must be {one_of(LIVE_FORMATS)}.", param="response_format")
    fmt = LIVE_FORMATS[body.response_format]
    voice = body.voice.id if isinstance(body.voice, VoiceId) else body.voice
    job = parse_model(TTSInput, {"text": body.input, "local_voice": stored_voice_name(voice, settings.voice_aliases),
                                 "speed": body.speed, "output_format": fmt.stored_as, "model": model, **knobs},
                    RENAMED)
    return SpeechRequest(job, fmt, sse=body.stream_format == "sse")


def refuse_unknown(names: Iterable[str], known: tuple[str, ...], what: str) -> None:
    """A query parameter or form field nobody defines is refused, as the queue face refuses an
    unknown input field: a typo (``ref_txt``) dropped without a word would change the job."""
    unknown = next((name for name in names if name not in known), None)
    if unknown is not None:
        raise InputError(f"Unknown {what} '{shown(unknown)}'; known: {', '.join(known)}.",
                         param=shown(unknown))


def parse_voice_list(query: dict[str, str]) -> ListVoicesInput:
    """``GET /v1/audio/voices?limit=&cursor=&details=``: the list job's input (query values are text)."""
    refuse_unknown(query, VOICE_LIST_PARAMS, "query parameter")
    raw: dict = {"endpoint": "list_voices"}
    if "limit" in query:
        if not (query["limit"].isascii() and query["limit"].isdigit()):  # int('²') fails
            raise InputError("'limit' must be an integer.", param="limit")
        raw["limit"] = int_in_reach(query["limit"])
    if "cursor" in query:
        raw["cursor"] = query["cursor"]
    if "details" in query:
        if query["details"] not in ("true", "false"):
            raise InputError("'details' must be true or false.", param="details")
        raw["details"] = query["details"] == "true"
    return parse_model(ListVoicesInput, raw)


def voice_upload(name: object, ref_text: object, audio_base64: str, aliases: dict[str, str] | None) -> UploadInput:
    """``POST /v1/audio/voices``'s form as the upload job's input (the file as base64, so the job's
    one decoder, size cap, normalisation and atomic write apply)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError("The form needs a 'name' for the voice.", param="name")
    if ref_text is not None and not isinstance(ref_text, str):
        raise InputError("'ref_text' must be text.", param="ref_text")
    raw = {"endpoint": "upload", "voice_base64": audio_base64, "voice_name": stored_voice_name(name.strip(), None)}
    if ref_text is not None and ref_text.strip():
        raw["ref_text"] = ref_text
    return parse_model(UploadInput, raw, {"voice_name": "name", "voice_base64": "file"})

