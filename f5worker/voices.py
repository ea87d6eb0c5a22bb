"""Reference voices: where a voice comes from, which part of it is used, and which transcript goes
with that part.

Why this module exists: a voice is more than a file, and its transcript must always describe the
very audio synthesis uses. The rules, in one place:

- An uploaded voice is stored as one object, ``voices/<name>`` (a 16-bit WAV of the part F5-TTS
  uses, at most 12 s), with its transcript inside it (``audio.voice_wav_bytes``). One write replaces
  both, so concurrent uploads of one name, a fault mid-upload, or several workers sharing a bucket
  can never pair one upload's audio with another's transcript.
- A voice put in storage by hand may have a transcript written by a person beside it,
  ``voices/<name>.txt`` (e.g. ``voices/alice.wav.txt``); it is used only when the voice is short
  enough to be used whole.
- A transcript Whisper made for a voice without one is kept in ``voices/<name>.json`` together with
  the SHA-256 of the voice object it was made from, and used only while the voice is that object.
- The job's own ``ref_text`` wins, but only for a voice used whole.
- The two example voices f5-tts ships are built in, with their transcripts.

Voice names are checked by ``job_input`` before they get here; keys are built only from checked
names, so nothing outside ``voices/`` is touched.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path

import numpy as np

from f5worker import audio
from f5worker.errors import InputError
from f5worker.settings import TRANSCRIPT_SUFFIX, VOICE_META_SUFFIX, VOICES_PREFIX
from s3_utils import KeyNotFound, Storage

log = logging.getLogger(__name__)

# f5-tts's example voices, usable by name on every worker (their transcripts are from basic.toml).
BUILTIN_VOICES = {
    "basic_ref_en.wav": ("infer/examples/basic/basic_ref_en.wav",
                         "Some call me nature, others call me mother nature."),
    "basic_ref_zh.wav": ("infer/examples/basic/basic_ref_zh.wav", "对，这就是我，万人敬仰的太乙真人。"),
}


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
    samples: np.ndarray  # the whole stored clip, mono float32
    sr: int
    used: np.ndarray  # the part synthesis uses (audio.clip_reference)
    clipped: bool  # speech past the used part is dropped, so a whole-clip transcript won't match
    sha256: str | None  # of the stored object; None for a built-in voice
    embedded_text: str | None  # the transcript the stored object carries

    @property
    def identity(self) -> tuple[str, str]:
        """Same identity, same audio: what a transcription in progress can be shared by."""
        return self.name, self.sha256 or "built-in"


def clipped_refusal(voice_seconds: float) -> InputError:
    return InputError(
        f"The voice is {voice_seconds:.1f} s long and only its first {audio.REF_MAX_SECONDS:g} s or so are "
        "used, so a transcript of the whole clip would not match; send a clip of at most "
        f"{audio.REF_MAX_SECONDS:g} s with ref_text, or leave ref_text out to have the used part transcribed.")


class VoiceLibrary:
    def __init__(self, storage: Storage, transcribe=None):
        self.storage = storage
        self._transcribe = transcribe  # (samples, sr) -> str; loaded lazily by its owner

    def fetch(self, name: str, staging_path: Path) -> Voice:
        """A stored (or built-in) voice, staged through ``staging_path``."""
        try:
            self.storage.download_file(voice_key(name), staging_path)
        except KeyNotFound:
            if name not in BUILTIN_VOICES:
                raise InputError(f"Voice '{name}' was not found; upload it first with the upload endpoint.") from None
            data, sha = Path(str(package_files("f5_tts").joinpath(BUILTIN_VOICES[name][0]))).read_bytes(), None
        else:
            data = staging_path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
        samples, sr = audio.decode(data)
        used, clipped = audio.clip_reference(samples, sr)
        return Voice(name, samples, sr, used, clipped, sha, audio.embedded_transcript(data))

    def known_ref_text(self, voice: Voice, given: str | None) -> tuple[str, str] | None:
        """The transcript of the used part and where it came from (``job``, ``stored``, ``built-in``),
        or None when only Whisper can tell. Storage I/O only: runs off the model thread."""
        if given:
            if voice.clipped:
                raise clipped_refusal(audio.duration_seconds(voice.samples, voice.sr))
            return given, "job"
        if voice.embedded_text:
            return voice.embedded_text, "stored"
        if voice.sha256 is None:
            return BUILTIN_VOICES[voice.name][1], "built-in"
        if not voice.clipped:
            written = self.storage.get_text(transcript_key(voice.name))
            if written and written.strip():
                return written.strip(), "stored"
        learnt = self._learnt_transcript(voice)
        return (learnt, "stored") if learnt else None

    def _learnt_transcript(self, voice: Voice) -> str | None:
        raw = self.storage.get_text(meta_key(voice.name))
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            return None
        if not isinstance(meta, dict) or meta.get("sha256") != voice.sha256:
            return None  # made for audio that has since been replaced
        text = meta.get("ref_text")
        return text.strip() if isinstance(text, str) and text.strip() else None

    def remember_transcript(self, voice: Voice, text: str) -> None:
        """Kept even if the job fails later; bound to the audio it describes, so it is never used
        for a voice that replaced this one meanwhile."""
        if voice.sha256 is not None:
            self.storage.put_json(meta_key(voice.name), {"sha256": voice.sha256, "ref_text": text})

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
        return voice_key(name)
