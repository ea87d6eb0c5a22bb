"""Reference voices: where a voice name is looked up, and where its transcript comes from.

Why this module exists: a voice is more than a file. It lives at ``voices/<name>`` in storage (or,
for the two example voices f5-tts ships, in the installed package), its transcript lives beside it
at ``voices/<name>.txt``, and a voice with no transcript is transcribed once and the transcript
stored, so no voice is transcribed twice. Voice names are checked by ``job_input`` before they get
here; keys are built only from checked names, so nothing outside ``voices/`` is touched.
"""
from __future__ import annotations

import logging
from importlib.resources import files as package_files
from pathlib import Path

import numpy as np

from f5worker import audio
from f5worker.errors import InputError
from f5worker.settings import TRANSCRIPT_SUFFIX, VOICES_PREFIX
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
    return f"{VOICES_PREFIX}{name}{TRANSCRIPT_SUFFIX}"


class VoiceLibrary:
    def __init__(self, storage: Storage, transcribe=None):
        self.storage = storage
        self._transcribe = transcribe  # (samples, sr) -> str; loaded lazily by its owner

    def fetch(self, name: str, staging_path: Path) -> tuple[np.ndarray, int]:
        """Decoded samples of a stored (or built-in) voice, staged through ``staging_path``."""
        try:
            self.storage.download_file(voice_key(name), staging_path)
            source = staging_path
        except KeyNotFound:
            if name not in BUILTIN_VOICES:
                raise InputError(f"Voice '{name}' was not found; upload it first with the upload endpoint.") from None
            source = Path(str(package_files("f5_tts").joinpath(BUILTIN_VOICES[name][0])))
        return audio.decode(source)

    def known_ref_text(self, name: str, given: str | None) -> tuple[str, str] | None:
        """The transcript and where it came from (the job, storage, built-in), or None when only
        Whisper can tell. Storage I/O only: runs off the model thread."""
        if given:
            return given, "job"
        stored = self.storage.get_text(transcript_key(name))
        if stored and stored.strip():
            return stored.strip(), "stored"
        if name in BUILTIN_VOICES and not self.storage.exists(voice_key(name)):
            return BUILTIN_VOICES[name][1], "built-in"
        return None

    def remember_transcript(self, name: str, text: str) -> None:
        """Kept even if the job fails later: it is the voice's transcript whatever happens next."""
        self.storage.put_text(transcript_key(name), text)

    def transcribe(self, samples: np.ndarray, sr: int) -> str:
        if self._transcribe is None:
            raise InputError("No transcript is stored for this voice and transcription is unavailable; pass ref_text.")
        text = self._transcribe(samples, sr).strip()
        if not text:
            raise InputError("The voice could not be transcribed (no speech recognised); pass ref_text.")
        return text

    def store(self, name: str, wav_path: Path, ref_text: str) -> str:
        """Transcript first, then the voice, so a voice is never visible without its transcript;
        if the voice cannot be written, the previous transcript is put back."""
        previous = self.storage.get_text(transcript_key(name))
        self.storage.put_text(transcript_key(name), ref_text)
        try:
            self.storage.upload_file(voice_key(name), wav_path, "audio/wav")
        except Exception:
            try:
                if previous is None:
                    self.storage.delete(transcript_key(name))
                else:
                    self.storage.put_text(transcript_key(name), previous)
            except Exception:
                log.warning("could not restore the transcript of voice %s", name, exc_info=True)
            raise
        return voice_key(name)
