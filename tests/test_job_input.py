"""Strict job-input types: every field refuses every JSON type but its own, in one sentence.

``parse_job_input`` is the handler's first step, so a refusal here means nothing was fetched,
loaded or written. Inputs go through ``json.loads`` where it matters, as runpod's do (Python's json
reads ``NaN`` and ``Infinity``).
"""
from __future__ import annotations

import json
import math
import re

import pytest

from f5worker.errors import InputError
from f5worker.jobs.inputs import TTSInput, UploadInput, parse_job_input

TTS = {"text": "Hello there.", "local_voice": "basic_ref_en.wav"}
UPLOAD = {"endpoint": "upload", "voice_file_url": "https://example.com/v.wav", "voice_name": "v.wav"}

STRING_FIELDS = [("tts", "text"), ("tts", "local_voice"), ("tts", "ref_text"),
                 ("upload", "voice_file_url"), ("upload", "voice_base64"), ("upload", "voice_s3_key"),
                 ("upload", "voice_name"), ("upload", "ref_text")]
INT_FIELDS = ["nfe_step", "seed"]
FLOAT_FIELDS = ["speed", "cfg_strength", "sway_sampling_coef", "cross_fade_duration"]
BOOL_FIELDS = ["remove_silence"]

NOT_STRINGS = [7, 1.5, True, False, [], {}, ["a.wav"], {"text": "x"}]
NOT_INTS = ["7", "0x10", 7.0, 7.5, True, False, [], {}, [7]]
NOT_FLOATS = ["1.0", "fast", True, False, [], {}, [1.0]]
NOT_BOOLS = [0, 1, "true", "false", "yes", 1.0, None, [], {}]


def refusal(raw) -> str:
    with pytest.raises(InputError) as caught:
        parse_job_input(raw)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    assert not re.search(r"[.!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message!r}"
    return message


def job(endpoint: str, **fields) -> dict:
    return {**(UPLOAD if endpoint == "upload" else TTS), **fields}


@pytest.mark.parametrize("endpoint, field", STRING_FIELDS)
@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
def test_string_fields_take_only_strings(endpoint, field, value):
    assert refusal(job(endpoint, **{field: value})) == f"'{field}' must be a string."


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", NOT_INTS, ids=repr)
def test_int_fields_take_only_integers(field, value):
    assert refusal(job("tts", **{field: value})) == f"'{field}' must be an integer."


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", NOT_FLOATS, ids=repr)
def test_number_fields_take_only_numbers(field, value):
    assert refusal(job("tts", **{field: value})) == f"'{field}' must be a number."


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["1" + "0" * 400, "-1" + "0" * 400])
def test_number_fields_say_a_number_past_a_floats_range_is_too_far_from_0(field, literal):
    raw = json.loads(json.dumps(job("tts")).rstrip("}") + f', "{field}": {literal}}}')
    assert isinstance(raw[field], int)  # JSON's integers have no bound
    assert refusal(raw) == f"'{field}' is too far from 0 to be a number."


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_number_fields_refuse_nan_and_infinity(field, literal):
    raw = json.loads(json.dumps(job("tts")).rstrip("}") + f', "{field}": {literal}}}')
    assert not math.isfinite(raw[field])  # really what a JSON body can carry
    assert refusal(raw) == f"'{field}' must be a finite number."


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_bool_fields_take_only_true_or_false(field, value):
    assert refusal(job("tts", **{field: value})) == f"'{field}' must be true or false."


@pytest.mark.parametrize("value", [None, "", 7, True, ["tts"], {"name": "tts"}])
def test_endpoint_must_be_a_known_name(value):
    assert refusal({**TTS, "endpoint": value}) == (
        "Unknown endpoint; use one of: tts, upload, list_voices, delete_voice, voice_info, list_models.")


def test_optional_fields_take_null():
    parsed = parse_job_input(job("tts", ref_text=None, seed=None))
    assert isinstance(parsed, TTSInput) and parsed.ref_text is None and parsed.seed is None
    parsed = parse_job_input(job("upload", ref_text=None))
    assert isinstance(parsed, UploadInput) and parsed.ref_text is None


def test_required_fields_refuse_null():
    assert refusal(job("tts", text=None)) == "'text' must be a string."
    assert refusal(job("upload", voice_name=None)) == "'voice_name' must be a string."


def test_right_types_pass_whole_numbers_count_as_numbers():
    parsed = parse_job_input(json.loads(json.dumps(job(
        "tts", speed=1, cfg_strength=0, sway_sampling_coef=-1, cross_fade_duration=0.5,
        nfe_step=8, seed=0, remove_silence=True))))
    assert parsed.speed == 1.0 and isinstance(parsed.speed, float)
    assert parsed.cfg_strength == 0.0 and parsed.sway_sampling_coef == -1.0
    assert parsed.nfe_step == 8 and parsed.seed == 0 and parsed.remove_silence is True


