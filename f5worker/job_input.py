"""The rules a job's ``input`` must follow: every field, default and bound, in one place.

Why this module exists: the handler only routes; what a caller may send is declared here (pydantic
models with unknown fields forbidden) and every violation becomes one sentence in an ``InputError``,
before anything is fetched or loaded. Types are strict: JSON's own types only, nothing converted
(``"seed": "7"``, ``"nfe_step": true`` and ``"remove_silence": 1`` are refused; a whole number is
accepted where a number is expected; NaN and infinities never). A caller who sends the wrong type
has a bug that a silent conversion would hide. The README's job reference is written from these
models.
"""
from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from f5worker.errors import InputError
from f5worker.job_plan import MAX_NFE_STEP, OPTION_DEFAULTS as DEFAULT

MAX_TEXT_CHARS = 2000
MAX_REF_TEXT_CHARS = 500
MAX_SEED = 2**31 - 1
VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.wav$")


def check_voice_name(name: str) -> str:
    """A voice name is a file name, never a path: letters, digits, '.', '_', '-', ending in .wav."""
    if not VOICE_NAME_RE.match(name) or ".." in name:
        raise ValueError("must be a file name such as 'my-voice.wav' (letters, digits, '.', '_', '-', "
                         "at most 100 characters, ending in .wav)")
    return name


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, str_strip_whitespace=True)


class TTSInput(_Input):
    endpoint: Literal["tts"] = "tts"
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    local_voice: str
    ref_text: str | None = Field(default=None, max_length=MAX_REF_TEXT_CHARS)
    speed: float = Field(default=DEFAULT["speed"], ge=0.3, le=3.0)
    nfe_step: int = Field(default=DEFAULT["nfe_step"], ge=1, le=MAX_NFE_STEP)
    cfg_strength: float = Field(default=DEFAULT["cfg_strength"], ge=0.0, le=10.0)
    sway_sampling_coef: float = Field(default=DEFAULT["sway_sampling_coef"], ge=-1.0, le=1.0)
    cross_fade_duration: float = Field(default=DEFAULT["cross_fade_duration"], ge=0.0, le=1.0)
    remove_silence: bool = DEFAULT["remove_silence"]
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    _voice = field_validator("local_voice")(classmethod(lambda cls, v: check_voice_name(v)))


class UploadInput(_Input):
    endpoint: Literal["upload"]
    voice_file_url: str = Field(min_length=1, max_length=4096)
    voice_name: str
    ref_text: str | None = Field(default=None, max_length=MAX_REF_TEXT_CHARS)

    _voice = field_validator("voice_name")(classmethod(lambda cls, v: check_voice_name(v)))


JobInput = Union[TTSInput, UploadInput]
ENDPOINTS = {"tts": TTSInput, "upload": UploadInput}


MAX_FIELD_NAME_SHOWN = 40


def _field_name(loc) -> str:
    """The field as the sentence shows it: an unknown field's name is the caller's text, so line
    breaks, control characters and unpaired surrogates are shown as '?' and a long name is cut."""
    name = ".".join(str(p) for p in loc) or "input"
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= MAX_FIELD_NAME_SHOWN else name[:MAX_FIELD_NAME_SHOWN - 1] + "…"


def _sentence(err: dict) -> str:
    field = _field_name(err["loc"])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        return f"Unknown input field '{field}'."
    if kind == "missing":
        return f"Missing required input '{field}'."
    if kind == "greater_than_equal":
        return f"'{field}' must be at least {ctx['ge']}."
    if kind == "less_than_equal":
        return f"'{field}' must be at most {ctx['le']}."
    if kind == "string_too_long":
        return f"'{field}' is too long: at most {ctx.get('max_length')} characters."
    if kind == "string_too_short":
        return f"'{field}' must not be empty."
    if kind == "string_type":
        return f"'{field}' must be a string."
    if kind == "string_unicode":
        return f"'{field}' must be valid Unicode text (it holds an unpaired surrogate)."
    if kind == "int_type":
        return f"'{field}' must be an integer."
    if kind == "float_type":
        return f"'{field}' must be a number."
    if kind == "finite_number":
        return f"'{field}' must be a finite number."
    if kind == "bool_type":
        return f"'{field}' must be true or false."
    if kind == "value_error":
        return f"'{field}' {str(ctx.get('error', err['msg']))}."
    return f"Invalid '{field}': {err['msg'].lower()}."


def parse_job_input(raw: object) -> JobInput:
    """The job's input as a model, or an InputError naming the first thing wrong."""
    if not isinstance(raw, dict):
        raise InputError("The job input must be a JSON object.")
    endpoint = raw.get("endpoint", "tts")
    model = ENDPOINTS.get(endpoint) if isinstance(endpoint, str) else None
    if model is None:
        raise InputError(f"Unknown endpoint; use one of: {', '.join(ENDPOINTS)}.")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InputError(_sentence(exc.errors(include_url=False)[0])) from None
