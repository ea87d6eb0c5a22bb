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

import json
import re
import unicodedata
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from f5worker.jobs.encoding import DEFAULT_FORMAT, EXTENSIONS, FORMATS, SAMPLE_RATES, one_of
from f5worker.jobs.subtitles import SUBTITLE_EXTENSIONS, SUBTITLE_FORMATS
from f5worker.errors import InputError, shown
from f5worker.inference.items import MAX_NFE_STEP
from f5worker.jobs.options import OPTION_DEFAULTS as DEFAULT
from f5worker.jobs.options import VERIFY_MAX_RETRIES
from f5worker.model.constants import SAMPLE_RATE

MAX_TEXT_CHARS = 100_000  # a chapter: about 100 minutes of speech, assembled on disk (jobs.assembly)
MAX_REF_TEXT_CHARS = 500
MAX_SEED = 2**31 - 1
VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.wav\Z")
VOICE_SOURCES = ("voice_file_url", "voice_base64", "voice_s3_key")
MAX_S3_KEY_CHARS = 1100  # "s3://", a bucket name (at most 63) and a key (at most 1024 bytes)
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
MAX_OUTPUT_KEY_CHARS = 200
MAX_MODEL_NAME_CHARS = 64  # as f5worker.env_values.MODEL_NAME allows; which names exist: model.registry
# A name starts with a letter or digit and does not end in '.' (which would give "a..wav").
OUTPUT_KEY_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")
# A script in several voices (f5-tts's CLI syntax): ``voices`` maps aliases to stored voices, and a
# ``[alias]`` in the text switches to that voice.
MAX_SCRIPT_VOICES = 8
VOICE_ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
VOICE_TAG_RE = re.compile(r"\[([A-Za-z0-9_-]{1,32})\]")
TIMESTAMPS = ("word",)
# Every stored output's ending: the audio's, and its subtitle file's beside it (same key).
STORED_EXTENSIONS = EXTENSIONS + SUBTITLE_EXTENSIONS


def check_spoken_length(texts: list[str]) -> None:
    """Refuse a text that speaks more than a job may once its numbers are words (``normalize``
    writes a run of digits as up to ten times its length): before any model call, not at the
    deadline."""
    chars = sum(map(len, texts))
    if chars > MAX_TEXT_CHARS:
        raise InputError(f"With its numbers written as words the text is {chars:,} characters, more than the "
                         f"{MAX_TEXT_CHARS:,} a job speaks: send it in parts, or without normalize.")


def check_voice_name(name: str) -> str:
    """A voice name is a file name, never a path: letters, digits, '.', '_', '-', ending in .wav."""
    if not VOICE_NAME_RE.match(name) or ".." in name:
        raise ValueError("must be a file name such as 'my-voice.wav' (letters, digits, '.', '_', '-', "
                         "starting with a letter or digit, no '..', at most 100 characters, ending in .wav)")
    return name


def check_output_key(key: str) -> str:
    """A caller's output name (``campaign-7/line-12``) or prefix (``campaign-7/``), to be placed
    under ``output/``: plain names separated by single slashes, never a path that could leave it.
    The same rule holds on S3 and on a local folder, where a file and a folder cannot share a name:
    every stored file's name ends in an output extension and no folder's may, so the two never meet
    (``clash`` stores ``output/clash.wav``; ``clash.wav/y`` is refused, not stored beside it)."""
    if key.startswith("/"):
        raise ValueError("must be relative (it is placed under output/), so it cannot start with '/'")
    if "\\" in key:
        raise ValueError("must separate names with '/', not '\\'")
    if ".." in key:
        raise ValueError("must not contain '..'")
    names = (key[:-1] if key.endswith("/") else key).split("/")
    if not all(OUTPUT_KEY_NAME_RE.fullmatch(name) for name in names):
        raise ValueError("may hold only names of letters, digits, '.', '_' and '-', each starting with a "
                         "letter or digit and not ending in '.', separated by single '/'")
    file_name = None if key.endswith("/") else names[-1]
    extension = output_extension(file_name or "")
    if extension is not None:
        raise ValueError(f"gets its extension from output_format, so leave '{extension}' off")
    extension = next(filter(None, map(output_extension, names if file_name is None else names[:-1])), None)
    if extension is not None:
        raise ValueError(f"must not have a folder whose name ends in '{extension}', the ending of stored "
                         "files, since one could stand where the folder should; rename the folder")
    return key


