"""A TTS job's result: where its files go, the fields it answers with, and the most bytes those
fields can take, known before any model call.

Why this module exists: a RunPod result has a size limit (``F5_MAX_RESULT_BYTES``), and a job
that only finds out after its synthesis that its answer does not fit has spent its GPU time for
nothing (and a streamed one has already sent its audio). So the result is built by one function,
``tts_result``, which ``widest_result_bytes`` also calls, with every field at its widest, to refuse
such a job from its plan. The sentences the result may carry about its subtitle files live here
too, so that their widest is the one they are written with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from f5worker.jobs import encoding
from f5worker.jobs import streaming
from f5worker.jobs.assembly import WIDEST_SECONDS
from f5worker.jobs.inputs import MAX_SEED, TTSInput
from f5worker.jobs.subtitles import SUBTITLE_FORMATS
from f5worker.jobs.voices import REF_TEXT_SOURCES
from f5worker.settings import OUTPUT_PREFIX

# A storage failure's reason as a result says it (the log keeps it whole), in bytes as the result
# is measured (JSON, UTF-8): its sentences are short, but one that quotes a server's answer or a
# long key need not be.
MAX_REASON_BYTES = 300
ELLIPSIS = "…"
WIDEST_BYTES = 10**15  # more bytes than any job's file (the plan's bounds)
WIDEST_REF_TEXT_SOURCE = max(REF_TEXT_SOURCES, key=len)


def output_key_for(job_id: str, requested: str | None, fmt: encoding.OutputFormat) -> str:
    """Where a TTS job's audio is stored: ``output/<job_id>.<ext>``, or the caller's ``output_key``
    under ``output/`` (one ending in '/' is a folder for ``<job_id>.<ext>``). An existing object of
    that key is replaced, as a re-rendered line should be."""
    name = requested or ""
    if not name or name.endswith("/"):
        name += job_id
    return f"{OUTPUT_PREFIX}{name}.{fmt.extension}"


def output_stem(output_key: str, fmt: encoding.OutputFormat) -> str:
    """The audio's key without its extension: what its subtitle files share, in any audio format."""
    return output_key.removesuffix("." + fmt.extension)


def subtitles_key_for(output_key: str, fmt: encoding.OutputFormat, subtitles: str) -> str:
    """The subtitle file's key: the audio's, with the subtitle format's extension for its own."""
    return f"{output_stem(output_key, fmt)}.{subtitles}"


def older_subtitles_keys(output_key: str, fmt: encoding.OutputFormat, job: TTSInput) -> list[str]:
    """The subtitle files an earlier take of this key may have left that this job does not
    write: removed once its audio is stored. None for a folder ``output_key`` (its files are
    named after the job, so no earlier take has them)."""
    if job.output_key is None or job.output_key.endswith("/"):
        return []
    return [subtitles_key_for(output_key, fmt, other) for other in SUBTITLE_FORMATS if other != job.subtitles]


@dataclass(frozen=True)
class Delivery:
    """Where one TTS job's audio goes: its format, its key if stored, and its stream if any."""

    job_id: str
    job: TTSInput
    fmt: encoding.OutputFormat
    output_key: str
    stream: streaming.LiveAudio | None
    extras: dict  # the result's fields of what was asked besides the audio (normalized, verify)


@dataclass(frozen=True)
class SubtitlesFile:
    """A job's subtitle file, written in its temp folder, not stored yet."""

    key: str
    url: str
    path: Path
    content_type: str


@dataclass
class StoredOutputs:
    """What storing a job's audio left undone after the audio went up: its own subtitle file not
    stored (why), and subtitle files of the key that could not be removed (key: why)."""

    subtitles: SubtitlesFile | None
    not_stored: str | None = None
    not_removed: dict[str, str] = field(default_factory=dict)

    def tell(self, result: dict) -> None:
        """``result`` says it: no subtitle fields for a file not stored, and ``subtitles_error``."""
        said, not_removed = None, dict(self.not_removed)
        if self.not_stored is not None:
            del result["subtitles_url"], result["subtitles_key"]
            removed = not_removed.pop(self.subtitles.key, None) is None
            said = not_stored_sentence(self.not_stored, self.subtitles.key, removed=removed)
        for key, reason in not_removed.items():
            said = added_sentence(said, not_removed_sentence(key, reason))
        if said is not None:
            result["subtitles_error"] = said


@dataclass(frozen=True)
class InlineAudio:
    """Whether a job's audio goes back inline (base64) and, if it does not fit, the room there was."""

    wanted: bool
    room: int
    too_large: bool


