"""Audio in and out as plain functions on numpy arrays: decode, trim, join, encode.

Why this module exists: f5-tts decodes through torchaudio (which now needs torchcodec and FFmpeg)
and pydub, and its reference preprocessing leaves a temp file per voice and grows module-level
caches. These functions do the same work with soundfile and numpy, in memory, with no global state.
Silence rules follow f5-tts's ``preprocess_ref_audio_text`` and ``remove_silence_for_generated_wav``
(pydub's 10 ms chunks and dBFS thresholds), so a reference comes out as f5-tts would prepare it.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from f5worker.errors import InputError

TARGET_SAMPLE_RATE = 24000  # F5-TTS / Vocos mel rate
REF_MAX_SECONDS = 12.0  # f5-tts clips references here; longer ones only cost time
REF_MIN_SECONDS = 1.0
VOICE_MAX_SECONDS = 60.0  # an upload longer than this is refused
INT16_FULL_SCALE = 32768.0


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


def _chunk_dbfs(samples: np.ndarray, sr: int, chunk_ms: int = 10) -> np.ndarray:
    """pydub's dBFS per chunk: RMS of int16 samples against full scale."""
    n = max(1, int(sr * chunk_ms / 1000))
    count = len(samples) // n
    if count == 0:
        return np.zeros(0)
    frames = np.round(samples[: count * n] * INT16_FULL_SCALE).reshape(count, n)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms / INT16_FULL_SCALE)


def trim_silence_edges(samples: np.ndarray, sr: int, threshold_db: float = -42.0) -> np.ndarray:
    """pydub's detect_leading_silence applied at both ends (10 ms steps)."""
    db = _chunk_dbfs(samples, sr)
    step = max(1, int(sr * 0.01))
    loud = np.nonzero(db >= threshold_db)[0]
    if loud.size == 0:
        return samples[:0]
    start = int(loud[0]) * step
    rev_db = _chunk_dbfs(samples[::-1], sr)
    rev_loud = np.nonzero(rev_db >= threshold_db)[0]
    end = len(samples) - int(rev_loud[0]) * step
    return samples[start:end]


def _silent_runs(samples: np.ndarray, sr: int, min_silence_ms: int, threshold_db: float) -> list[tuple[int, int]]:
    """Sample ranges of silence at least ``min_silence_ms`` long (1 ms resolution, like pydub's seek)."""
    step = max(1, sr // 100)  # 10 ms chunks, like seek_step=10 in f5-tts's calls
    db = _chunk_dbfs(samples, sr)
    quiet = db < threshold_db
    runs, start = [], None
    for i, q in enumerate(list(quiet) + [False]):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if (i - start) * 10 >= min_silence_ms:
                runs.append((start * step, i * step))
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
    return np.concatenate([trimmed, np.zeros(int(sr * 0.05), dtype=np.float32)]).astype(np.float32)


def remove_silences(samples: np.ndarray, sr: int) -> np.ndarray:
    """Shorten pauses over 1 s, as f5-tts's remove_silence_for_generated_wav does."""
    pieces = split_on_silence(samples, sr, min_silence_ms=1000, threshold_db=-50.0, keep_ms=500)
    return np.concatenate(pieces).astype(np.float32) if pieces else samples


def cross_fade_join(waves: list[np.ndarray], sr: int, cross_fade_seconds: float) -> np.ndarray:
    """Join chunk waveforms with linear cross-fades (f5-tts's infer_batch_process rule)."""
    if not waves:
        return np.zeros(0, dtype=np.float32)
    out = waves[0]
    for nxt in waves[1:]:
        n = min(int(cross_fade_seconds * sr), len(out), len(nxt))
        if n <= 0:
            out = np.concatenate([out, nxt])
            continue
        faded = out[-n:] * np.linspace(1, 0, n) + nxt[:n] * np.linspace(0, 1, n)
        out = np.concatenate([out[:-n], faded, nxt[n:]])
    return out


def joined_length(lengths: list[int], sr: int, cross_fade_seconds: float) -> int:
    """The length ``cross_fade_join`` returns for waveforms of these lengths, without joining them."""
    total = lengths[0] if lengths else 0
    for length in lengths[1:]:
        total += length - max(0, min(int(cross_fade_seconds * sr), total, length))
    return total


# A stored voice carries its transcript inside the WAV, in a RIFF chunk of its own that players and
# libsndfile skip: one object, so a voice and its transcript are replaced together or not at all.
TRANSCRIPT_CHUNK_ID = b"f5tx"


def voice_wav_bytes(samples: np.ndarray, sr: int, ref_text: str) -> bytes:
    """A 16-bit PCM WAV of ``samples`` with ``ref_text`` in its transcript chunk."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sr, subtype="PCM_16", format="WAV")
    payload = json.dumps({"ref_text": ref_text}, ensure_ascii=False).encode("utf-8")
    chunk = TRANSCRIPT_CHUNK_ID + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")
    data = bytearray(buffer.getvalue() + chunk)
    data[4:8] = struct.pack("<I", len(data) - 8)  # the RIFF size now covers the new chunk
    return bytes(data)


def embedded_transcript(data: bytes) -> str | None:
    """The transcript a stored voice carries (``voice_wav_bytes``), or None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk_id == TRANSCRIPT_CHUNK_ID:
            try:
                text = json.loads(data[offset + 8:offset + 8 + size].decode("utf-8")).get("ref_text")
            except (ValueError, AttributeError):
                return None
            return text.strip() or None if isinstance(text, str) else None
        offset += 8 + size + (size & 1)
    return None
