"""A job's audio as the caller asked for it: sample rate, file format, and whether it fits inline.

Why this module exists: the TTS job can deliver WAV, FLAC, Ogg Vorbis, Ogg Opus or MP3 at one of a
few sample rates, stored and optionally inline (base64) in the result. What each format is (file
extension, Content-Type, libsndfile format and subtype, the sample rates its codec takes) is said
once, in ``FORMATS``; the input rules, the encoder and the README are written from it. Encoding is
libsndfile's (through soundfile, whose wheel bundles libsndfile 1.2 with FLAC, Vorbis, Opus and LAME
MP3; no FFmpeg); resampling is ``jobs.resampling``'s.

Content types: ``audio/wav``, ``audio/flac``, ``audio/ogg`` and ``audio/mpeg`` are the registered
types. Opus is stored as an Ogg Opus file (RFC 7845), whose registered type is ``audio/ogg``;
``audio/ogg; codecs=opus`` adds the codec parameter that RFC 7845 section 9 recommends, so a browser
can tell it plays the file without fetching it. ``audio/opus`` is not used: it names the RTP payload
format (RFC 7587), not a file.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from f5worker.model.constants import SAMPLE_RATE

# Sample rates a job may ask for: the common telephone, wideband, CD and studio rates around the
# model's own 24 kHz. Each is reached from 24 kHz by one resampling (jobs.resampling.from_model_rate).
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
OPUS_SAMPLE_RATES = (8000, 16000, 24000, 48000)  # of those, the ones Opus takes (it also takes 12 kHz)
WAV_HEADER_BYTES = 44  # what libsndfile writes before 16-bit PCM samples in a WAV
# Room kept free in a result besides its fields: RunPod's own wrapping ({"output": ...}) and the
# job's timings, which are known only after the upload, when the audio's fit is already settled.
RESULT_ALLOWANCE_BYTES = 1024


@dataclass(frozen=True)
class OutputFormat:
    name: str  # the job's output_format value
    extension: str  # of the stored key, without the dot
    content_type: str
    sf_format: str  # libsndfile's container ...
    sf_subtype: str  # ... and codec
    sample_rates: tuple[int, ...]
    lossy: bool
    pcm_bytes_per_sample: int | None = None  # uncompressed: the size follows from the length

    def least_bytes(self, samples: int) -> int:
        """A lower bound on the encoded size of ``samples`` samples: exact for WAV, 0 for the
        compressed formats (how small they get depends on the audio)."""
        if self.pcm_bytes_per_sample is None:
            return 0
        return WAV_HEADER_BYTES + self.pcm_bytes_per_sample * samples


FORMATS: dict[str, OutputFormat] = {fmt.name: fmt for fmt in (
    OutputFormat("wav", "wav", "audio/wav", "WAV", "PCM_16", SAMPLE_RATES, lossy=False, pcm_bytes_per_sample=2),
    OutputFormat("flac", "flac", "audio/flac", "FLAC", "PCM_16", SAMPLE_RATES, lossy=False),
    OutputFormat("ogg", "ogg", "audio/ogg", "OGG", "VORBIS", SAMPLE_RATES, lossy=True),
    OutputFormat("opus", "opus", "audio/ogg; codecs=opus", "OGG", "OPUS", OPUS_SAMPLE_RATES, lossy=True),
    OutputFormat("mp3", "mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", SAMPLE_RATES, lossy=True),
)}
DEFAULT_FORMAT = "wav"
EXTENSIONS = tuple(f".{fmt.extension}" for fmt in FORMATS.values())


def one_of(values) -> str:
    """'a, b or c' for a sentence."""
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit integers, the one conversion every 16-bit output uses (the stored
    WAV and FLAC, and a stream's PCM pieces): libsndfile's for a WAV, clipped to full scale. Its
    FLAC writer converts floats another way (±1 LSB in about half the samples), so FLAC is written
    from these integers, which libsndfile stores as they are."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="RAW", subtype="PCM_16", endian="LITTLE")
    return np.frombuffer(buffer.getvalue(), dtype="<i2")


def encode(samples: np.ndarray, sample_rate: int, fmt: OutputFormat) -> bytes:
    """``samples`` (mono float32) as a file of ``fmt``, in memory: the 16-bit formats from
    ``pcm16``'s integers; the lossy codecs at libsndfile's default quality."""
    buffer = io.BytesIO()
    data = pcm16(samples) if fmt.sf_subtype == "PCM_16" else samples
    sf.write(buffer, data, sample_rate, format=fmt.sf_format, subtype=fmt.sf_subtype)
    return buffer.getvalue()


def inline_room(result: dict, max_result_bytes: int) -> int:
    """How many bytes of audio fit as ``audio_base64`` beside ``result`` in a RunPod result of at
    most ``max_result_bytes`` (serialised as the runpod SDK does: JSON, UTF-8)."""
    others = len(json.dumps({**result, "audio_base64": ""}, ensure_ascii=False).encode("utf-8"))
    room = max_result_bytes - RESULT_ALLOWANCE_BYTES - others
    return max(0, room // 4 * 3)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def size_text(size: int) -> str:
    """Bytes as a sentence says them: '7.5 MB', '36 kB'."""
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{round(size / 1000)} kB"


def too_large_sentence(fmt: OutputFormat, size: int, room: int, *, before: bool = False) -> str:
    """The refusal of ``return_base64`` for audio of ``size`` bytes where ``room`` fit."""
    what = f"would be at least {size_text(size)}" if before else f"is {size_text(size)}"
    smaller = "send a shorter text" if fmt.lossy else "choose output_format ogg, opus or mp3"
    return (f"The {fmt.name} audio {what} and at most {size_text(room)} fit inline in a RunPod result; "
            f"set return_base64 to false and fetch audio_url, or {smaller}.")


def omitted_sentence(size: int, room: int) -> str:
    """Why audio that was to be inline by default (local storage) is not."""
    return (f"The audio is {size_text(size)} and at most {size_text(room)} fit inline in a RunPod result, "
            "so it is only in the stored file.")