def test_type_is_checked_before_bounds():
    assert refusal(job("tts", nfe_step="0")) == "'nfe_step' must be an integer."
    assert refusal(job("tts", nfe_step=0)) == "'nfe_step' must be at least 1."
    assert refusal(job("tts", seed=-1.5)) == "'seed' must be an integer."


@pytest.mark.parametrize("name", ["bad\nfield\r", "x" * 500, "\ud800tab\t"])
def test_an_unknown_field_name_is_shown_on_one_line(name):
    with pytest.raises(InputError) as caught:
        parse_job_input({"text": "Hi.", "local_voice": "basic_ref_en.wav", name: 1})
    message = str(caught.value)
    assert message.isprintable() and len(message) < 80 and message.endswith(".")
    assert message.startswith(("Unknown input field '", "A field's name is not valid Unicode text"))


def test_text_with_an_unpaired_surrogate_is_refused_in_our_words():
    with pytest.raises(InputError, match="^'text' must be valid Unicode text"):
        parse_job_input({"text": "Hi \ud800.", "local_voice": "basic_ref_en.wav"})


INVISIBLE = ["\u200b\u200b", "\ufeff", "\x00\x01\x02", "\xad", " \u2060\u200d ", "\u0301"]


@pytest.mark.parametrize("text", INVISIBLE, ids=ascii)
def test_a_text_of_invisible_characters_only_has_nothing_to_speak(text):
    """Spaces are stripped and refused as empty; a zero-width space, a byte-order mark, a soft
    hyphen, control characters or a mark alone say nothing either (the job sampled noise)."""
    assert refusal(job("tts", text=text)).startswith("'text' has nothing to speak")
    assert parse_job_input(job("tts", text=f"Hi{text}there.")).text == f"Hi{text}there."
    assert parse_job_input(job("tts", text="...")).text == "..."  # punctuation is the caller's to say


@pytest.mark.parametrize("text", INVISIBLE, ids=ascii)
def test_a_voice_part_of_invisible_characters_only_is_left_out(text):
    voices = {"b": "b.wav"}
    parsed = parse_job_input(job("tts", text=f"Hello.[b]{text}", voices=voices))
    assert parsed.segments() == [("basic_ref_en.wav", "Hello.")]
    assert refusal(job("tts", text=f"[b]{text}", voices=voices)) == "The text has nothing to speak besides its voice tags."


@pytest.mark.parametrize("endpoint", ["tts", "upload"])
@pytest.mark.parametrize("ref_text", INVISIBLE, ids=ascii)
def test_a_ref_text_of_invisible_characters_only_is_not_given(endpoint, ref_text):
    """As one of spaces: the voice's stored transcript (or Whisper's) is used, and an upload stores
    none that says nothing."""
    assert parse_job_input(job(endpoint, ref_text=ref_text)).ref_text is None
    assert parse_job_input(job(endpoint, ref_text=f"Yes{ref_text}.")).ref_text == f"Yes{ref_text}."


def test_options_and_their_defaults_are_the_synthesis_requests():
    """One definition: the job input's optional synthesis fields default to SynthesisRequest's, and
    nfe_step is bounded by the fast path's on-device step table (MAX_NFE_STEP + 1 time points)."""
    from dataclasses import fields as dataclass_fields

    from f5worker.jobs.plan import SynthesisRequest
    from f5worker.inference.items import MAX_NFE_STEP
    from f5worker.jobs.options import OPTION_DEFAULTS

    fields = TTSInput.model_fields
    assert OPTION_DEFAULTS and all(fields[name].default == value for name, value in OPTION_DEFAULTS.items())
    request_defaults = {f.name: f.default for f in dataclass_fields(SynthesisRequest)}
    assert all(request_defaults[name] == value for name, value in OPTION_DEFAULTS.items())
    base = {"text": "Hi.", "local_voice": "a.wav"}
    assert parse_job_input({**base, "nfe_step": MAX_NFE_STEP}).nfe_step == MAX_NFE_STEP
    with pytest.raises(InputError, match=f"at most {MAX_NFE_STEP}"):
        parse_job_input({**base, "nfe_step": MAX_NFE_STEP + 1})


@pytest.mark.parametrize(("digits", "value"), [("7", 7), ("-7", -7), ("0", 0), ("0" * 5000 + "5", 5),
                                               ("9" * 5000, 10**20), ("-" + "9" * 5000, -10**20)])
def test_an_integer_past_int_s_digit_limit_is_read_past_every_bound(digits, value):
    """int() refuses 4,301 digits, leading zeros counted; such a value meets its field's bound instead."""
    from f5worker.jobs.inputs import int_in_reach, loads_input

    assert int_in_reach(digits) == value
    if not digits.lstrip("-").startswith("0") or digits == "0":  # JSON has no leading zeros
        assert loads_input(f'{{"seed": {digits}}}') == {"seed": value}