def speakable(text: str) -> bool:
    """Whether ``text`` holds anything to say: a letter, digit, symbol or punctuation mark. Spaces,
    marks alone and invisible characters (a zero-width space, a byte-order mark, a soft hyphen,
    control characters) say nothing, so a text of only those would be sampled as noise."""
    return any(unicodedata.category(c)[0] in "LNSP" for c in text)


def check_text(text: str) -> str:
    if not speakable(text):
        raise ValueError("has nothing to speak: it holds no letter, digit, symbol or punctuation mark, only "
                         "spaces or invisible characters")
    return text


def given_ref_text(ref_text: str | None) -> str | None:
    """A ``ref_text`` with nothing to say in it (spaces, invisible characters) is not given: the
    voice's stored transcript, or Whisper's, is used, and none is stored that says nothing."""
    return ref_text if ref_text is not None and speakable(ref_text) else None


def output_extension(name: str) -> str | None:
    """The output extension ``name`` ends in (any format's, any case), or None."""
    return next((ext for ext in STORED_EXTENSIONS if name.lower().endswith(ext)), None)


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
    output_format: str = DEFAULT_FORMAT
    sample_rate: int = SAMPLE_RATE  # after output_format: its check reads the format
    return_base64: bool | None = None  # None: inline only where result URLs are local (file://)
    output_key: str | None = Field(default=None, min_length=1, max_length=MAX_OUTPUT_KEY_CHARS)
    stream: bool = False  # audio sent while synthesised: needs F5_STREAMING on the endpoint
    voices: dict[str, str] | None = None  # alias -> voice name; [alias] tags in the text switch voices
    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_NAME_CHARS)  # registered name
    normalize: bool = False  # numbers, dates, times, currencies and units spoken as words (jobs.normalize)
    verify: bool = False  # each chunk transcribed and judged, sampled again if it fails (jobs.verify)
    verify_max_error: float | None = Field(default=None, gt=0.0, le=1.0)  # None: VERIFY_DEFAULT_MAX_ERROR
    verify_retries: int | None = Field(default=None, ge=0, le=VERIFY_MAX_RETRIES)  # None: VERIFY_DEFAULT_RETRIES
    timestamps: str | None = None  # "word": each segment's words with their times (inference.alignment)
    subtitles: str | None = None  # "srt" or "vtt": a subtitle file stored beside the audio (jobs.subtitles)

    _voice = field_validator("local_voice")(classmethod(lambda cls, v: check_voice_name(v)))
    _text = field_validator("text")(classmethod(lambda cls, v: check_text(v)))
    _ref_text = field_validator("ref_text")(classmethod(lambda cls, v: given_ref_text(v)))
    _output_key = field_validator("output_key")(classmethod(lambda cls, v: check_output_key(v)))

    @field_validator("output_format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        if name not in FORMATS:
            raise ValueError(f"must be {one_of(FORMATS)}")
        return name

    @field_validator("timestamps", "subtitles")
    @classmethod
    def _known_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        choices = {"timestamps": TIMESTAMPS, "subtitles": SUBTITLE_FORMATS}[info.field_name]
        if value is not None and value not in choices:
            raise ValueError(f"must be {one_of(repr(c) for c in choices)} (or left out)")
        return value

    @property
    def aligned(self) -> bool:
        """Whether the job's words are aligned: for their times, or for its subtitles."""
        return self.timestamps is not None or self.subtitles is not None

    @field_validator("sample_rate")
    @classmethod
    def _rate_the_format_takes(cls, rate: int, info: ValidationInfo) -> int:
        fmt = FORMATS.get(info.data.get("output_format", ""))
        if rate not in SAMPLE_RATES:
            raise ValueError(f"must be {one_of(SAMPLE_RATES)} (Hz)")
        if fmt is not None and rate not in fmt.sample_rates:
            raise ValueError(f"must be {one_of(fmt.sample_rates)} for {fmt.name} audio")
        return rate

    @field_validator("voices")
    @classmethod
    def _aliases(cls, voices: dict[str, str] | None) -> dict[str, str] | None:
        if voices is None:
            return None
        if not 1 <= len(voices) <= MAX_SCRIPT_VOICES:
            raise ValueError(f"must name 1 to {MAX_SCRIPT_VOICES} voices")
        for alias, name in voices.items():
            if not VOICE_ALIAS_RE.fullmatch(alias):
                raise ValueError("may use only aliases of 1 to 32 letters, digits, '_' or '-' (such as 'narrator')")
            try:
                check_voice_name(name)
            except ValueError as err:
                raise ValueError(f"maps '{alias}' to a voice name that {err}") from None
        return voices

    @model_validator(mode="after")
    def _verified(self):
        for knob in ("verify_max_error", "verify_retries"):
            if getattr(self, knob) is not None and not self.verify:
                raise PydanticCustomError("sentence", f"'{knob}' only applies with 'verify': true; set that too, "
                                                      "or leave it out.")
        return self

    @model_validator(mode="after")
    def _streamable(self):
        if self.stream and self.remove_silence:
            raise PydanticCustomError(
                "sentence", "Silences are removed from the whole audio at once, so 'remove_silence' "
                            "cannot be used with 'stream'; leave one of them out.")
        return self

    @model_validator(mode="after")
    def _tags_name_voices(self):
        if self.voices is None:
            return self
        tags = VOICE_TAG_RE.findall(self.text)
        unknown = next((n for n, tag in enumerate(tags, 1) if tag not in self.voices), None)
        if unknown is not None:
            # Said by its position, not quoted: an error sentence is logged, and the text is the caller's.
            known = one_of([f"[{alias}]" for alias in self.voices])
            raise PydanticCustomError(
                "sentence", f"Voice tag {unknown} of the text names no voice in 'voices'; use {known}.")
        if not self.segments():
            raise PydanticCustomError("sentence", "The text has nothing to speak besides its voice tags.")
        return self

    def segments(self) -> list[tuple[str, str]]:
        """The text as (voice name, text) parts, in order. Without ``voices``, all of it in
        ``local_voice`` (a ``[word]`` is text); with it, text before the first tag is in
        ``local_voice`` and each ``[alias]`` switches to ``voices[alias]``; parts with nothing to
        speak (``speakable``) are left out."""
        if self.voices is None:
            return [(self.local_voice, self.text)]
        parts = VOICE_TAG_RE.split(self.text)  # text, alias, text, alias, ..., text
        names = [self.local_voice, *(self.voices[alias] for alias in parts[1::2])]
        return [(name, text.strip()) for name, text in zip(names, parts[0::2]) if speakable(text)]


class UploadInput(_Input):
    endpoint: Literal["upload"]
    # Exactly one source; the size cap (F5_MAX_VOICE_BYTES) and the rules for where a key may
    # point are the worker's settings, checked by the upload job.
    voice_file_url: str | None = Field(default=None, min_length=1, max_length=4096)
    voice_base64: str | None = Field(default=None, min_length=1)
    voice_s3_key: str | None = Field(default=None, min_length=1, max_length=MAX_S3_KEY_CHARS)
    voice_name: str
    ref_text: str | None = Field(default=None, max_length=MAX_REF_TEXT_CHARS)

    _voice = field_validator("voice_name")(classmethod(lambda cls, v: check_voice_name(v)))
    _ref_text = field_validator("ref_text")(classmethod(lambda cls, v: given_ref_text(v)))

    @model_validator(mode="after")
    def _one_source(self):
        if sum(getattr(self, name) is not None for name in VOICE_SOURCES) != 1:
            raise PydanticCustomError(
                "sentence", "Give exactly one of 'voice_file_url', 'voice_base64' or 'voice_s3_key'.")
        return self

    @property
    def source(self) -> str:
        """Which of ``VOICE_SOURCES`` the voice comes from."""
        return next(name for name in VOICE_SOURCES if getattr(self, name) is not None)


class ListVoicesInput(_Input):
    endpoint: Literal["list_voices"]
    limit: int = Field(default=DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)
    cursor: str | None = Field(default=None, min_length=1, max_length=2048)
    details: bool = True


class ListModelsInput(_Input):
    endpoint: Literal["list_models"]


class DeleteVoiceInput(_Input):
    endpoint: Literal["delete_voice"]
    voice_name: str

    _voice = field_validator("voice_name")(classmethod(lambda cls, v: check_voice_name(v)))


class VoiceInfoInput(_Input):
    endpoint: Literal["voice_info"]
    voice_name: str

    _voice = field_validator("voice_name")(classmethod(lambda cls, v: check_voice_name(v)))


JobInput = Union[TTSInput, UploadInput, ListVoicesInput, DeleteVoiceInput, VoiceInfoInput, ListModelsInput]
ENDPOINTS = {"tts": TTSInput, "upload": UploadInput, "list_voices": ListVoicesInput,
             "delete_voice": DeleteVoiceInput, "voice_info": VoiceInfoInput, "list_models": ListModelsInput}


PAST_EVERY_BOUND = 10**20  # larger than any field's bound


def int_in_reach(digits: str) -> int:
    """An integer's digits (a JSON number, a query value) past 20 is past every bound, so it is read
    as ``PAST_EVERY_BOUND`` (its sign kept) and refused by its field's bound, not by int(), which
    fails past 4,300 digits."""
    sign = -1 if digits.startswith("-") else 1
    significant = digits.lstrip("-").lstrip("0") or "0"  # int() counts leading zeros towards its limit
    return sign * (int(significant) if len(significant) <= 20 else PAST_EVERY_BOUND)


def loads_input(data: str | bytes) -> object:
    """JSON as a job's input is read where this worker reads it (an HTTP body, a test input file;
    runpod reads the queue's): ValueError for anything that is not JSON, nested too deep included."""
    try:
        return json.loads(data, parse_int=int_in_reach)
    except RecursionError:  # nested past Python's depth
        raise ValueError("nested too deeply") from None


def _field_name(loc) -> str:
    """The field as the sentence shows it: an unknown field's name is the caller's text."""
    return shown(".".join(str(p) for p in loc) or "input")


def _sentence(err: dict) -> str:  # noqa: C901 - one sentence per pydantic error kind
    field = _field_name(err["loc"])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "sentence":  # a rule over several fields, already worded as the sentence
        return err["msg"]
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
        if not err["loc"]:  # a field's name, not its value
            return "A field's name is not valid Unicode text (it holds an unpaired surrogate)."
        return f"'{field}' must be valid Unicode text (it holds an unpaired surrogate)."
    if kind == "int_type":
        return f"'{field}' must be an integer."
    if kind == "float_type":
        if isinstance(err.get("input"), int) and not isinstance(err["input"], bool):  # past a float's range
            return f"'{field}' is too far from 0 to be a number."
        return f"'{field}' must be a number."
    if kind == "finite_number":
        return f"'{field}' must be a finite number."
    if kind == "bool_type":
        return f"'{field}' must be true or false."
    if kind == "dict_type":
        return f"'{field}' must be an object."
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
        raise InputError(f"Unknown endpoint; use one of: {', '.join(ENDPOINTS)}.", param="endpoint")
    return parse_model(model, raw)


def parse_model(model: type[BaseModel], raw: dict, rename: dict[str, str] | None = None):
    """``raw`` as ``model``, or an InputError naming the first thing wrong; ``rename`` gives fields
    the names the caller knows them by (the HTTP face's ``input`` for ``text``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple((rename or {}).get(part, part) if isinstance(part, str) else part for part in err["loc"])
        err = {**err, "loc": loc}
        raise InputError(_sentence(err), param=_field_name(loc) if loc else None) from None
