"""Reference voices: where a voice comes from, which part of it is used, which transcript goes
with that part, and the library's own jobs (list, describe, delete).

Why this module exists: a voice is more than a file, and its transcript must always describe the
very audio synthesis uses. The rules, in one place:

- A voice is named like a file, ending in ``.wav`` (``alice.wav``), and stored as
  ``voices/<voice_name>`` (``voices/alice.wav``). An uploaded voice is one object: a 16-bit mono
  24 kHz WAV of the part F5-TTS uses (at most 12 s, silent edges trimmed, loudness normalised) with
  its transcript inside it (``audio.voice_wav_bytes``). One write replaces both, so concurrent
  uploads of one name, a fault mid-upload, or several workers sharing a bucket can never pair one
  upload's audio with another's transcript.
- A voice put in storage by hand may have a transcript written by a person beside it,
  ``voices/<voice_name>.txt`` (``voices/alice.wav.txt``), in UTF-8 (a byte-order mark is allowed);
  it is used only when the voice is short enough to be used whole.
- A sidecar that cannot be read (not UTF-8; a ``.json`` that is not the object the worker writes)
  counts as no transcript, is logged once per key, and never fails the voice or a listing.
- A transcript Whisper made for a voice without one is kept in ``voices/<voice_name>.json``
  (``voices/alice.wav.json``) together with the SHA-256 of the voice object it was made from, and
  used only while the voice is that object.
- The job's own ``ref_text`` wins, but only for a voice used whole.
- The two example voices f5-tts ships are built in, with their transcripts.
- Voices in use are kept prepared in memory (``VoiceCache``, at most ``F5_VOICE_CACHE_SIZE``), each
  bound to the version of the object it was made from; every use asks storage, in one conditional
  GET, whether the object is still that version, so a replaced voice is never served stale and an
  unchanged one costs no transfer and no preparation.

Voice names are checked by ``jobs.inputs`` before they get here; keys are built only from checked
names, so nothing outside ``voices/`` is touched (``incoming_key`` is the one way in from
elsewhere, read-only).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files as package_files
from pathlib import Path

import numpy as np

from f5worker.jobs import audio
from f5worker.errors import SHOWN_KEY_CHARS, InputError, NotFound, StorageError, shown
from f5worker.jobs.inputs import check_voice_name
from f5worker.settings import (ENV_MAX_VOICE_BYTES, INCOMING_PREFIX, TRANSCRIPT_SUFFIX,
                               VOICE_META_SUFFIX, VOICES_PREFIX)
from s3_utils import KeyNotFound, NotText, ObjectInfo, ObjectTooLarge, Storage, VersionChanged, check_key
from f5worker.jobs.resampling import to_model_rate
from f5worker.model.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

# f5-tts's example voices, usable by name on every worker (their transcripts are from basic.toml).
BUILTIN_VOICES = {
    "basic_ref_en.wav": ("infer/examples/basic/basic_ref_en.wav",
                         "Some call me nature, others call me mother nature."),
    "basic_ref_zh.wav": ("infer/examples/basic/basic_ref_zh.wav", "对，这就是我，万人敬仰的太乙真人。"),
}
# Where a stored transcript comes from: inside the voice (the upload job), a person's .txt beside
# it, Whisper's .json beside it, or f5-tts's for a built-in voice.
EMBEDDED, HAND_WRITTEN, WHISPER, BUILT_IN = "embedded", "hand-written", "whisper", "built-in"
# A TTS result's ``ref_text_source``: the job's ref_text, a stored transcript, f5-tts's for a
# built-in voice, or Whisper's, made for the job.
FROM_JOB, STORED, TRANSCRIBED = "job", "stored", "transcribed"
REF_TEXT_SOURCES = (FROM_JOB, STORED, BUILT_IN, TRANSCRIBED)
LIST_DETAIL_THREADS = 8  # a listing reads at most this many voices' headers at once, per worker
LIST_CALLS_PER_PAGE = 4  # storage listings one page may take (sidecar files take keys too)
VERSION_TRIES = 2  # reads of a listed voice replaced meanwhile: its listed version, then its new one


def voice_key(name: str) -> str:
    return f"{VOICES_PREFIX}{name}"


def transcript_key(name: str) -> str:
    """A transcript written by a person for a voice put in storage by hand."""
    return f"{VOICES_PREFIX}{name}{TRANSCRIPT_SUFFIX}"


def meta_key(name: str) -> str:
    """What the worker learnt about a stored voice (Whisper's transcript), bound to its SHA-256."""
    return f"{VOICES_PREFIX}{name}{VOICE_META_SUFFIX}"


@dataclass
class Voice:
    name: str
    sr: int
    seconds: float  # the whole stored clip
    used: np.ndarray  # the part synthesis uses (audio.clip_reference), mono float32
    clipped: bool  # speech past the used part is dropped, so a whole-clip transcript won't match
    sha256: str | None  # of the stored object; None for a built-in voice
    embedded_text: str | None  # the transcript the stored object carries
    info: ObjectInfo | None  # the stored object this was made from; None for a built-in voice
    # ``used`` as synthesis takes it (audio.prepare_reference); None where that fails, so that
    # synthesis says why in its own words
    reference: np.ndarray | None
    learnt_text: str | None = None  # Whisper's transcript, once read or made (bound to sha256)

    @property
    def identity(self) -> tuple[str, str]:
        """Same identity, same audio: what a transcription in progress can be shared by."""
        return self.name, self.sha256 or "built-in"


def clipped_refusal(voice_seconds: float) -> InputError:
    return InputError(
        f"The voice is {voice_seconds:.1f} s long and only its first {audio.REF_MAX_SECONDS:g} s or so are "
        "used, so a transcript of the whole clip would not match; send a clip of at most "
        f"{audio.REF_MAX_SECONDS:g} s with ref_text, or leave ref_text out to have the used part transcribed.")


def not_found(name: str) -> InputError:
    return NotFound(f"Voice '{name}' was not found; upload it first with the upload endpoint.")


class VoiceCache:
    """The ``capacity`` most recently used prepared voices (0: none kept). Thread-safe; the voices
    it hands out are shared between jobs and never modified, except ``learnt_text``."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._voices: OrderedDict[str, Voice] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> Voice | None:
        with self._lock:
            voice = self._voices.get(name)
            if voice is not None:
                self._voices.move_to_end(name)
            return voice

    def put(self, voice: Voice) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._voices[voice.name] = voice
            self._voices.move_to_end(voice.name)
            while len(self._voices) > self.capacity:
                self._voices.popitem(last=False)

    def drop(self, name: str) -> None:
        with self._lock:
            self._voices.pop(name, None)

    def __len__(self) -> int:
        return len(self._voices)


# --- where an upload's audio comes from (besides a URL: f5worker.jobs.download) -------------------------
def check_voice_size(size: int, max_bytes: int, field: str) -> None:
    """An upload's audio is at most ``max_bytes`` (``F5_MAX_VOICE_BYTES``); ``field`` names it as
    its caller sent it (the queue face's ``voice_base64``, the HTTP form's ``file``)."""
    if size > max_bytes:
        raise InputError(f"'{field}' holds {size} bytes, more than the {max_bytes} allowed "
                         f"({ENV_MAX_VOICE_BYTES}).", param=field)


def decode_base64_voice(text: str, max_bytes: int) -> bytes:
    """The bytes of ``voice_base64``: standard base64 (RFC 4648, with padding; line breaks and a
    ``data:...;base64,`` prefix are allowed), at most ``max_bytes`` once decoded."""
    if text.startswith("data:") and ";base64," in text[:200]:
        text = text.split(";base64,", 1)[1]
    compact = "".join(text.split())
    check_voice_size(len(compact) // 4 * 3 - compact[-2:].count("="), max_bytes, "voice_base64")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("'voice_base64' is not valid base64 (standard alphabet, padded with '=').") from None
    if not data:
        raise InputError("'voice_base64' holds no data.")
    return data


def incoming_key(ref: str, bucket: str | None) -> str:
    """The storage key ``voice_s3_key`` names: ``incoming/<path>``, or ``s3://<bucket>/incoming/<path>``
    with the worker's own bucket. Anything else is refused, so an upload can read only what was put
    under ``incoming/`` for it, never voices, outputs or job records."""
    key = ref
    if ref.startswith("s3://"):
        if bucket is None:
            raise InputError("'voice_s3_key' names a bucket, but this worker keeps its files in a local "
                             f"folder; give the key alone, such as '{INCOMING_PREFIX}alice.mp3'.")
        named, _, key = ref[len("s3://"):].partition("/")
        if named != bucket:
            raise InputError(f"'voice_s3_key' must be in this worker's bucket ('{bucket}'), not '{shown(named, SHOWN_KEY_CHARS)}'.")
    try:
        check_key(key)
    except StorageError:
        key = ""
    if not key.startswith(INCOMING_PREFIX) or len(key) == len(INCOMING_PREFIX):
        raise InputError(f"'voice_s3_key' must be a file under '{INCOMING_PREFIX}', such as "
                         f"'{INCOMING_PREFIX}alice.mp3' (no '..', '.' or empty parts).")
    return key


def prepare_upload(samples: np.ndarray, sr: int, target_rms: float) -> tuple[np.ndarray, bool, float]:
    """An upload's audio made into the voice to store, once: the part F5-TTS uses (at most 12 s, cut
    at a pause), at 24 kHz, its silent edges trimmed, loudness normalised to ``target_rms``
    (``audio.normalise_loudness``). Returns it, whether speech past it was dropped, and the gain."""
    used, clipped = audio.clip_reference(samples, sr)
    used = to_model_rate(used, sr)
    trimmed = audio.check_speech(used, SAMPLE_RATE)
    normalised, gain = audio.normalise_loudness(trimmed, SAMPLE_RATE, target_rms)
    return normalised, clipped, gain


# --- listing -----------------------------------------------------------------------------------
def encode_cursor(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key[len(VOICES_PREFIX):].encode("utf-8")).decode("ascii")


def decode_cursor(cursor: str) -> str:
    """The key a ``list_voices`` page ended at; InputError for anything a page did not return."""
    try:
        name = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8")
        if "/" in name:
            raise ValueError(name)
        return check_key(voice_key(name))
    except (ValueError, StorageError):
        raise InputError("'cursor' is not one a list_voices page returned; pass next_cursor as it came.",
                         param="cursor") from None


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _listed_voice_name(key: str) -> str | None:
    """The voice a listed key is, or None (a sidecar, or a file no job could name)."""
    name = key[len(VOICES_PREFIX):]
    try:
        return check_voice_name(name)
    except ValueError:
        return None


class VoiceLibrary:
    def __init__(self, storage: Storage, transcribe=None, cache_size: int = 0, *, max_voice_bytes: int | None = None):
        """``max_voice_bytes``: the most a stored voice may be (``F5_MAX_VOICE_BYTES``, as an upload's
        source): a larger file put in storage by hand is refused before it is copied or read."""
        self.storage = storage
        self.max_voice_bytes = max_voice_bytes
        self._transcribe = transcribe  # (samples, sr) -> str; loaded lazily by its owner
        self.cache = VoiceCache(cache_size)
        self._unreadable: set[str] = set()  # sidecar keys already logged as unreadable
        self._unreadable_lock = threading.Lock()
        self._list_threads = ThreadPoolExecutor(max_workers=LIST_DETAIL_THREADS, thread_name_prefix="voice-list")

    # --- one voice, for synthesis ---------------------------------------------------------------
    def fetch(self, name: str, staging_path: Path) -> Voice:
        """A stored (or built-in) voice, staged through ``staging_path`` when it is not already
        prepared: one conditional GET, with no body when the prepared one is still current."""
        cached = self.cache.get(name)
        current = cached.info.version if cached is not None and cached.info is not None else None
        try:
            info = self.storage.download_if_changed(voice_key(name), staging_path, current,
                                                    max_bytes=self.max_voice_bytes)
        except ObjectTooLarge as err:
            raise InputError(f"The stored voice '{name}' is {err.size} bytes, more than the {err.limit} a voice may "
                             f"be ({ENV_MAX_VOICE_BYTES}): store a shorter or smaller WAV under that name.") from None
        except KeyNotFound:
            if name not in BUILTIN_VOICES:
                self.cache.drop(name)
                raise not_found(name) from None
            if cached is not None and cached.info is None:
                return cached
            data = Path(str(package_files("f5_tts").joinpath(BUILTIN_VOICES[name][0]))).read_bytes()
            voice = self._prepare(name, data, None)
        else:
            if info is None:
                return cached
            voice = self._prepare(name, staging_path.read_bytes(), info)
        self.cache.put(voice)
        return voice

    @staticmethod
    def _prepare(name: str, data: bytes, info: ObjectInfo | None) -> Voice:
        samples, sr = audio.decode(data)
        used, clipped = audio.clip_reference(samples, sr)
        try:
            reference = audio.prepare_reference(used, sr)
        except InputError:
            reference = None
        return Voice(name, sr, audio.duration_seconds(samples, sr), used, clipped,
                     hashlib.sha256(data).hexdigest() if info is not None else None,
                     audio.embedded_transcript(data), info, reference)

    def known_ref_text(self, voice: Voice, given: str | None) -> tuple[str, str] | None:
        """The transcript of the used part and where it came from (``job``, ``stored``, ``built-in``),
        or None when only Whisper can tell. Storage I/O only: runs off the model thread."""
        if given:
            if voice.clipped:
                raise clipped_refusal(voice.seconds)
            return given, FROM_JOB
        stored = self.stored_transcript(voice)
        if stored is None:
            return None
        text, source = stored
        return text, BUILT_IN if source == BUILT_IN else STORED

    def stored_transcript(self, voice: Voice) -> tuple[str, str] | None:
        """The transcript a job without ``ref_text`` uses for ``voice``, and which it is
        (``EMBEDDED``, ``HAND_WRITTEN``, ``WHISPER``, ``BUILT_IN``); None when there is none yet.
        A hand-written one is read at every use, so a person's edit counts at once."""
        if voice.embedded_text:
            return voice.embedded_text, EMBEDDED
        if voice.sha256 is None:
            return BUILTIN_VOICES[voice.name][1], BUILT_IN
        if not voice.clipped:
            written = self._hand_written(voice.name)
            if written:
                return written, HAND_WRITTEN
        if voice.learnt_text is None:
            voice.learnt_text = self._learnt_transcript(voice.name, sha256=voice.sha256)
        return (voice.learnt_text, WHISPER) if voice.learnt_text else None

    def _sidecar_text(self, key: str) -> str | None:
        """The text of a sidecar beside a voice; None when there is none or it is not UTF-8."""
        try:
            return self.storage.get_text(key)
        except NotText:
            self._log_unreadable(key, "is not UTF-8 text")
            return None

    def _log_unreadable(self, key: str, why: str) -> None:
        """One warning per sidecar key and process: a listing reads it at every page."""
        with self._unreadable_lock:
            if key in self._unreadable:
                return
            self._unreadable.add(key)
        log.warning("voice sidecar %s %s; it counts as no transcript (sidecars are read as UTF-8)", key, why)

    def _hand_written(self, name: str) -> str | None:
        """A person's transcript of voice ``name`` (``transcript_key``), stripped; None if none."""
        written = self._sidecar_text(transcript_key(name))
        return written.strip() if written and written.strip() else None

    def _learnt_transcript(self, name: str, sha256: str | None = None, version: str | None = None) -> str | None:
        """Whisper's transcript of voice ``name`` if it was made from the object with this SHA-256
        (or, where only the listing's ``version`` is known, from that version)."""
        raw = self._sidecar_text(meta_key(name))
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            self._log_unreadable(meta_key(name), "is not a JSON object")
            return None
        if ((sha256 is not None and meta.get("sha256") != sha256)
                or (version is not None and meta.get("version") != version)):
            return None  # made for audio that has since been replaced
        text = meta.get("ref_text")
        return text.strip() if isinstance(text, str) and text.strip() else None

    def remember_transcript(self, voice: Voice, text: str) -> None:
        """Kept even if the job fails later; bound to the audio it describes, so it is never used
        for a voice that replaced this one meanwhile. ``version`` lets a listing tell the same
        without reading the audio. A voice deleted while it was transcribed gets no sidecar: once
        the delete has removed what lay beside it, none could remove this one (the voice is gone)."""
        if voice.sha256 is None:  # a built-in voice
            return
        self.storage.put_json(meta_key(voice.name), {"sha256": voice.sha256, "ref_text": text,
                                                     "version": voice.info.version})
        voice.learnt_text = text
        try:
            self.storage.head(voice_key(voice.name))
        except KeyNotFound:
            self.storage.delete(meta_key(voice.name))

    def transcribe(self, samples: np.ndarray, sr: int) -> str:
        if self._transcribe is None:
            raise InputError("No transcript is stored for this voice and transcription is unavailable; pass ref_text.")
        text = self._transcribe(samples, sr).strip()
        if not text:
            raise InputError("The voice could not be transcribed (no speech recognised); pass ref_text.")
        return text

    def store(self, name: str, samples: np.ndarray, sr: int, ref_text: str, staging_path: Path) -> str:
        """The voice and its transcript as one object: one write replaces both, or neither."""
        staging_path.write_bytes(audio.voice_wav_bytes(samples, sr, ref_text))
        self.storage.upload_file(voice_key(name), staging_path, "audio/wav")
        self.cache.drop(name)  # the next use reads the new object (its version would tell anyway)
        return voice_key(name)

    # --- the library's jobs ----------------------------------------------------------------------
    def info(self, name: str, staging_path: Path) -> dict:
        """Everything about one voice, as a job without ``ref_text`` would use it."""
        voice = self.fetch(name, staging_path)
        stored = self.stored_transcript(voice)
        text, source = stored if stored is not None else (None, None)
        obj = voice.info
        return {"voice_name": name, "voice_key": voice_key(name) if obj else None,
                "duration": round(voice.seconds, 3),
                "used_duration": round(audio.duration_seconds(voice.used, voice.sr), 3),
                "sample_rate": voice.sr, "transcript": text, "transcript_source": source,
                "size": obj.size if obj else None, "last_modified": _iso(obj.last_modified) if obj else None,
                "sha256": voice.sha256}

    def require_stored(self, name: str) -> None:
        """InputError unless voice ``name`` is in storage (what ``delete`` can remove)."""
        try:
            self.storage.head(voice_key(name))
        except KeyNotFound:
            if name in BUILTIN_VOICES:
                raise InputError(f"Voice '{name}' is built in and cannot be deleted.") from None
            raise NotFound(f"Voice '{name}' was not found, so nothing was deleted.") from None

    def delete(self, name: str) -> list[str]:
        """Remove stored voice ``name`` (``require_stored`` first) and what lies beside it; returns
        the keys removed. The voice itself goes last, so a failure half-way leaves it in place and a
        retry finishes the job."""
        key = voice_key(name)
        removed = []
        for sidecar in (transcript_key(name), meta_key(name)):
            try:
                self.storage.head(sidecar)
            except KeyNotFound:
                continue
            self.storage.delete(sidecar)
            removed.append(sidecar)
        self.storage.delete(key)
        self.cache.drop(name)
        return [key, *removed]

    def list_page(self, limit: int, cursor: str | None, details: bool) -> tuple[list[dict], str | None]:
        """Up to ``limit`` voices in name order after ``cursor``, and the cursor of the next page
        (None at the end). A page takes at most ``LIST_CALLS_PER_PAGE`` storage listings and, with
        ``details``, a few KiB read from each voice, ``LIST_DETAIL_THREADS`` at a time."""
        after = decode_cursor(cursor) if cursor else None
        found: list[ObjectInfo] = []
        more = True
        for _ in range(LIST_CALLS_PER_PAGE):
            listing = self.storage.list_objects(VOICES_PREFIX, after, min(1000, 2 * limit))
            more = listing.more
            for obj in listing.objects:
                after = obj.key
                if _listed_voice_name(obj.key):
                    found.append(obj)
                    if len(found) == limit:
                        more = more or obj is not listing.objects[-1]
                        break
            else:  # all of it passed, folders too (a listing of folders alone holds no key)
                after = listing.resume_after or after
            if len(found) == limit or not more:
                break
        voices = self._details(found) if details else [self._entry(obj) for obj in found]
        return voices, encode_cursor(after) if more and after else None

    @staticmethod
    def _entry(obj: ObjectInfo) -> dict:
        return {"voice_name": obj.key[len(VOICES_PREFIX):], "size": obj.size,
                "last_modified": _iso(obj.last_modified)}

    def _details(self, objects: list[ObjectInfo]) -> list[dict]:
        """Each voice's entry with its duration, rate and transcript, leaving out a voice deleted
        since it was listed; the first failure fails the page at once (the reads not yet begun
        are dropped)."""
        futures = [self._list_threads.submit(self._detailed_entry, obj) for obj in objects]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            if future.exception() is not None:
                raise future.exception()
        return [entry for entry in (future.result() for future in futures) if entry is not None]

    def _detailed_entry(self, obj: ObjectInfo) -> dict | None:
        """One voice's entry, or None if it was deleted since it was listed. Its reads ask for the
        listed version: a voice replaced meanwhile is described whole from its new version (its
        size and time with its own duration and transcript), never as a mix of the two."""
        for _ in range(VERSION_TRIES):
            try:
                return self._entry_of_version(obj)
            except KeyNotFound:
                return None
            except VersionChanged:
                try:
                    obj = self.storage.head(obj.key)
                except KeyNotFound:
                    return None
        entry = self._entry(obj)  # replaced at every read: its duration and transcript are not known
        entry.update(duration=None, sample_rate=None, transcript=None, transcript_source=None)
        return entry

    def _entry_of_version(self, obj: ObjectInfo) -> dict:
        entry = self._entry(obj)
        name = entry["voice_name"]
        summary = audio.wav_summary(
            lambda start, length: self.storage.get_range(obj.key, start, length, version=obj.version), obj.size)
        seconds = summary.seconds if summary is not None else None
        text, source = None, None
        if summary is not None and summary.transcript:
            text, source = summary.transcript, EMBEDDED
        else:
            # A voice of at most 12 s is always used whole, so a person's transcript applies; for a
            # longer one only voice_info, which reads the audio, can tell.
            if seconds is not None and seconds <= audio.REF_MAX_SECONDS:
                written = self._hand_written(name)
                if written:
                    text, source = written, HAND_WRITTEN
            if text is None:
                learnt = self._learnt_transcript(name, version=obj.version)
                if learnt:
                    text, source = learnt, WHISPER
        entry.update(duration=round(seconds, 3) if seconds is not None else None,
                     sample_rate=summary.sample_rate if summary is not None else None,
                     transcript=text, transcript_source=source)
        return entry
