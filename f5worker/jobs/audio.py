"""Audio in and out as plain functions on numpy arrays: decode, trim, join, encode.

Why this module exists: f5-tts decodes through torchaudio (which now needs torchcodec and FFmpeg)
and pydub, and its reference preprocessing leaves a temp file per voice and grows module-level
caches. These functions do the same work with soundfile and numpy, in memory, with no global state.
Silence rules follow f5-tts's ``preprocess_ref_audio_text`` and ``remove_silence_for_generated_wav``
(pydub's 10 ms chunks and dBFS thresholds), so a reference comes out as f5-tts would prepare it.
A stored voice is a WAV with its transcript in a chunk of its own, placed before the audio so that
the first few KiB of the file say how long the voice is and what it says (``wav_summary``).
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from f5worker.errors import InputError, ModelFault

REF_MAX_SECONDS = 12.0  # f5-tts clips references here; longer ones only cost time
REF_MIN_SECONDS = 1.0
VOICE_MAX_SECONDS = 60.0  # an upload longer than this is refused
INT16_FULL_SCALE = 32768.0
REFERENCE_PAD_SECONDS = 0.05  # silence f5-tts appends to a prepared reference
PEAK_LIMIT = 10 ** (-1 / 20)  # -1 dBFS: loudness normalisation never raises a sample past this
# remove_silences (f5-tts's remove_silence_for_generated_wav): pauses of at least SILENCE_CUT_MS
# below SILENCE_CUT_DB keep SILENCE_KEEP_MS at each side (jobs.assembly does the same in pieces).
SILENCE_CUT_MS = 1000
SILENCE_CUT_DB = -50.0
SILENCE_KEEP_MS = 500


def decode(path_or_bytes: Path | bytes, max_seconds: float = VOICE_MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Decode any format libsndfile reads (WAV, FLAC, OGG, MP3) to mono float32. The length is
    checked from the header first: a small compressed file can hold hours of audio."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    try:
        info = sf.info(source)
        if isinstance(source, io.BytesIO):
            source.seek(0)
    except Exception as exc:  # libsndfile says why in its own words; ours is one sentence
        raise InputError("The voice file is not decodable audio (WAV, FLAC, OGG or MP3 expected).") from exc
    if not (8000 <= info.samplerate <= 192000) or not (1 <= info.channels <= 8):
        raise InputError("The voice file has an unsupported sample rate or channel count.")
    if info.frames > max_seconds * info.samplerate:
        raise InputError(f"The voice must be between {REF_MIN_SECONDS:g} and {max_seconds:g} seconds long "
                         f"(it is {info.frames / info.samplerate:.1f} s).")
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as exc:
        raise InputError("The voice file is not decodable audio (WAV, FLAC, OGG or MP3 expected).") from exc
    if data.size == 0 or sr <= 0:
        raise InputError("The voice file contains no audio.")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise InputError("The voice file contains invalid samples.")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


def duration_seconds(samples: np.ndarray, sr: int) -> float:
    return float(len(samples)) / float(sr)


def chunk_dbfs(samples: np.ndarray, sr: int, chunk_ms: int = 10) -> np.ndarray:
    """pydub's dBFS per chunk: RMS of int16 samples against full scale."""
    n = max(1, int(sr * chunk_ms / 1000))
    count = len(samples) // n
    if count == 0:
        return np.zeros(0)
    frames = np.round(samples[: count * n] * INT16_FULL_SCALE).reshape(count, n)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms / INT16_FULL_SCALE)


def piece_dbfs(samples: np.ndarray) -> float:
    """pydub's dBFS of one piece of any length (``chunk_dbfs``'s measure, for a partial last step)."""
    if not len(samples):
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.round(samples * INT16_FULL_SCALE).astype(np.float64) ** 2)))
    with np.errstate(divide="ignore"):
        return float(20 * np.log10(rms / INT16_FULL_SCALE))


def trim_silence_edges(samples: np.ndarray, sr: int, threshold_db: float = -42.0) -> np.ndarray:
    """pydub's detect_leading_silence applied at both ends (10 ms steps)."""
    db = chunk_dbfs(samples, sr)
    step = max(1, int(sr * 0.01))
    loud = np.nonzero(db >= threshold_db)[0]
    if loud.size == 0:
        return samples[:0]
    start = int(loud[0]) * step
    rev_db = chunk_dbfs(samples[::-1], sr)
    rev_loud = np.nonzero(rev_db >= threshold_db)[0]
    end = len(samples) - int(rev_loud[0]) * step
    return samples[start:end]


