"""Property test: a thousand generated job inputs thrown at the in-process handler.

Why this test exists: no input, however odd, may make a job end in anything but
a valid result or one ``{"error": sentence}``, leave a file behind, leak a secret, or stop the
worker serving. Hypothesis generates the inputs (derandomised, so CI sees the same thousand every
run): every field with right and wrong JSON types and values, text in many scripts and lengths,
voice names good and bad, upload URLs to good and bad audio on a loopback server and URLs that
must be refused. Each example is checked, the failures are collected rather than raised one at a
time, and the counts go to tests/RELIABILITY.md before the test passes or fails.

Cost control (the model runs on the CPU): valid jobs use ``nfe_step`` 1 to 4, and long valid texts
use 1 step at speed 2 to 3 (fewer frames); the default 32 steps appears once, as an explicit example.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import math
import os
import re
import secrets
import string
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit
from urllib.request import url2pathname

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from f5worker.jobs import download
from f5worker.jobs.inputs import MAX_REF_TEXT_CHARS, MAX_SEED, MAX_TEXT_CHARS
from f5worker.settings import ENV_ALLOW_PRIVATE_URLS, ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY
from tests.fixtures_models import SR, speechlike
from tests.fixtures_worker import worker_ctx
from tests.reliability_report import provenance, sentence_problems, table, write_section

pytestmark = pytest.mark.usefixtures("loopback_only")

EXAMPLES = 1000
COMMAND = "pytest tests/test_reliability_property.py"
TTS_OUTPUT = {"audio_url", "duration", "sample_rate", "output_key", "voice", "seed", "chunks", "model", "ref_text_source",
              "format", "content_type", "bytes", "timings", "rtf", "segments"}
# Local storage returns the audio inline by default, or says why it could not.
TTS_INLINE = ("audio_base64", "audio_base64_omitted")
SUBTITLES_OUTPUT = {"subtitles_url", "subtitles_key"}  # jobs that ask for "subtitles"
UPLOAD_OUTPUT = {"voice_name", "voice_key", "duration", "source_duration", "sample_rate", "ref_text"}
BUILTINS = ("basic_ref_en.wav", "basic_ref_zh.wav")
SEEDED_VOICE = "prop-a.wav"  # uploaded before the examples run: always there
VOICE_POOL = (SEEDED_VOICE, "prop-b.wav", "prop-c.wav")  # the others exist only once an example uploads them
# Stand-ins for the worker's credentials (its storage is local): no error may ever show them.
CANARY_KEY_ID = "AKCANARY" + secrets.token_hex(6).upper()
CANARY_SECRET = "canary-" + secrets.token_urlsafe(24)


# --- text in many scripts ---------------------------------------------------------------------------
def _chars(*ranges: tuple[int, int], extra: str = "") -> str:
    return "".join(chr(c) for lo, hi in ranges for c in range(lo, hi + 1)) + extra


SCRIPTS: dict[str, str] = {
    "latin": string.ascii_letters + "     ,.!?'-éàüßñøç",
    "cjk": _chars((0x4E00, 0x4FFF), extra="，。！？、；："),
    "thai": _chars((0x0E01, 0x0E3A), (0x0E40, 0x0E4E)),
    "arabic": _chars((0x0621, 0x064A), extra=" ،؟"),
    "devanagari": _chars((0x0905, 0x0939), (0x093E, 0x094D), extra=" ।"),
    "cyrillic": _chars((0x0410, 0x044F), extra=" ,."),
    "hangul": _chars((0xAC00, 0xAD00), extra=" ."),
    "combining": "aeiouxyz" + _chars((0x0300, 0x036F)),
    "punctuation": string.punctuation + "…—–«»„“”‘’¡¿。，！？",
    "whitespace": " \t\n\r\u00a0\u2003\u3000\u2028\u200b",
    "digits": string.digits + "٠١٢٣४५",
    "control": "\x00\x01\x07\x1b\x7f\u200e\u202e\ufeff\ufffd",
}
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🧑🏿‍🚀", "🏳️‍🌈", "🙂", "🎉"]
SURROGATES = "\ud800\udbff\udc00\udfff"  # valid in JSON ("\ud800"), not encodable as UTF-8

unit = st.one_of(
    *[st.text(alphabet, min_size=1, max_size=12) for alphabet in SCRIPTS.values()],
    st.lists(st.sampled_from(EMOJI), min_size=1, max_size=6).map("".join),
    st.text(min_size=1, max_size=12),  # any code point hypothesis likes
    st.text(SURROGATES + "ab", min_size=1, max_size=4),
)
segment = st.tuples(unit, st.integers(1, 300)).map(lambda pair: pair[0] * pair[1])
# The longest valid text here: every example runs on the CPU, and chapter-length jobs (up to
# MAX_TEXT_CHARS) have their own test (tests/test_long_jobs.py).
LONG_VALID_CHARS = 2000
TARGET_LENGTHS = [None, None, None, 1, 2, 10, 135, 136, 500, 1999, LONG_VALID_CHARS, LONG_VALID_CHARS + 1, 5000]


@st.composite
def any_text(draw) -> str:
    text = "".join(draw(st.lists(segment, min_size=1, max_size=4)))
    target = draw(st.sampled_from(TARGET_LENGTHS))
    if target is not None:
        text = (text * (target // max(len(text), 1) + 1))[:target]
    return text


MARK_RUN = re.compile(r"[\u0300-\u036f]{8,}")


def speakable(text: str) -> bool:
    """Has a letter and nothing a well-behaved worker may refuse (controls, surrogates, format chars)."""
    categories = {unicodedata.category(c) for c in text}
    return (any(cat.startswith("L") for cat in categories) and not categories & {"Cs", "Co", "Cn"}
            and all(c in "\t\n\r" or unicodedata.category(c) != "Cc" for c in text)
            and not MARK_RUN.search(text))  # a "character" of dozens of stacked marks may be refused



@st.composite
def valid_text(draw, max_chars: int = LONG_VALID_CHARS, short: bool = False) -> str:
    """Text the schema accepts; mostly short, sometimes up to the limit."""
    text = draw(any_text()).strip()
    limit = 200 if short else draw(st.sampled_from([60] * 30 + [200] * 6 + [800, max_chars]))
    text = text[:min(limit, max_chars)].strip()
    return text or draw(st.sampled_from(["Hello there.", "你好。", "สวัสดี", "a"]))


# --- field values: good, out of range, wrong JSON type --------------------------------------------
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)
NOT_A_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.just("1.0"), st.just([1]), st.just({}))
NOT_AN_INT = st.one_of(NOT_A_NUMBER, st.sampled_from([2.0, 2.5, 1e3]))
NOT_A_STR = st.one_of(st.booleans(), st.integers(), st.floats(), st.just(["a"]), st.just({"a": 1}))
NOT_A_BOOL = st.one_of(st.none(), st.sampled_from([0, 1, "true", "false", "yes", 1.0, []]))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def number_field(lo, hi, valid_lo=None, valid_hi=None):
    """(valid, out of range, wrong type) strategies for a number field bounded by [lo, hi]."""
    valid = st.one_of(st.floats(valid_lo if valid_lo is not None else lo, valid_hi if valid_hi is not None else hi),
                      st.sampled_from([lo, hi]))
    bad = st.one_of(st.floats(max_value=lo, exclude_max=True, allow_infinity=False, allow_nan=False),
                    st.floats(min_value=hi, exclude_min=True, allow_infinity=False, allow_nan=False), NON_FINITE)
    return valid, bad, NOT_A_NUMBER


GOOD_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\.wav\Z")
BAD_NAMES = st.one_of(
    st.sampled_from(["../secret.wav", "voices/../x.wav", "/etc/passwd", "..wav", ".wav", "x.WAV", "x.wav/",
                     "x.wav\x00", "x .wav", "x\n.wav", "a" * 101 + ".wav", "名前.wav", "ｘ.wav", "x.wav ",
                     "%2e%2e%2fx.wav", "C:\\x.wav", "x..wav", "", " ", "x", "voices/x.wav"]),
    st.text(max_size=30).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.wav", s.strip())),
)

TTS_FIELDS = {  # name: (valid, out of range / bad value, wrong type)
    "speed": number_field(0.3, 3.0),
    "cfg_strength": number_field(0.0, 10.0, 0.0, 3.0),
    "sway_sampling_coef": number_field(-1.0, 1.0),
    "cross_fade_duration": number_field(0.0, 1.0),
    "nfe_step": (st.integers(1, 4), st.sampled_from([0, -1, 65, 1000, 2**63]), NOT_AN_INT),
    "seed": (st.one_of(st.none(), st.integers(0, MAX_SEED)), st.sampled_from([-1, MAX_SEED + 1, 2**64]), NOT_AN_INT
             .filter(lambda v: v is not None)),
    "remove_silence": (st.booleans(), st.nothing(), NOT_A_BOOL),
    "timestamps": (st.one_of(st.none(), st.just("word")), st.sampled_from(["char", "Word", "", "words"]), NOT_A_STR),
    "subtitles": (st.one_of(st.none(), st.sampled_from(["srt", "vtt"])), st.sampled_from(["ass", "SRT", "", ".vtt"]),
                  NOT_A_STR),
    "ref_text": (st.one_of(st.none(), valid_text(MAX_REF_TEXT_CHARS, short=True)),
                 st.text(min_size=1, max_size=3).map(lambda u: (u * 600)[:MAX_REF_TEXT_CHARS + 1 + len(u)])
                 .filter(lambda s: len(s.strip()) > MAX_REF_TEXT_CHARS), NOT_A_STR),
    "text": (valid_text(), st.one_of(st.sampled_from(["", "   ", "\n\t", "\u3000"]),
                                     st.text("ab ", min_size=1, max_size=3).map(lambda u: u * (MAX_TEXT_CHARS // len(u) + 2))
                                     .filter(lambda s: len(s.strip()) > MAX_TEXT_CHARS)), NOT_A_STR),
    "local_voice": (st.sampled_from(BUILTINS + (SEEDED_VOICE,)), st.one_of(BAD_NAMES, st.just("nobody-here.wav")),
                    NOT_A_STR),
}
UPLOAD_FIELDS = {
    "voice_name": (st.sampled_from(VOICE_POOL), BAD_NAMES, NOT_A_STR),
    "ref_text": TTS_FIELDS["ref_text"],
}
REQUIRED = {"tts": ("text", "local_voice"), "upload": ("voice_file_url", "voice_name")}


# --- the cases --------------------------------------------------------------------------------------
@dataclass
class Case:
    mode: str  # "valid", "bad <kind>" or "chaos"
    job: object  # the job input as sent
    job_id: object = None  # None: a fresh safe id
    expect: str = "any"  # "ok", "refused" or "any"


def upload_urls(base: str):
    """(good audio URLs, URLs that must end in a refusal)."""
    good = [f"{base}/{name}" for name in ("good.wav", "stereo44k.wav", "good.flac", "good.ogg", "good.mp3")]
    bad = [f"{base}/{name}" for name in ("short.wav", "long.wav", "notaudio.txt", "noise.wav", "truncated.wav",
                                         "missing.wav", "_empty", "_status/500", "_status/403", "_loop", "_short",
                                         "_huge", "_chunked?n=3000", "_chain/6/good.wav", "_redirect_nolocation")]
    port = urlsplit(base).port
    bad += [f"{base}/_redirect?to={quote(target, safe='')}" for target in
            ("http://169.254.169.254/latest/meta-data/", "ftp://127.0.0.1/x.wav", "file:///etc/passwd")]
    bad += ["http://169.254.169.254/latest/meta-data/iam", "http://10.0.0.1/x.wav", "http://192.168.1.1/x.wav",
            "http://[fd00::1]/x.wav", "http://[fe80::1]/x.wav", f"http://127.0.0.2:{port}/good.wav",
            f"http://[::1]:{port}/good.wav", "http://0.0.0.0/x.wav", "http://[::ffff:10.0.0.1]/x.wav",
            "ftp://127.0.0.1/x.wav", "file:///etc/passwd", "gopher://127.0.0.1/", "javascript:alert(1)",
            "data:audio/wav;base64,UklGRg==", "127.0.0.1/x.wav", "http://", "http:///x.wav", "http://[::1",
            f"http://user:pw@127.0.0.1:{port}/good.wav", "http://127.0.0.1:99999/x.wav",
            f"https://127.0.0.1:{port}/good.wav", "http://127.0.0.1:1/x.wav", " ", f"{base}/go\nod.wav",
            f"{base}/../../etc/passwd", "http://127.0.0.1:" + "9" * 30 + "/"]
    return good, bad


def case_strategy(base: str):  # noqa: C901 - one strategy per fault kind
    good_urls, bad_urls = upload_urls(base)
    upload_fields = {**UPLOAD_FIELDS, "voice_file_url": (st.sampled_from(good_urls), st.sampled_from(bad_urls),
                                                         NOT_A_STR)}

    @st.composite
    def valid_job(draw, endpoint: str) -> dict:
        fields = TTS_FIELDS if endpoint == "tts" else upload_fields
        job = {"endpoint": endpoint} if endpoint == "upload" or draw(st.booleans()) else {}
        for name, (valid, _bad, _wrong) in fields.items():
            if name in REQUIRED[endpoint] or draw(st.integers(0, 2)):  # optional fields: present 2 times in 3
                job[name] = draw(valid)
        if endpoint == "tts":
            job.setdefault("nfe_step", draw(st.integers(1, 4)))  # the default (32) costs too much on a CPU
            if len(job["text"]) > 60:
                job.update(nfe_step=1, speed=draw(st.floats(2.0, 3.0)))
        else:
            if job.get("ref_text") is None:  # Whisper is tried by the "no transcript" cases
                job["ref_text"] = draw(valid_text(MAX_REF_TEXT_CHARS, short=True))
        return job

    @st.composite
    def valid_case(draw) -> Case:
        endpoint = draw(st.sampled_from(["tts"] * 4 + ["upload"]))
        job = draw(valid_job(endpoint))
        texts = [job.get("text"), job.get("ref_text")]
        return Case("valid", job, expect="ok" if all(speakable(t) for t in texts if t is not None) else "any")

    @st.composite
    def bad_case(draw) -> Case:
        endpoint = draw(st.sampled_from(["tts"] * 3 + ["upload"]))
        fields = TTS_FIELDS if endpoint == "tts" else upload_fields
        job = draw(valid_job(endpoint))
        kind = draw(st.sampled_from(["value"] * 6 + ["type"] * 6 + ["missing"] * 2 + ["unknown"] * 2
                                    + ["endpoint"] * 2 + ["no transcript"]))
        name = draw(st.sampled_from(sorted(fields)))
        if kind == "value":
            bad = fields[name][1]
            if bad.is_empty:
                name, bad = "nfe_step", TTS_FIELDS["nfe_step"][1]
                job["endpoint"] = "tts"
                job = {k: v for k, v in job.items() if k in TTS_FIELDS or k == "endpoint"}
                job.setdefault("text", "Hello.")
                job.setdefault("local_voice", BUILTINS[0])
            job[name] = draw(bad)
            expect = "refused"
        elif kind == "type":
            job[name] = draw(fields[name][2])
            expect = "refused"
        elif kind == "missing":
            del job[draw(st.sampled_from(REQUIRED[endpoint]))]
            expect = "refused"
        elif kind == "unknown":
            key = draw(st.one_of(st.sampled_from(["volume", "Text", "text ", "__proto__", "", "endpoint2", "voice"]),
                                 st.text(max_size=12)))
            if key in fields or key == "endpoint":
                key += "_x"
            job[key] = draw(JSON_ANY)
            expect = "refused"
        elif kind == "endpoint":
            job["endpoint"] = draw(st.one_of(st.sampled_from(["TTS", "Upload", "delete", "", "tts ", "../tts"]),
                                             NOT_A_STR, st.none()))
            expect = "refused"
        else:  # an upload with no ref_text: Whisper transcribes (or finds no speech: a refusal)
            job = {k: v for k, v in draw(valid_job("upload")).items() if k != "ref_text"}
            expect = "any"
        return Case(f"bad {kind}", job, expect=expect)

    @st.composite
    def chaos_case(draw) -> Case:
        shape = draw(st.sampled_from(["dict", "dict", "dict", "scalar", "list"]))
        if shape == "scalar":
            job = draw(JSON_SCALARS)
        elif shape == "list":
            job = draw(st.lists(JSON_ANY, max_size=3))
        else:
            keys = st.one_of(st.sampled_from(sorted(TTS_FIELDS) + ["endpoint", "voice_file_url", "voice_name"]),
                             st.text(max_size=10))
            job = draw(st.dictionaries(keys, st.one_of(JSON_ANY, any_text()), max_size=8))
        job_id = draw(st.one_of(st.none(), st.sampled_from(["../../etc/passwd", "", "a" * 300, "ü", "x/y", "..",
                                                            "con", "id with spaces", "\x00"]),
                                st.integers(), st.text(max_size=20)))
        return Case("chaos", job, job_id=job_id, expect="any")

    # valid jobs run the model, so they are one case in six; the others end before it (or should)
    modes = {"valid": valid_case(), "bad": bad_case(), "chaos": chaos_case()}
    return st.sampled_from(["bad"] * 4 + ["chaos"] * 3 + ["valid"]).flatmap(modes.__getitem__)


# --- checking one result ------------------------------------------------------------------------------
ERROR_KIND_SUBS = [(re.compile(r"'[^']*'"), "'…'"), (re.compile(r"\([^)]*\)"), "(…)"), (re.compile(r"\d+(\.\d+)?"), "N")]


def error_kind(message: str) -> str:
    for pattern, replacement in ERROR_KIND_SUBS:
        message = pattern.sub(replacement, message)
    return message


def secret_values() -> set[str]:
    found = {CANARY_SECRET, CANARY_KEY_ID}
    for name, value in os.environ.items():
        if re.search(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY", name) and len(value) >= 8:
            found.add(value)
    return found


def local_path(url: str) -> Path:
    return Path(url2pathname(unquote(urlsplit(url).path)))


def wav_seconds(path: Path) -> float | None:
    try:
        info = sf.info(str(path))
    except Exception:
        return None
    return info.frames / info.samplerate if info.samplerate == 24000 and info.channels == 1 else None


@dataclass
class Tally:
    examples: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (mode, ok/refused)
    mode_seconds: collections.Counter = field(default_factory=collections.Counter)
    error_kinds: collections.Counter = field(default_factory=collections.Counter)
    violations: collections.Counter = field(default_factory=collections.Counter)
    first_seen: dict = field(default_factory=dict)  # violation -> (input, result), shortened
    # Each voice an example stored: its transcript's UTF-8 bytes per second of its audio. An
    # example may store a pool voice with any valid transcript, "a" for 2 s among them.
    transcript_rates: dict = field(default_factory=dict)

    def violate(self, what: str, case: Case, result: object) -> None:
        self.violations[what] += 1
        if what not in self.first_seen:
            self.first_seen[what] = (shorten(case.job), shorten(result))


def shorten(value: object, limit: int = 400) -> str:
    """JSON of ``value`` with every long string cut to its start and its length, for the report."""
    def cut(v):
        if isinstance(v, str) and len(v) > 40:
            return f"{v[:24]}…[{len(v)} chars]"
        if isinstance(v, dict):
            return {cut(k): cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [cut(x) for x in v]
        return v

    text = json.dumps(cut(value), ensure_ascii=True, default=repr)
    return text if len(text) <= limit else text[:limit] + "…"


def storage_snapshot(root: Path) -> tuple[frozenset, list[str]]:
    """(voice and output files, half-written files anywhere in storage)."""
    names, partial = set(), []
    for prefix in ("voices", "output", "logs"):
        folder = root / prefix
        entries = os.listdir(folder) if folder.is_dir() else []
        partial += [f"{prefix}/{e}" for e in entries if e.startswith(".")]
        if prefix != "logs":
            names.update(f"{prefix}/{e}" for e in entries if not e.startswith("."))
    return frozenset(names), partial


# Speech runs about 15 UTF-8 bytes a second (jobs.plan): a transcript slower than that makes a plan
# longer than its text may take, and its jobs are refused with the plan's sentence, as they should be.
SPEECH_BYTES_PER_S = 15
PLAN_REFUSAL = "For this voice the text would take "


def plan_refusal_of_a_short_transcript(tally: Tally, case: Case, error: object) -> bool:
    """Whether ``error`` is the plan bound's refusal of a TTS job on a voice an example stored with
    a transcript far shorter than its audio: the worker is right to refuse it."""
    job = case.job if isinstance(case.job, dict) else {}
    voices = [job.get("local_voice"), *(job.get("voices") or {}).values()] if isinstance(job.get("voices"), dict) \
        else [job.get("local_voice")]
    short = any(tally.transcript_rates.get(voice, SPEECH_BYTES_PER_S) < SPEECH_BYTES_PER_S for voice in voices)
    return short and isinstance(error, str) and error.startswith(PLAN_REFUSAL)


def check(ctx, tally: Tally, case: Case, secrets_: set[str]) -> None:  # noqa: C901 - one expectation per fault kind
    root = ctx.settings.local_storage_dir
    before, _ = storage_snapshot(root)
    job_id = case.job_id if case.job_id is not None else f"p-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    try:
        result = asyncio.run(ctx.handler({"id": job_id, "input": case.job}))
    except BaseException as exc:  # the handler must never raise
        tally.violate(f"handler raised {type(exc).__name__}", case, repr(exc))
        return
    finally:
        elapsed = time.perf_counter() - started
        tally.examples += 1
        tally.seconds += elapsed
        tally.slowest = max(tally.slowest, elapsed)
        tally.mode_seconds[case.mode] += elapsed
    after, partial = storage_snapshot(root)
    leftovers = ctx.tmp_files()
    if leftovers:
        tally.violate("file left in the temp folder", case, leftovers)
        for name in leftovers:  # so one leak is counted once, not in every later example
            (ctx.tmp_dir / name).unlink(missing_ok=True)
    if partial:
        tally.violate("half-written file left in storage", case, partial)
    if not isinstance(result, dict):
        tally.violate("result is not a dict", case, result)
        return
    if "error" in result:
        tally.outcomes[(case.mode, "refused")] += 1
        for problem in sentence_problems(result["error"], secrets_) + (["error has other fields"] if len(result) > 1 else []):
            tally.violate(problem, case, result)
        if isinstance(result["error"], str):
            tally.error_kinds[error_kind(result["error"])] += 1
        if after != before:
            tally.violate("a refused job changed voices/ or output/", case, sorted(after ^ before))
        if case.expect == "ok" and not plan_refusal_of_a_short_transcript(tally, case, result["error"]):
            tally.violate("valid input refused", case, result)
        return
    tally.outcomes[(case.mode, "ok")] += 1
    if case.expect == "refused":
        tally.violate("bad input accepted", case, result)
    if "audio_url" in result:  # a TTS result: its WAV must be there and as long as it says
        asked = case.job if isinstance(case.job, dict) else {}
        subtitled = asked.get("subtitles") is not None
        expected = TTS_OUTPUT | (SUBTITLES_OUTPUT if subtitled else set())
        if not any(set(result) == expected | {inline} for inline in TTS_INLINE):
            tally.violate("TTS result fields differ from the README", case, sorted(result))
        if asked.get("timestamps") is not None and not words_inside_segments(result):
            tally.violate("word times out of order or outside their segment", case, result.get("segments"))
        key = result.get("output_key", "")
        seconds = wav_seconds(local_path(result.get("audio_url", ""))) if key in after else None
        if seconds is None or abs(seconds - result.get("duration", -1)) > 1 / 24000 + 0.0005:
            tally.violate("false success: output missing or not as reported", case, result)
        if after - before != {key} | ({result.get("subtitles_key")} if subtitled else set()):
            tally.violate("TTS changed more than its output", case, sorted(after ^ before))
    else:
        if set(result) != UPLOAD_OUTPUT:
            tally.violate("upload result fields differ from the README", case, sorted(result))
        if result.get("voice_key") not in after or not 1 <= result.get("duration", 0) <= 60:
            tally.violate("false success: voice missing or not as reported", case, result)
        else:
            tally.transcript_rates[result["voice_name"]] = len(result["ref_text"].encode("utf-8")) / result["duration"]


def words_inside_segments(result: dict) -> bool:
    times = []
    for segment in result.get("segments", []):
        for word in segment.get("words", [None]):
            if word is None or not segment["start"] <= word["start"] <= word["end"] <= segment["end"]:
                return False
            times += [word["start"], word["end"]]
    return times == sorted(times)


# --- the test ---------------------------------------------------------------------------------------
def write_clips(root: Path) -> None:
    rng = np.random.default_rng(0)
    sf.write(str(root / "good.wav"), speechlike(2.0, seed=1), SR, subtype="PCM_16")
    stereo = np.stack([speechlike(3.0, seed=2, sr=44100), speechlike(3.0, seed=3, sr=44100)], axis=1)
    sf.write(str(root / "stereo44k.wav"), stereo, 44100, subtype="PCM_16")
    sf.write(str(root / "good.flac"), speechlike(1.5, seed=4, sr=16000), 16000)
    sf.write(str(root / "good.ogg"), speechlike(2.0, seed=5), SR, format="OGG", subtype="VORBIS")
    sf.write(str(root / "good.mp3"), speechlike(2.0, seed=6), SR, format="MP3")
    sf.write(str(root / "short.wav"), speechlike(0.5, seed=7), SR, subtype="PCM_16")
    sf.write(str(root / "long.wav"), speechlike(61.0, seed=8, sr=8000), 8000, subtype="PCM_16")
    (root / "notaudio.txt").write_text("not audio\n" * 100)
    (root / "noise.wav").write_bytes(rng.bytes(50_000))
    buffer = io.BytesIO()
    sf.write(buffer, speechlike(2.0, seed=9), SR, format="WAV", subtype="PCM_16")
    (root / "truncated.wav").write_bytes(buffer.getvalue()[:300])


@pytest.fixture
def loopback_counts_as_public(monkeypatch):
    """The worker refuses private addresses as in production; 127.0.0.1 alone is treated as public
    so the loopback file server can stand in for the internet (nothing else can be reached here)."""
    original = download._address_refused
    monkeypatch.setattr(download, "_address_refused",
                        lambda ip: False if str(ip) == "127.0.0.1" else original(ip))


def test_generated_inputs_end_in_a_result_or_one_sentence(tiny_models, tiny_whisper, tmp_path, file_server,
                                                          loopback_counts_as_public):
    write_clips(file_server.root)
    extra = {ENV_ALLOW_PRIVATE_URLS: "false", ENV_AWS_ACCESS_KEY_ID: CANARY_KEY_ID,
             ENV_AWS_SECRET_ACCESS_KEY: CANARY_SECRET}
    tally = Tally()
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra=extra) as ctx:
        secrets_ = secret_values()
        _, seeded = ctx.run({"endpoint": "upload", "voice_file_url": file_server.url("good.wav"),
                             "voice_name": SEEDED_VOICE, "ref_text": "A voice for the generated jobs."})
        assert "error" not in seeded, seeded

        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
        @given(case_strategy(file_server.base_url))
        @example(Case("explicit", {"text": "你好世界，" * 400, "local_voice": BUILTINS[0], "nfe_step": 1,
                                   "speed": 3.0}, expect="ok"))
        @example(Case("explicit", {"text": "สวัสดีครับ" * 40, "local_voice": BUILTINS[0], "nfe_step": 1},
                      expect="ok"))
        @example(Case("explicit", {"text": "a" * LONG_VALID_CHARS, "local_voice": BUILTINS[0], "nfe_step": 1,
                                   "speed": 3.0}, expect="ok"))
        @example(Case("explicit", {"text": "👨‍👩‍👧" * 200, "local_voice": BUILTINS[0], "nfe_step": 1,
                                   "speed": 3.0}))
        @example(Case("explicit", {"text": "e\u0301\u0302\u0323" * 300, "local_voice": BUILTINS[0], "nfe_step": 1}))
        @example(Case("explicit", {"text": "a" * (MAX_TEXT_CHARS + 1), "local_voice": BUILTINS[0]}, expect="refused"))
        @example(Case("explicit", {"text": "...!!!???", "local_voice": BUILTINS[0], "nfe_step": 2}))
        @example(Case("explicit", {"text": " \t\u3000\n", "local_voice": BUILTINS[0]}, expect="refused"))
        @example(Case("explicit", {"text": "Hi \ud800 there.", "local_voice": BUILTINS[0], "nfe_step": 2}))
        @example(Case("explicit", {"text": "Hi.", "local_voice": BUILTINS[0], "bad\nfield\r": 1}, expect="refused"))
        @example(Case("explicit", {"text": "The default number of steps.", "local_voice": BUILTINS[0]}, expect="ok"))
        @example(Case("explicit", {"text": "Hello.", "local_voice": BUILTINS[0], "nfe_step": 2, "seed": MAX_SEED,
                                   "speed": 0.3, "cfg_strength": 10.0, "remove_silence": True}, expect="ok"))
        def one(case: Case) -> None:
            check(ctx, tally, case, secrets_)

        one()
        _, final = ctx.run({"text": "The worker still serves after all that.", "local_voice": BUILTINS[0],
                            "nfe_step": 2, "seed": 1})
        still_serving = "error" not in final and wav_seconds(local_path(final["audio_url"])) is not None
    record(tally, still_serving)
    assert still_serving, final
    assert tally.examples >= EXAMPLES
    assert not tally.violations, "\n".join(f"{n} x {v}: first input {tally.first_seen[v][0]} -> {tally.first_seen[v][1]}"
                                           for v, n in tally.violations.most_common())


def record(tally: Tally, still_serving: bool) -> None:
    modes = sorted({mode for mode, _ in tally.outcomes})
    rows = [[mode, tally.outcomes[(mode, "ok")], tally.outcomes[(mode, "refused")], f"{tally.mode_seconds[mode]:.1f}"]
            for mode in modes]
    rows.append(["**all**", sum(v for (_, o), v in tally.outcomes.items() if o == "ok"),
                 sum(v for (_, o), v in tally.outcomes.items() if o == "refused"), f"{tally.seconds:.1f}"])
    violation_rows = [[v, n, f"`{tally.first_seen[v][0]}`", f"`{tally.first_seen[v][1]}`"]
                      for v, n in tally.violations.most_common()]
    body = "\n\n".join([
        "## Property test: generated job inputs through the handler",
        provenance(COMMAND),
        f"{tally.examples} examples ({EXAMPLES} generated by Hypothesis, derandomised, plus explicit ones) in "
        f"{tally.seconds:.0f} s of job time, slowest example {tally.slowest:.1f} s; local storage, "
        f"private URLs refused. Worker still serving a known-good job at the end: **{'yes' if still_serving else 'NO'}**.",
        table(["mode", "ok", "refused", "job seconds"], rows),
        f"Violations (must be none): **{sum(tally.violations.values())}**",
        table(["violation", "count", "first input", "its result"], violation_rows) if violation_rows else "",
        "Error sentences by kind (quoted values, brackets and numbers folded):",
        table(["count", "sentence"], [[n, k] for k, n in tally.error_kinds.most_common()]),
    ])
    write_section("property", body)