def tts_result(job: TTSInput, *, voice_names: list[str], ref_text_source: str, model: str, chunks: int,
               fmt: encoding.OutputFormat, url: str | None, output_key: str | None, seed: int, duration: float,
               segments: list[dict], size: int, stream: streaming.LiveAudio | None, extras: dict) -> dict:
    """A TTS job's result before its timings and inline audio (``ref_text_source``: the first voice's)."""
    result = {"audio_url": url, "duration": round(duration, 3), "sample_rate": job.sample_rate,
              "output_key": output_key, "voice": job.local_voice, "seed": seed, "chunks": chunks, "model": model,
              "ref_text_source": ref_text_source, "format": fmt.name, "content_type": fmt.content_type,
              "bytes": size}
    if job.voices is not None:
        result["voices_used"] = voice_names
    if isinstance(stream, streaming.AudioStream):
        result["stream_chunks"] = stream.pieces
    result["segments"] = segments
    return {**result, **extras}


def json_bytes(text: str) -> int:
    """What ``text`` takes inside a JSON string as the runpod SDK writes it (UTF-8, escapes)."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def brief_reason(err: Exception) -> str:
    """A storage failure's sentence, without its full stop, in at most ``MAX_REASON_BYTES`` of
    the result (a cut one ends in an ellipsis)."""
    text = str(err).rstrip(".")
    if json_bytes(text) <= MAX_REASON_BYTES:
        return text
    kept, used = [], json_bytes(ELLIPSIS)
    for char in text:
        used += json_bytes(char)
        if used > MAX_REASON_BYTES:
            break
        kept.append(char)
    return "".join(kept) + ELLIPSIS


def not_stored_sentence(reason: str, key: str, *, removed: bool) -> str:
    """The audio is stored but its subtitle file at ``key`` could not be, for ``reason``; ``removed``:
    whether an older subtitle file there is known to be gone."""
    older = (f"no subtitle file is left at {key}" if removed
             else f"an older subtitle file at {key} may still stand beside it")
    return (f"The audio was stored, but its subtitle file could not be ({reason}); {older}. "
            "Send the job again for both.")


def not_removed_sentence(key: str, reason: str) -> str:
    """An earlier take's subtitle file at ``key``, of the format this job did not write, still stands."""
    return f"An older subtitle file at {key} could not be removed ({reason}); it was not made for this audio."


def added_sentence(said: str | None, sentence: str) -> str:
    """``subtitles_error`` with ``sentence`` added after what it ``said`` already."""
    return " ".join(filter(None, (said, sentence)))


def widest_subtitles_error(subtitles_key: str | None, older_keys: list[str]) -> str | None:
    """The longest ``subtitles_error`` a job of these keys can get: its own file not stored, then
    every older one not removed."""
    reason = "x" * MAX_REASON_BYTES
    said = not_stored_sentence(reason, subtitles_key, removed=False) if subtitles_key is not None else None
    for key in older_keys:
        said = added_sentence(said, not_removed_sentence(key, reason))
    return said


def widest_result_bytes(job: TTSInput, *, voice_names: list[str], model: str, chunks: int,
                        fmt: encoding.OutputFormat, urls: dict[str, str], output_key: str | None,
                        subtitles_key: str | None, older_keys: list[str], stream: streaming.LiveAudio | None,
                        extras: dict, inline_by_default: bool) -> int:
    """The most bytes the result's fields take besides its segments, its timings and inline audio
    (serialised as the runpod SDK does: JSON, UTF-8). ``urls``: the audio's and subtitle file's,
    as the job will give them (a presigned URL's length does not change with its moment)."""
    result = tts_result(job, voice_names=voice_names, ref_text_source=WIDEST_REF_TEXT_SOURCE, model=model,
                        chunks=chunks, fmt=fmt, url=urls.get("audio"), output_key=output_key, seed=MAX_SEED,
                        duration=WIDEST_SECONDS, segments=[], size=WIDEST_BYTES, stream=stream, extras=extras)
    if "stream_chunks" in result:
        result["stream_chunks"] = WIDEST_BYTES  # more pieces than any job sends
    if subtitles_key is not None:
        result.update(subtitles_url=urls["subtitles"], subtitles_key=subtitles_key)
    if (error := widest_subtitles_error(subtitles_key, older_keys)) is not None:
        result["subtitles_error"] = error
    if inline_by_default:  # the file too large for the default inline copy: why it is left out
        result["audio_base64_omitted"] = encoding.omitted_sentence(WIDEST_BYTES, WIDEST_BYTES)
    return len(json.dumps(result, ensure_ascii=False).encode("utf-8"))