def _silent_runs(samples: np.ndarray, sr: int, min_silence_ms: int, threshold_db: float) -> list[tuple[int, int]]:
    """Sample ranges of silence at least ``min_silence_ms`` long (10 ms steps, like seek_step=10 in
    f5-tts's calls). A partial last step is judged by its own level: a quiet one ends a run at the
    last sample (counted as sound, it made audio silent throughout look like a pause before sound)."""
    step = max(1, sr // 100)
    quiet = list(chunk_dbfs(samples, sr) < threshold_db)
    tail_quiet = piece_dbfs(samples[len(quiet) * step:]) < threshold_db
    runs, start = [], None
    for i, q in enumerate(quiet + [False]):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if (i - start) * 10 >= min_silence_ms:
                runs.append((start * step, len(samples) if i == len(quiet) and tail_quiet else i * step))
            start = None
    return runs


def split_on_silence(samples: np.ndarray, sr: int, min_silence_ms: int, threshold_db: float,
                     keep_ms: int) -> list[np.ndarray]:
    """Non-silent pieces, each with up to ``keep_ms`` of its surrounding silence kept; where two
    pieces' kept silence would overlap, the pause is split at its middle (pydub's rule), so no
    sample appears twice."""
    keep = int(sr * keep_ms / 1000)
    runs = _silent_runs(samples, sr, min_silence_ms, threshold_db)
    starts = [0] + [end for _, end in runs]
    ends = [start for start, _ in runs] + [len(samples)]
    ranges = [[max(0, a - keep), min(len(samples), b + keep)] for a, b in zip(starts, ends) if b > a]
    for left, right in zip(ranges, ranges[1:]):
        if right[0] < left[1]:
            left[1] = right[0] = (left[1] + right[0]) // 2
    return [samples[a:b] for a, b in ranges]


def _join_pieces(pieces: list[np.ndarray], sr: int) -> np.ndarray:
    """Join pieces until past 6 s, stopping before 12 s would be passed."""
    kept = np.zeros(0, dtype=np.float32)
    for piece in pieces:
        if len(kept) > 6 * sr and len(kept) + len(piece) > int(REF_MAX_SECONDS * sr):
            break
        kept = np.concatenate([kept, piece])
    return kept


def clip_reference(samples: np.ndarray, sr: int) -> tuple[np.ndarray, bool]:
    """The part of a voice F5-TTS uses: at most 12 s, cut at a pause where there is one (f5-tts's
    preprocess_ref_audio_text), and whether speech beyond it was dropped (long pauses shortened
    do not count). A transcript must describe exactly this part."""
    limit = int(REF_MAX_SECONDS * sr)
    pieces = split_on_silence(samples, sr, 1000, -50.0, keep_ms=1000)
    kept = _join_pieces(pieces, sr)
    if len(kept) > limit:  # no long pause to cut at: try short ones
        pieces = split_on_silence(samples, sr, 100, -40.0, keep_ms=1000)
        kept = _join_pieces(pieces, sr)
    dropped = len(kept) < sum(len(p) for p in pieces) or len(kept) > limit
    return kept[:limit], dropped


def check_speech(clip: np.ndarray, sr: int) -> np.ndarray:
    """The clip with its silent edges trimmed; InputError if almost nothing is left."""
    trimmed = trim_silence_edges(clip, sr)
    if duration_seconds(trimmed, sr) < REF_MIN_SECONDS * 0.5:
        raise InputError("The voice is almost silent: upload a clip with at least half a second of clear speech.")
    return trimmed


def prepare_reference(samples: np.ndarray, sr: int) -> np.ndarray:
    """Clip a reference to at most 12 s, preferring a cut at a pause, trim its silent edges and add
    50 ms of silence, as f5-tts's preprocess_ref_audio_text does."""
    trimmed = check_speech(clip_reference(samples, sr)[0], sr)
    return np.concatenate([trimmed, np.zeros(int(sr * REFERENCE_PAD_SECONDS), dtype=np.float32)]).astype(np.float32)


def normalise_loudness(clip: np.ndarray, sr: int, target_rms: float) -> tuple[np.ndarray, float]:
    """``clip`` scaled so that the reference synthesis makes of it (the clip and f5-tts's 50 ms of
    silence) has an RMS of ``target_rms``, but never so far that a sample passes ``PEAK_LIMIT``
    (-1 dBFS); and the gain applied. Synthesis raises a quieter reference to its target RMS and
    lowers its output by as much, so a voice at the target gives output at the model's own level,
    the same for every voice.

    InputError where lowering the clip leaves no speech in it (``check_speech``, which every
    synthesis with it would then fail): a few samples far louder than the rest, such as one float
    sample at 1e30, set the gain and bring the speech itself down to silence."""
    padded = len(clip) + int(sr * REFERENCE_PAD_SECONDS)
    rms = float(np.sqrt(np.sum(np.square(clip, dtype=np.float64)) / padded)) if padded else 0.0
    peak = float(np.max(np.abs(clip))) if len(clip) else 0.0
    if rms <= 0.0 or peak <= 0.0:
        return clip, 1.0
    gain = min(target_rms / rms, PEAK_LIMIT / peak)
    scaled = (clip * gain).astype(np.float32)
    if gain < 1.0:  # only a lowering can take speech below check_speech's threshold
        try:
            check_speech(scaled, sr)
        except InputError:
            raise InputError(
                f"The voice's loudest samples (peak {peak:.3g} times full scale) are so far above its speech "
                "that bringing them within range would leave the speech almost silent; remove them (a 16-bit "
                "PCM export clips them) and upload again.") from None
    return scaled, gain


def remove_silences(samples: np.ndarray, sr: int) -> np.ndarray:
    """Shorten pauses over 1 s, as f5-tts's remove_silence_for_generated_wav does, with two
    differences: a pause is quiet in every 10 ms step (pydub averages a sliding 1 s window, so a
    click inside a pause splits it here), and audio silent throughout is kept as it is (pydub
    finds nothing to keep, and f5-tts writes an empty file: a job whose output is lost)."""
    pieces = split_on_silence(samples, sr, min_silence_ms=SILENCE_CUT_MS, threshold_db=SILENCE_CUT_DB,
                              keep_ms=SILENCE_KEEP_MS)
    return np.concatenate(pieces).astype(np.float32) if pieces else samples


def check_finite(wave: np.ndarray, index: int, chunks: int, *, seed_given: bool, verified: bool) -> None:
    """A chunk's waveform from the model, refused (``ModelFault``) where a sample is not a finite
    number: an encoder would pass it on as a full-scale click, spread by resampling into a burst,
    or (LAME) abort the process and every job in it."""
    if np.isfinite(wave).all():
        return
    again = "with another seed" if seed_given else "(it draws another seed)"
    tries = " in every try" if verified else ""
    guard = "" if verified else ", or with \"verify\": true, which samples such a chunk again"
    raise ModelFault(f"The model's audio for chunk {index + 1} of {chunks} holds samples that are not finite "
                     f"numbers{tries} (a numeric fault), so the job stopped and nothing was stored; send it again "
                     f"{again}{guard}.", retry_helps=not seed_given)


def cross_fade_join(waves: list[np.ndarray], sr: int, cross_fade_seconds: float) -> np.ndarray:
    """Join chunk waveforms with linear cross-fades (f5-tts's infer_batch_process rule, which
    concatenates the joined audio again at each chunk: quadratic in the chunk count). Here each
    sample is written once into a buffer of the joined length, in float64 as f5-tts's fades come
    out, so the result is the same to the bit."""
    if len(waves) <= 1:
        return waves[0] if waves else np.zeros(0, dtype=np.float32)
    out = np.empty(joined_length([len(w) for w in waves], sr, cross_fade_seconds), dtype=np.float64)
    end = len(waves[0])
    out[:end] = waves[0]
    for nxt in waves[1:]:
        n = min(int(cross_fade_seconds * sr), end, len(nxt))
        if n > 0:
            out[end - n:end] = out[end - n:end] * np.linspace(1, 0, n) + nxt[:n] * np.linspace(0, 1, n)
        out[end:end + len(nxt) - n] = nxt[n:]
        end += len(nxt) - n
    return out


def joined_length(lengths: list[int], sr: int, cross_fade_seconds: float) -> int:
    """The length ``cross_fade_join`` returns for waveforms of these lengths, without joining them."""
    total = 0
    for length in lengths:
        total = joined_after(total, length, sr, cross_fade_seconds)
    return total


def joined_after(total: int, length: int, sr: int, cross_fade_seconds: float) -> int:
    """``joined_length`` once a waveform of ``length`` is joined to ``total`` samples already
    joined: a running total (the first fades into nothing)."""
    return total + length - max(0, min(int(cross_fade_seconds * sr), total, length))


# A stored voice carries its transcript inside the WAV, in a RIFF chunk of its own that players and
# libsndfile skip: one object, so a voice and its transcript are replaced together or not at all.
# The chunk goes before the audio (voices stored by earlier versions have it after; both are read).
TRANSCRIPT_CHUNK_ID = b"f5tx"
MAX_TRANSCRIPT_CHUNK_BYTES = 64 * 1024  # far above any transcript of 12 s of speech
SUMMARY_READ_BYTES = 4096  # what wav_summary reads at a time: a stored voice's header and transcript
_MAX_CHUNKS = 32
_MAX_SUMMARY_READS = 3  # a file whose chunks lie scattered is described from what these reads found
_PCM_FORMATS = {1, 3, 0xFFFE}  # integer PCM, float, WAVE_FORMAT_EXTENSIBLE: frames = bytes / block


def _chunk(chunk_id: bytes, payload: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


def voice_wav_bytes(samples: np.ndarray, sr: int, ref_text: str) -> bytes:
    """A 16-bit PCM WAV of ``samples`` with ``ref_text`` in its transcript chunk, before the audio."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sr, subtype="PCM_16", format="WAV")
    wav = buffer.getvalue()
    data_at = _find_chunk(wav, b"data")
    payload = json.dumps({"ref_text": ref_text}, ensure_ascii=False).encode("utf-8")
    out = bytearray(wav[:data_at] + _chunk(TRANSCRIPT_CHUNK_ID, payload) + wav[data_at:])
    out[4:8] = struct.pack("<I", len(out) - 8)  # the RIFF size now covers the new chunk
    return bytes(out)


def _find_chunk(wav: bytes, chunk_id: bytes) -> int:
    offset = 12
    while offset + 8 <= len(wav):
        if wav[offset:offset + 4] == chunk_id:
            return offset
        size = struct.unpack("<I", wav[offset + 4:offset + 8])[0]
        offset += 8 + size + (size & 1)
    raise ValueError(f"no {chunk_id!r} chunk")


def _transcript(payload: bytes) -> str | None:
    """The transcript in a transcript chunk's payload, or None for anything else (a file placed by
    hand may hold any bytes there: JSON nested past the parser's depth raises RecursionError)."""
    try:
        text = json.loads(payload.decode("utf-8")).get("ref_text")
    except (ValueError, AttributeError, RecursionError):
        return None
    return text.strip() or None if isinstance(text, str) else None


def embedded_transcript(data: bytes) -> str | None:
    """The transcript a stored voice carries (``voice_wav_bytes``), or None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk_id == TRANSCRIPT_CHUNK_ID:
            return _transcript(data[offset + 8:offset + 8 + size])
        offset += 8 + size + (size & 1)
    return None


@dataclass(frozen=True)
class WavSummary:
    sample_rate: int
    channels: int
    seconds: float | None  # None for a compressed WAV, whose length its header does not give
    transcript: str | None  # the transcript chunk's, if any


class _RangeReader:
    """Serves small reads of a file of ``size`` bytes from one window fetched at a time; after
    ``_MAX_SUMMARY_READS`` windows, reads outside the last one come back empty."""

    def __init__(self, read_range: Callable[[int, int], bytes], size: int):
        self.read_range, self.size = read_range, size
        self.start, self.window = 0, b""
        self.fetches = 0

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if not (self.start <= offset and end <= self.start + len(self.window)):
            if self.fetches == _MAX_SUMMARY_READS:
                return b""
            self.start, self.window = offset, self.read_range(offset, max(length, SUMMARY_READ_BYTES))
            self.fetches += 1
        return self.window[offset - self.start:end - self.start]


def wav_summary(read_range: Callable[[int, int], bytes], size: int) -> WavSummary | None:
    """Rate, channels, length and transcript of a WAV of ``size`` bytes, from its chunk headers
    only: ``read_range(start, length)`` is asked for a few KiB at a time (one read for a voice the
    upload job stored; one more for a transcript stored after the audio). None if it is not a WAV."""
    reader = _RangeReader(read_range, size)
    if size < 12 or reader.read(0, 12)[:4] != b"RIFF" or reader.read(8, 4) != b"WAVE":
        return None
    fmt: tuple[int, int, int, int] | None = None  # format tag, channels, rate, block size
    data_bytes = transcript = None
    offset = 12
    for _ in range(_MAX_CHUNKS):
        header = reader.read(offset, 8)
        if len(header) < 8:
            break
        chunk_id, chunk_size = header[:4], struct.unpack("<I", header[4:])[0]
        body_at = offset + 8
        if chunk_id == b"fmt " and chunk_size >= 16:
            body = reader.read(body_at, 14)  # short: the file ends, or it lies past the reads allowed
            fmt = struct.unpack("<HHIxxxxH", body) if len(body) == 14 else None
        elif chunk_id == TRANSCRIPT_CHUNK_ID and chunk_size <= MAX_TRANSCRIPT_CHUNK_BYTES:
            transcript = _transcript(reader.read(body_at, chunk_size))
        elif chunk_id == b"data":
            data_bytes = min(chunk_size, size - body_at)  # a streaming writer's 0xFFFFFFFF: to the end
        offset = body_at + chunk_size + (chunk_size & 1)
        if offset >= size or (fmt and data_bytes is not None and transcript is not None):
            break
    if fmt is None or fmt[2] <= 0 or fmt[1] <= 0:
        return None
    tag, channels, rate, block = fmt
    seconds = (data_bytes // block) / rate if tag in _PCM_FORMATS and block and data_bytes is not None else None
    return WavSummary(rate, channels, seconds, transcript)
